//! Several `hearth server` replicas serving one fleet of executors through
//! one Redis (`--state redis://…`): the queue, the operations clients watch,
//! request deduplication and the leases of running work live there, so an
//! action sent to replica A runs on an executor connected to replica B, and
//! a client watches it from any replica.
//!
//! Each replica keeps its own [`Scheduler`] for the executors connected to
//! it. An action goes straight to it when it has a free executor for it
//! (and no other replica holds a warm runner it wants); otherwise it waits
//! in the shared queue, and the first replica with a free executor that fits
//! claims it. The replica running an action holds a lease on it and mirrors
//! its operation to Redis; a lease not renewed (the replica died) puts the
//! action back in the queue, and an executor that reconnects to another
//! replica still running it is adopted there, the action not run again.

mod claim;
mod codec;
mod holder;
mod listener;
mod replicas;
mod scripts;
mod watches;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use hearth_proto::reapi::ExecuteResponse;
use hearth_scheduler::{
    Assignments, ConnectError, ExecutorInfo, Job, JobQueue, OpSnapshot, Platform, Scheduler, Stage,
    SubmitError,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{watch, Notify};

use crate::codec::{decode_op, encode_job, encode_op, OpIdentity, Replica};
use crate::scripts::{Placement, State};
use crate::watches::Watches;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// This replica's name in leases and adverts (unique per process).
    pub replica: String,
    /// How long a replica's claim on running work holds without renewal.
    pub lease: Duration,
    /// How long an action may wait for an executor before it fails.
    pub queue_timeout: Duration,
    /// How long a finished operation stays visible.
    pub retention: Duration,
    /// How many times an action is taken from the queue before it fails.
    pub max_attempts: u32,
    /// An operation no client has watched for this long is cancelled.
    pub abandon_unwatched: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            replica: format!("replica-{}", uuid::Uuid::new_v4().simple()),
            lease: Duration::from_secs(10),
            queue_timeout: Duration::from_secs(600),
            retention: Duration::from_secs(600),
            max_attempts: 3,
            abandon_unwatched: Duration::from_secs(5),
        }
    }
}

/// A job queued less than this long is left to a replica holding a warm
/// runner for it before a cold one takes it.
const WARM_WAIT: Duration = Duration::from_secs(2);

/// Records in flight expire after a day even if no replica finishes them.
const RECORD_TTL: Duration = Duration::from_secs(24 * 3600);

pub(crate) struct Inner {
    config: FleetConfig,
    state: State,
    client: redis::Client,
    scheduler: Arc<Scheduler>,
    watches: Watches,
    /// Operations this replica holds leases on → the task mirroring each.
    held: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// The other live replicas, as of their last adverts.
    fleet: RwLock<Vec<Replica>>,
    /// Work was queued somewhere.
    wake: Notify,
    /// This replica's background tasks.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// The queue shared through Redis; see the crate docs.
#[derive(Clone)]
pub struct SharedQueue {
    inner: Arc<Inner>,
}

fn unavailable(what: &str, e: redis::RedisError) -> SubmitError {
    SubmitError::Unavailable(format!("shared state (Redis) {what}: {e}"))
}

/// google.rpc.Code values used here.
pub(crate) mod code {
    pub const CANCELLED: i32 = 1;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const UNAVAILABLE: i32 = 14;
}

/// `snap` ended with an error.
pub(crate) fn failed(snap: OpSnapshot, code: i32, message: &str) -> OpSnapshot {
    OpSnapshot {
        stage: Stage::Completed,
        response: Some(error_response(code, message)),
        ..snap
    }
}

pub(crate) fn error_response(code: i32, message: &str) -> ExecuteResponse {
    ExecuteResponse {
        status: Some(hearth_proto::rpc::Status {
            code,
            message: message.to_string(),
            details: vec![],
        }),
        ..Default::default()
    }
}

impl SharedQueue {
    /// Connects to `url` and starts this replica's part: claiming work for
    /// its executors, keeping its leases, advertising its executors and
    /// following operations.
    pub async fn start(
        url: &str,
        scheduler: Arc<Scheduler>,
        config: FleetConfig,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("Redis URL: {e}"))?;
        let conn = ConnectionManager::new_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(5)))
                .set_number_of_retries(2),
        )
        .await
        .map_err(|e| format!("connecting to Redis: {e}"))?;
        let inner = Arc::new(Inner {
            state: State::new(conn, "hearth:", RECORD_TTL),
            client,
            scheduler,
            watches: Watches::default(),
            held: Mutex::default(),
            fleet: RwLock::default(),
            wake: Notify::new(),
            tasks: Mutex::default(),
            config,
        });
        tracing::info!(replica = %inner.config.replica, "sharing the queue through Redis");
        let tasks = [
            tokio::spawn(listener::run(inner.clone())),
            tokio::spawn(claim::claim_loop(inner.clone())),
            tokio::spawn(holder::renew_loop(inner.clone())),
            tokio::spawn(holder::reap_loop(inner.clone())),
            tokio::spawn(replicas::advert_loop(inner.clone())),
            tokio::spawn(listener::poll_loop(inner.clone())),
        ];
        *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) =
            tasks.iter().map(|t| t.abort_handle()).collect();
        Ok(SharedQueue { inner })
    }

    /// Stops taking part: no more claims, renewals or mirroring. What this
    /// replica held is left to lapse to the others, as if it had died.
    pub fn stop(&self) {
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        for (_, t) in self.inner.held_lock().drain() {
            t.abort();
        }
    }

    pub fn replica(&self) -> &str {
        &self.inner.config.replica
    }
}

impl Inner {
    fn me(&self) -> &str {
        &self.config.replica
    }

    /// How long a `watch:` key outlives its last renewal: the abandonment
    /// time, plus two of the watchers' one-second polls so that one late
    /// poll is not taken for a client gone.
    pub(crate) fn watch_ttl(&self) -> Duration {
        self.config.abandon_unwatched + Duration::from_secs(2)
    }

    /// Why no executor of the fleet can run `platform`, if none can (and
    /// there are executors at all).
    fn fleet_mismatch(&self, platform: &Platform) -> Option<String> {
        let local = self.scheduler.executor_infos();
        let fleet = self.fleet.read().unwrap_or_else(|p| p.into_inner());
        let infos: Vec<&ExecutorInfo> = local
            .iter()
            .chain(
                fleet
                    .iter()
                    .flat_map(|r| r.executors.iter().map(|(i, _)| i)),
            )
            .collect();
        let reasons: Vec<String> = infos.iter().filter_map(|i| i.mismatch(platform)).collect();
        (!infos.is_empty() && reasons.len() == infos.len()).then(|| reasons[0].clone())
    }

    /// An operation's record, if there is one that decodes and carries
    /// its own name (anything else is not trusted: another writer's, or
    /// damaged).
    pub(crate) async fn read_op(
        &self,
        name: &str,
    ) -> redis::RedisResult<Option<(OpIdentity, OpSnapshot)>> {
        let bytes: Option<Vec<u8>> =
            redis::AsyncCommands::get(&mut self.state.conn(), self.state.key("op", name)).await?;
        Ok(match bytes.map(|b| decode_op(&b)) {
            Some(Ok(op)) if op.1.name == name => Some(op),
            Some(_) => {
                tracing::warn!(operation = name, "ignoring a malformed operation record");
                None
            }
            None => None,
        })
    }

    /// Publishes `snap` as the final state of an operation `holder` holds
    /// (None: one still in the queue, which this takes out of it) and lets
    /// its job go; false if it was not so.
    pub(crate) async fn finish(
        &self,
        name: &str,
        holder: Option<&str>,
        id: &OpIdentity,
        snap: &OpSnapshot,
    ) -> redis::RedisResult<bool> {
        let dedup = id.dedup().hash_hex();
        let op = encode_op(id, snap);
        let retention = self.config.retention;
        self.state
            .finish(name, holder, &op, retention, &dedup)
            .await
    }

    /// Whether another live replica holds a warm runner of `key`.
    fn warm_elsewhere(&self, key: &str) -> bool {
        self.fleet
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|r| r.executors.iter())
            .any(|(_, warm)| warm.iter().any(|k| k == key))
    }

    /// Whether this replica should run a job now rather than queue it.
    fn takes_now(&self, platform: &Platform, affinity: Option<&str>) -> bool {
        match self.scheduler.fit(platform, affinity) {
            None => false,
            Some(true) => true,
            Some(false) => !affinity.is_some_and(|k| self.warm_elsewhere(k)),
        }
    }
}

#[async_trait]
impl JobQueue for SharedQueue {
    async fn submit(&self, job: Job) -> Result<watch::Receiver<OpSnapshot>, SubmitError> {
        let inner = &self.inner;
        if inner.fleet_mismatch(&job.platform).is_some() {
            // The adverts are up to a second old: an executor that fits
            // may just have connected somewhere. Look again before refusing.
            replicas::exchange(inner)
                .await
                .map_err(|e| unavailable("reading the other replicas' executors", e))?;
            if let Some(why) = inner.fleet_mismatch(&job.platform) {
                return Err(SubmitError::NoMatchingExecutor(why));
            }
        }
        let id = OpIdentity::of(&job);
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let snap = OpSnapshot {
            name: name.clone(),
            action_digest: job.action_digest,
            stage: Stage::Queued,
            response: None,
        };
        let affinity = job.affinity();
        let here = inner.takes_now(&job.platform, affinity.as_deref());
        let dedup = job.shareable.then(|| id.dedup().hash_hex());
        // Watched before it exists, so no change is missed.
        let rx = inner.watches.watch(snap.clone());
        let placed = inner
            .state
            .submit(
                &name,
                &encode_job(&job),
                &encode_op(&id, &snap),
                if here {
                    Placement::Here(inner.me())
                } else {
                    Placement::Queue
                },
                inner.config.lease,
                inner.watch_ttl(),
                dedup.as_deref(),
            )
            .await
            .map_err(|e| unavailable("queueing the action", e))?;
        if placed.name != name {
            drop(rx);
            tracing::debug!(action = %job.action_digest, operation = %placed.name, "joining an execution in flight on the fleet");
            let (_, joined) =
                decode_op(&placed.op).map_err(|e| SubmitError::Unavailable(e.to_string()))?;
            return Ok(inner.watches.watch(joined));
        }
        if here {
            holder::run_here(inner.clone(), name, id, job).await;
        }
        Ok(rx)
    }

    async fn subscribe(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<Option<watch::Receiver<OpSnapshot>>, SubmitError> {
        let inner = &self.inner;
        let op = inner
            .read_op(name)
            .await
            .map_err(|e| unavailable("reading the operation", e))?;
        Ok(op
            .filter(|(id, _)| tenant.is_none_or(|t| t == id.tenant))
            .map(|(_, snap)| inner.watches.watch(snap)))
    }

    async fn cancel(&self, name: &str, tenant: Option<&str>) -> Result<bool, SubmitError> {
        let inner = &self.inner;
        let op = inner
            .read_op(name)
            .await
            .map_err(|e| unavailable("reading the operation", e))?;
        let Some((id, snap)) = op.filter(|(id, _)| tenant.is_none_or(|t| t == id.tenant)) else {
            return Ok(false);
        };
        if snap.stage == Stage::Completed {
            return Ok(true);
        }
        if inner.scheduler.runs(name) {
            inner
                .scheduler
                .cancel_because(name, "cancelled by the client");
            return Ok(true);
        }
        let done = failed(snap, code::CANCELLED, "cancelled by the client");
        let taken = inner
            .finish(name, None, &id, &done)
            .await
            .map_err(|e| unavailable("cancelling", e))?;
        if !taken {
            // Held by another replica: it cancels it on the message, or at
            // its next renewal (or claim) if the message is lost.
            redis::pipe()
                .cmd("SET")
                .arg(inner.state.key("cancel", name))
                .arg(1)
                .arg("PX")
                .arg(RECORD_TTL.as_millis() as u64)
                .ignore()
                .publish(inner.state.channel("cancel"), name)
                .ignore()
                .query_async::<()>(&mut inner.state.conn())
                .await
                .map_err(|e| unavailable("cancelling", e))?;
        }
        Ok(true)
    }

    async fn connect_executor(
        &self,
        info: ExecutorInfo,
        warm_keys: Vec<String>,
        running: &[String],
        owner: &str,
    ) -> Result<(u64, Assignments), ConnectError> {
        claim::connect_executor(self.inner.clone(), info, warm_keys, running, owner).await
    }
}
