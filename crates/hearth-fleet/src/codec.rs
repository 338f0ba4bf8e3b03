//! What goes into Redis and comes back: jobs, operation states and replica
//! adverts, as the `hearth.state.v1` messages. Everything read back is
//! checked as input from outside: another replica (or anyone with access to
//! the database) wrote it.

use hearth_proto::reapi::{Action, Command, ExecuteResponse};
use hearth_proto::state::{ExecutorAd, ReplicaAd, SharedJob, SharedOp, SharedStage};
use hearth_scheduler::{ExecutorInfo, Job, OpSnapshot, Platform, SchedulerStats, Stage};
use hearth_storage::{action_key, Digest};
use prost::Message;

/// A record in Redis that does not decode, or says something impossible.
#[derive(Debug, thiserror::Error)]
#[error("shared {what} {name:?} is malformed: {why}")]
pub struct Malformed {
    pub what: &'static str,
    pub name: String,
    pub why: String,
}

fn malformed(what: &'static str, name: &str, why: impl ToString) -> Malformed {
    Malformed {
        what,
        name: name.to_string(),
        why: why.to_string(),
    }
}

pub fn encode_job(job: &Job) -> Vec<u8> {
    SharedJob {
        tenant: job.tenant.clone(),
        instance_name: job.instance_name.clone(),
        action_hash: job.action_digest.hash_hex(),
        action_size: job.action_digest.size() as i64,
        action: job.action.clone(),
        command: job.command.clone(),
        do_not_cache: job.do_not_cache,
        shareable: job.shareable,
    }
    .encode_to_vec()
}

/// The job back, its platform read again from its Action and Command. It
/// pins nothing: the bucket behind the replicas is what keeps its inputs.
pub fn decode_job(name: &str, bytes: &[u8]) -> Result<Job, Malformed> {
    let m = SharedJob::decode(bytes).map_err(|e| malformed("job", name, e))?;
    let action_digest =
        Digest::parse(&m.action_hash, m.action_size).map_err(|e| malformed("job", name, e))?;
    let action = Action::decode(m.action.as_slice()).map_err(|e| malformed("job", name, e))?;
    let command = Command::decode(m.command.as_slice()).map_err(|e| malformed("job", name, e))?;
    // Command.platform is deprecated in REAPI 2.2 but still what Bazel sends.
    #[allow(deprecated)]
    let platform = Platform::from_protos(command.platform.as_ref(), action.platform.as_ref())
        .map_err(|e| malformed("job", name, e))?;
    Ok(Job {
        tenant: m.tenant,
        instance_name: m.instance_name,
        action_digest,
        action: m.action,
        command: m.command,
        platform,
        do_not_cache: m.do_not_cache,
        // Requests were deduplicated across replicas before it was queued.
        shareable: false,
        pins: None,
    })
}

/// The part of an operation that never changes: whose it is and for what.
#[derive(Debug, Clone)]
pub struct OpIdentity {
    pub tenant: String,
    pub instance_name: String,
    pub action_digest: Digest,
}

impl OpIdentity {
    pub fn of(job: &Job) -> Self {
        OpIdentity {
            tenant: job.tenant.clone(),
            instance_name: job.instance_name.clone(),
            action_digest: job.action_digest,
        }
    }

    /// The key identical requests share (tenant, instance, action).
    pub fn dedup(&self) -> Digest {
        action_key(&self.tenant, &self.instance_name, &self.action_digest)
    }
}

pub fn encode_op(id: &OpIdentity, snap: &OpSnapshot) -> Vec<u8> {
    SharedOp {
        name: snap.name.clone(),
        tenant: id.tenant.clone(),
        instance_name: id.instance_name.clone(),
        action_hash: id.action_digest.hash_hex(),
        action_size: id.action_digest.size() as i64,
        stage: match snap.stage {
            Stage::Queued => SharedStage::Queued,
            Stage::Executing => SharedStage::Executing,
            Stage::Completed => SharedStage::Completed,
        } as i32,
        response: snap
            .response
            .as_ref()
            .map(|r| r.encode_to_vec())
            .unwrap_or_default(),
    }
    .encode_to_vec()
}

pub fn decode_op(bytes: &[u8]) -> Result<(OpIdentity, OpSnapshot), Malformed> {
    let m = SharedOp::decode(bytes).map_err(|e| malformed("operation", "?", e))?;
    let name = m.name.as_str();
    let action_digest = Digest::parse(&m.action_hash, m.action_size)
        .map_err(|e| malformed("operation", name, e))?;
    let stage = match SharedStage::try_from(m.stage) {
        Ok(SharedStage::Queued) => Stage::Queued,
        Ok(SharedStage::Executing) => Stage::Executing,
        Ok(SharedStage::Completed) => Stage::Completed,
        Err(_) => return Err(malformed("operation", name, "unknown stage")),
    };
    let response = match stage {
        Stage::Completed => Some(
            ExecuteResponse::decode(m.response.as_slice())
                .map_err(|e| malformed("operation", name, e))?,
        ),
        _ => None,
    };
    Ok((
        OpIdentity {
            tenant: m.tenant,
            instance_name: m.instance_name,
            action_digest,
        },
        OpSnapshot {
            name: m.name,
            action_digest,
            stage,
            response,
        },
    ))
}

/// This replica's executors, for the others.
pub fn advert(id: &str, stats: &SchedulerStats) -> Vec<u8> {
    ReplicaAd {
        id: id.to_string(),
        executors: stats
            .executors
            .iter()
            .filter(|e| !e.reconnecting)
            .map(|e| ExecutorAd {
                id: e.info.id.clone(),
                properties: e.info.properties.clone().into_iter().collect(),
                isolation_types: e.info.isolation_types.clone(),
                capacity: e.info.capacity,
                vm_unavailable: e.info.vm_unavailable.clone(),
                warm_keys: e
                    .warm_keys
                    .iter()
                    .filter(|k| k.count > 0)
                    .map(|k| k.affinity_key.clone())
                    .collect(),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// Another replica's executors: what they can run and which warm runners
/// they hold.
#[derive(Debug, Clone)]
pub struct Replica {
    pub executors: Vec<(ExecutorInfo, Vec<String>)>,
}

pub fn decode_advert(bytes: &[u8]) -> Result<Replica, Malformed> {
    let m = ReplicaAd::decode(bytes).map_err(|e| malformed("replica advert", "?", e))?;
    Ok(Replica {
        executors: m
            .executors
            .into_iter()
            .map(|e| {
                (
                    ExecutorInfo {
                        id: e.id,
                        description: String::new(),
                        properties: e.properties.into_iter().collect(),
                        isolation_types: e.isolation_types,
                        capacity: e.capacity,
                        vm_unavailable: e.vm_unavailable,
                    },
                    e.warm_keys,
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_survives_the_trip() {
        let id = OpIdentity {
            tenant: "t".into(),
            instance_name: "i".into(),
            action_digest: Digest::of(b"a"),
        };
        let snap = OpSnapshot {
            name: "operations/x".into(),
            action_digest: id.action_digest,
            stage: Stage::Completed,
            response: Some(ExecuteResponse {
                cached_result: true,
                ..Default::default()
            }),
        };
        let (back_id, back) = decode_op(&encode_op(&id, &snap)).unwrap();
        assert_eq!(back_id.tenant, "t");
        assert_eq!(back.stage, Stage::Completed);
        assert!(back.response.unwrap().cached_result);
        assert_eq!(back.action_digest, id.action_digest);
    }

    #[test]
    fn garbage_is_refused_not_trusted() {
        assert!(decode_op(b"\xff\xff\xff").is_err());
        let bad_stage = SharedOp {
            name: "operations/x".into(),
            action_hash: Digest::of(b"a").hash_hex(),
            action_size: 1,
            stage: 9,
            ..Default::default()
        };
        assert!(decode_op(&bad_stage.encode_to_vec()).is_err());
        let bad_digest = SharedJob {
            action_hash: "zz".into(),
            ..Default::default()
        };
        assert!(decode_job("operations/x", &bad_digest.encode_to_vec()).is_err());
    }
}
