//! The work this replica holds: claiming queued jobs its executors can run,
//! mirroring their operations to Redis, keeping their leases, adopting the
//! work of executors that arrive from a replica that died, and putting back
//! in the queue the work of replicas whose leases lapsed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hearth_scheduler::{Assignments, ConnectError, ExecutorInfo, Job, OpSnapshot, Stage};
use redis::AsyncCommands;
use tokio::sync::watch;

use crate::codec::{decode_job, decode_op, encode_op, OpIdentity};
use crate::scripts::{now_ms, Renewal};
use crate::{affinity_of, code, error_response, Inner, WARM_WAIT};

/// Hands a job this replica holds to its scheduler and mirrors its
/// operation; a scheduler that can no longer run it puts it back.
pub async fn run_here(inner: Arc<Inner>, name: String, id: OpIdentity, job: Job) {
    match inner.scheduler.submit_named(name.clone(), job) {
        Ok(rx) => mirror(inner, name, id, rx),
        Err(e) => {
            tracing::info!(operation = %name, error = %e, "cannot run it here after all; back to the queue");
            if let Err(e) = inner.state.release(&name, inner.me()).await {
                tracing::warn!(operation = %name, error = %e, "cannot put it back in the queue; its lease will lapse");
            }
        }
    }
}

/// Publishes each state of a held operation until it completes or another
/// replica takes it over.
fn mirror(inner: Arc<Inner>, name: String, id: OpIdentity, rx: watch::Receiver<OpSnapshot>) {
    let mut held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
    let task = tokio::spawn(mirror_task(inner.clone(), name.clone(), id, rx));
    if let Some(old) = held.insert(name, task.abort_handle()) {
        old.abort();
    }
}

async fn mirror_task(
    inner: Arc<Inner>,
    name: String,
    id: OpIdentity,
    mut rx: watch::Receiver<OpSnapshot>,
) {
    let mut ran = false;
    loop {
        let snap = rx.borrow_and_update().clone();
        ran |= snap.stage == Stage::Executing;
        if ran && snap.stage == Stage::Queued && inner.scheduler.withdraw(&name) {
            // Its executor here went away: any replica may run it now.
            tracing::info!(operation = %name, "its executor went away; back to the shared queue");
            inner.held_lock().remove(&name);
            if let Err(e) = inner.state.release(&name, inner.me()).await {
                tracing::warn!(operation = %name, error = %e, "cannot put it back in the queue; its lease will lapse");
            }
            return;
        }
        let done = snap.stage == Stage::Completed;
        let bytes = encode_op(&id, &snap);
        // The state must land (the client waits on it): retried while Redis
        // is away, for as long as this replica holds the work.
        let mut delay = Duration::from_millis(100);
        let kept = loop {
            let r = if done {
                inner
                    .state
                    .finish(
                        &name,
                        Some(inner.me()),
                        &bytes,
                        inner.config.retention,
                        &id.dedup().hash_hex(),
                    )
                    .await
            } else {
                let runner = inner.scheduler.runner_of(&name);
                inner
                    .state
                    .update(&name, inner.me(), &bytes, runner.as_deref())
                    .await
            };
            match r {
                Ok(kept) => break kept,
                Err(e) => {
                    tracing::warn!(operation = %name, error = %e, "cannot publish the operation's state; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        if !kept {
            tracing::warn!(operation = %name, "another replica holds this operation now; stopping it here");
            inner.held_lock().remove(&name);
            inner.scheduler.cancel(&name, None);
            return;
        }
        inner.watches.deliver(snap);
        if done || rx.changed().await.is_err() {
            break;
        }
    }
    inner.held_lock().remove(&name);
}

impl Inner {
    pub(crate) fn held_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::AbortHandle>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Claims queued jobs while this replica's executors have free slots.
pub async fn claim_loop(inner: Arc<Inner>) {
    let slots = inner.scheduler.slots_notify();
    loop {
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = slots.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if let Err(e) = claim_some(&inner).await {
            tracing::warn!(error = %e, "cannot read the shared queue");
        }
    }
}

/// Jobs looked at per pass, oldest first.
const CLAIM_WINDOW: isize = 64;

async fn claim_some(inner: &Arc<Inner>) -> redis::RedisResult<()> {
    let mut conn = inner.state.conn();
    while inner.scheduler.spare_slots() > 0 {
        let queued: Vec<(String, f64)> = conn
            .zrange_withscores(inner.state.channel("queue"), 0, CLAIM_WINDOW - 1)
            .await?;
        if queued.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = queued
            .iter()
            .map(|(n, _)| inner.state.key("job", n))
            .collect();
        let jobs: Vec<Option<Vec<u8>>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let now = now_ms();
        let mut took = false;
        for ((name, score), bytes) in queued.into_iter().zip(jobs) {
            let Some(bytes) = bytes else { continue };
            let job = match decode_job(&name, &bytes) {
                Ok(job) => job,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping a malformed job from the queue");
                    fail_queued(inner, &name, code::INVALID_ARGUMENT, &e.to_string()).await;
                    continue;
                }
            };
            let affinity = affinity_of(&job);
            let Some(warm) = inner.scheduler.fit(&job.platform, affinity.as_deref()) else {
                continue;
            };
            let young = now.saturating_sub(score as u64) < WARM_WAIT.as_millis() as u64;
            if !warm && young && affinity.as_deref().is_some_and(|k| inner.warm_elsewhere(k)) {
                continue;
            }
            let Some((_, tries)) = inner
                .state
                .claim(&name, inner.me(), inner.config.lease, None)
                .await?
            else {
                continue;
            };
            let id = OpIdentity::of(&job);
            if tries > inner.config.max_attempts {
                let msg = format!(
                    "the replicas running this action went away {} times; giving up",
                    tries - 1
                );
                finish_held(inner, &name, &id, code::UNAVAILABLE, &msg).await;
                continue;
            }
            metrics::counter!("hearth_fleet_claimed_total").increment(1);
            tracing::debug!(operation = %name, tries, "claimed from the shared queue");
            run_here(inner.clone(), name, id, job).await;
            took = true;
            if inner.scheduler.spare_slots() == 0 {
                return Ok(());
            }
        }
        if !took {
            return Ok(());
        }
    }
    Ok(())
}

/// Ends a queued operation with an error (malformed, timed out).
async fn fail_queued(inner: &Inner, name: &str, code: i32, msg: &str) {
    let mut conn = inner.state.conn();
    let bytes: Option<Vec<u8>> = conn.get(inner.state.key("op", name)).await.unwrap_or(None);
    let Some((id, snap)) = bytes.and_then(|b| decode_op(&b).ok()) else {
        // Nothing to tell anyone; just take it out.
        let _: redis::RedisResult<()> = conn.zrem(inner.state.channel("queue"), name).await;
        return;
    };
    let done = OpSnapshot {
        stage: Stage::Completed,
        response: Some(error_response(code, msg)),
        ..snap
    };
    let dedup = id.dedup().hash_hex();
    let r = inner
        .state
        .finish(
            name,
            None,
            &encode_op(&id, &done),
            inner.config.retention,
            &dedup,
        )
        .await;
    if let Err(e) = r {
        tracing::warn!(operation = name, error = %e, "cannot fail a queued operation");
    }
}

/// Ends an operation this replica holds with an error.
async fn finish_held(inner: &Inner, name: &str, id: &OpIdentity, code: i32, msg: &str) {
    let done = OpSnapshot {
        name: name.to_string(),
        action_digest: id.action_digest,
        stage: Stage::Completed,
        response: Some(error_response(code, msg)),
    };
    let r = inner
        .state
        .finish(
            name,
            Some(inner.me()),
            &encode_op(id, &done),
            inner.config.retention,
            &id.dedup().hash_hex(),
        )
        .await;
    if let Err(e) = r {
        tracing::warn!(operation = name, error = %e, "cannot fail an operation");
    }
}

/// Renews this replica's leases (cancelling what no client watches and
/// dropping what another replica took over), puts lapsed leases' jobs back
/// in the queue, and fails jobs queued too long.
pub async fn lease_loop(inner: Arc<Inner>) {
    let every = inner.config.lease / 5;
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = keep_leases(&inner).await {
            tracing::warn!(error = %e, "cannot renew leases; they lapse in {:?}", inner.config.lease);
        }
        match inner.state.reap().await {
            Ok(names) => {
                for name in names {
                    metrics::counter!("hearth_fleet_requeued_total").increment(1);
                    tracing::warn!(operation = %name, "its replica's lease lapsed; back in the queue");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reap lapsed leases"),
        }
        if let Err(e) = time_out_queued(&inner).await {
            tracing::warn!(error = %e, "cannot time out queued actions");
        }
    }
}

async fn keep_leases(inner: &Arc<Inner>) -> redis::RedisResult<()> {
    let names: Vec<String> = inner.held_lock().keys().cloned().collect();
    let renewals = inner
        .state
        .renew(inner.me(), inner.config.lease, &names)
        .await?;
    for (name, r) in names.into_iter().zip(renewals) {
        match r {
            Renewal::Watched => {}
            Renewal::Unwatched => {
                tracing::info!(operation = %name, "no client watches it on any replica; cancelling it");
                inner
                    .scheduler
                    .cancel_because(&name, "abandoned: no client was waiting for it");
            }
            Renewal::Lost => {
                tracing::warn!(operation = %name, "lost its lease to another replica; stopping it here");
                if let Some(task) = inner.held_lock().remove(&name) {
                    task.abort();
                }
                inner
                    .scheduler
                    .cancel_because(&name, "another replica runs it now");
            }
        }
    }
    Ok(())
}

async fn time_out_queued(inner: &Inner) -> redis::RedisResult<()> {
    let limit = now_ms().saturating_sub(inner.config.queue_timeout.as_millis() as u64);
    let mut conn = inner.state.conn();
    let old: Vec<String> = conn
        .zrangebyscore_limit(inner.state.channel("queue"), "-inf", limit, 0, 100)
        .await?;
    let msg = format!(
        "no executor took this action within the queue timeout of {}s",
        inner.config.queue_timeout.as_secs()
    );
    for name in old {
        fail_queued(inner, &name, code::UNAVAILABLE, &msg).await;
    }
    Ok(())
}

/// An executor connects (or comes back, maybe from a replica that died)
/// still running `running`: what no job here owns but the shared state
/// knows as in flight is taken over — its word on where the work runs wins —
/// and kept running instead of run again.
pub async fn connect_executor(
    inner: Arc<Inner>,
    info: ExecutorInfo,
    warm_keys: Vec<String>,
    running: &[String],
    owner: &str,
) -> Result<(u64, Assignments), ConnectError> {
    let mut adopted = vec![];
    let mut ids = HashMap::new();
    // Only the executor recorded as running an operation can move it here:
    // another cannot steal work by naming it.
    let runner = format!("{owner}/{}", info.id);
    for name in running.iter().filter(|n| !inner.scheduler.runs(n)) {
        match inner
            .state
            .claim(name, inner.me(), inner.config.lease, Some(&runner))
            .await
        {
            Ok(Some((bytes, _))) => match decode_job(name, &bytes) {
                Ok(job) if info.mismatch(&job.platform).is_none() => {
                    ids.insert(name.clone(), OpIdentity::of(&job));
                    adopted.push((name.clone(), job));
                }
                Ok(_) => {
                    // It cannot run there: back to the queue for another.
                    let _ = inner.state.release(name, inner.me()).await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot adopt a malformed job"),
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(operation = %name, error = %e, "cannot adopt a running action; it will be cancelled")
            }
        }
    }
    let (session, rx, watched) =
        inner
            .scheduler
            .reconnect_adopting(info.clone(), warm_keys, running, owner, adopted)?;
    for (name, op) in watched {
        if let Some(id) = ids.remove(&name) {
            metrics::counter!("hearth_fleet_adopted_total").increment(1);
            // Its replica lost the executor (died, most likely): operators
            // want to see that.
            tracing::warn!(operation = %name, executor = %info.id, "adopted an action running on an executor that moved here");
            mirror(inner.clone(), name, id, op);
        }
    }
    Ok((session, rx))
}
