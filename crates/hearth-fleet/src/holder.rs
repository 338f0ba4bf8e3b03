//! The work this replica holds: mirroring its operations to Redis, keeping
//! their leases, letting go of what it can no longer run, and putting back
//! in the queue the work of replicas whose leases lapsed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hearth_scheduler::{Job, OpSnapshot, Stage};
use tokio::sync::watch;

use crate::codec::{encode_op, OpIdentity};
use crate::scripts::Renewal;
use crate::{failed, Inner};

/// A job taken here that no executor here starts within this long goes
/// back to the shared queue for another replica.
const START_WITHIN: Duration = Duration::from_secs(2);

/// Hands a job this replica holds to its scheduler and mirrors its
/// operation; a scheduler that can no longer run it puts it back.
pub async fn run_here(inner: Arc<Inner>, name: String, id: OpIdentity, mut job: Job) {
    // Identical requests were joined in Redis already.
    job.shareable = false;
    match inner.scheduler.submit_named(name.clone(), job) {
        Ok(rx) => mirror(inner, name, id, rx),
        Err(e) => {
            tracing::info!(operation = %name, error = %e, "cannot run it here after all; back to the queue");
            release(&inner, &name).await;
        }
    }
}

async fn release(inner: &Inner, name: &str) {
    if let Err(e) = inner.state.release(name, inner.me()).await {
        tracing::warn!(operation = %name, error = %e, "cannot put it back in the queue; its lease will lapse");
    }
}

/// Publishes each state of a held operation until it completes or another
/// replica takes it over.
pub fn mirror(inner: Arc<Inner>, name: String, id: OpIdentity, rx: watch::Receiver<OpSnapshot>) {
    let mut held = inner.held_lock();
    let task = tokio::spawn(mirror_task(inner.clone(), name.clone(), id, rx));
    if let Some(old) = held.insert(name, task.abort_handle()) {
        old.abort();
    }
}

impl Inner {
    pub(crate) fn held_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, tokio::task::AbortHandle>>
    {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets a held operation, if the calling mirror task is still the
    /// one holding it (a later claim of the same name has its own).
    fn unhold(&self, name: &str) {
        let me = tokio::task::try_id();
        let mut held = self.held_lock();
        if held.get(name).is_some_and(|t| Some(t.id()) == me) {
            held.remove(name);
        }
    }
}

async fn mirror_task(
    inner: Arc<Inner>,
    name: String,
    id: OpIdentity,
    mut rx: watch::Receiver<OpSnapshot>,
) {
    loop {
        let mut snap = rx.borrow_and_update().clone();
        snap.name = name.clone();
        if snap.stage == Stage::Queued {
            // Not started, or its executor here went away: if nothing here
            // starts it soon, any replica may run it.
            let started =
                tokio::time::timeout(START_WITHIN, rx.wait_for(|s| s.stage != Stage::Queued))
                    .await
                    .map(|r| r.is_ok());
            match started {
                Ok(true) => continue,
                // The operation is gone here.
                Ok(false) => break,
                Err(_) if inner.scheduler.withdraw(&name) => {
                    tracing::info!(operation = %name, "no executor here runs it; back to the shared queue");
                    inner.unhold(&name);
                    release(&inner, &name).await;
                    return;
                }
                Err(_) => continue,
            }
        }
        let done = snap.stage == Stage::Completed;
        if !publish(&inner, &name, &id, &snap, done).await {
            tracing::warn!(operation = %name, "another replica holds this operation now; stopping it here");
            inner.unhold(&name);
            inner
                .scheduler
                .cancel_because(&name, "another replica runs it now");
            return;
        }
        inner.watches.deliver(snap);
        if done || rx.changed().await.is_err() {
            break;
        }
    }
    inner.unhold(&name);
}

/// Writes one state of a held operation; false if this replica no longer
/// holds it. The state must land (a client waits on it): retried while
/// Redis is away.
async fn publish(
    inner: &Inner,
    name: &str,
    id: &OpIdentity,
    snap: &OpSnapshot,
    done: bool,
) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        let r = if done {
            inner.finish(name, Some(inner.me()), id, snap).await
        } else {
            let runner = inner.scheduler.runner_of(name);
            inner
                .state
                .update(name, inner.me(), &encode_op(id, snap), runner.as_deref())
                .await
        };
        match r {
            Ok(kept) => return kept,
            Err(e) => {
                tracing::warn!(operation = %name, error = %e, "cannot publish the operation's state; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Ends an operation this replica holds with an error.
pub async fn finish_held(inner: &Inner, name: &str, id: &OpIdentity, code: i32, msg: &str) {
    let snap = OpSnapshot {
        name: name.to_string(),
        action_digest: id.action_digest,
        stage: Stage::Queued,
        response: None,
    };
    let done = failed(snap, code, msg);
    if let Err(e) = inner.finish(name, Some(inner.me()), id, &done).await {
        tracing::warn!(operation = name, error = %e, "cannot fail an operation");
    }
}

/// Renews this replica's leases every fifth of the lease: cancels what no
/// client has watched at two renewals in a row (one miss may be a Redis
/// hiccup), and drops what another replica took over.
pub async fn renew_loop(inner: Arc<Inner>) {
    let mut unwatched: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(inner.config.lease / 5).await;
        match keep_leases(&inner, &unwatched).await {
            Ok(now_unwatched) => unwatched = now_unwatched,
            Err(e) => {
                unwatched.clear();
                tracing::warn!(error = %e, "cannot renew leases; they lapse in {:?}", inner.config.lease);
            }
        }
    }
}

async fn keep_leases(
    inner: &Arc<Inner>,
    unwatched_before: &HashSet<String>,
) -> redis::RedisResult<HashSet<String>> {
    let names: Vec<String> = inner.held_lock().keys().cloned().collect();
    let renewals = inner
        .state
        .renew(inner.me(), inner.config.lease, &names)
        .await?;
    let mut unwatched = HashSet::new();
    for (name, r) in names.into_iter().zip(renewals) {
        match r {
            Renewal::Watched => {}
            Renewal::Cancelled => {
                tracing::info!(operation = %name, "cancelled through another replica");
                inner
                    .scheduler
                    .cancel_because(&name, "cancelled by the client");
            }
            Renewal::Unwatched if unwatched_before.contains(&name) => {
                tracing::info!(operation = %name, "no client watches it on any replica; cancelling it");
                inner
                    .scheduler
                    .cancel_because(&name, "abandoned: no client was waiting for it");
            }
            Renewal::Unwatched => {
                unwatched.insert(name);
            }
            Renewal::Lost => {
                // Finished meanwhile (its mirror let go), or taken over.
                let Some(task) = inner.held_lock().remove(&name) else {
                    continue;
                };
                tracing::warn!(operation = %name, "lost its lease to another replica; stopping it here");
                task.abort();
                inner
                    .scheduler
                    .cancel_because(&name, "another replica runs it now");
            }
        }
    }
    Ok(unwatched)
}

/// Puts the work of lapsed leases back in the queue and fails work queued
/// too long, every fifth of the lease.
pub async fn reap_loop(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.config.lease / 5).await;
        // A lease is reaped a lease after it lapsed: holders cut off from
        // Redis get that long to renew once it is back.
        match inner.state.reap(inner.config.lease).await {
            Ok(names) => {
                for name in names {
                    metrics::counter!("hearth_fleet_requeued_total").increment(1);
                    tracing::warn!(operation = %name, "its replica's lease lapsed; back in the queue");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reap lapsed leases"),
        }
        if let Err(e) = crate::claim::time_out_queued(&inner).await {
            tracing::warn!(error = %e, "cannot time out queued actions");
        }
    }
}
