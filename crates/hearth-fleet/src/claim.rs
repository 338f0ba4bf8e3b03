//! Taking work for this replica: from the shared queue while its executors
//! have free slots, and from other replicas when an executor arrives still
//! running their work.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hearth_scheduler::{Assignments, ConnectError, ExecutorInfo};
use redis::AsyncCommands;

use crate::codec::{decode_job, OpIdentity};
use crate::holder::{finish_held, mirror, run_here};
use crate::{code, failed, Inner, WARM_WAIT};

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
            // Quiet while Redis is away.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Jobs looked at per page, oldest first, and pages per pass: jobs no
/// executor here fits do not hide the ones behind them.
const CLAIM_PAGE: isize = 64;
const CLAIM_PAGES: isize = 16;

/// Redis's clock, in milliseconds (queue scores are on it).
async fn redis_now_ms(conn: &mut redis::aio::ConnectionManager) -> redis::RedisResult<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

async fn claim_some(inner: &Arc<Inner>) -> redis::RedisResult<()> {
    let mut conn = inner.state.conn();
    let mut page = 0;
    while page < CLAIM_PAGES && inner.scheduler.spare_slots() > 0 {
        let from = page * CLAIM_PAGE;
        let queued: Vec<(String, f64)> = conn
            .zrange_withscores(inner.state.channel("queue"), from, from + CLAIM_PAGE - 1)
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
        let now = redis_now_ms(&mut conn).await?;
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
            let affinity = job.affinity();
            let Some(warm) = inner.scheduler.fit(&job.platform, affinity.as_deref()) else {
                continue;
            };
            let young = now.saturating_sub(score as u64) < WARM_WAIT.as_millis() as u64;
            if !warm && young && affinity.as_deref().is_some_and(|k| inner.warm_elsewhere(k)) {
                continue;
            }
            let Some(claimed) = inner
                .state
                .claim(&name, inner.me(), inner.config.lease, None)
                .await?
            else {
                continue;
            };
            let id = OpIdentity::of(&job);
            if claimed.cancelled {
                finish_held(
                    inner,
                    &name,
                    &id,
                    code::CANCELLED,
                    "cancelled by the client",
                )
                .await;
                continue;
            }
            if !claimed.watched {
                // Its client went away while it waited (Bazel interrupted).
                let why = "abandoned: no client was waiting for it";
                finish_held(inner, &name, &id, code::CANCELLED, why).await;
                continue;
            }
            if claimed.tries > inner.config.max_attempts {
                let msg = format!(
                    "the replicas running this action went away {} times; giving up",
                    claimed.tries - 1
                );
                finish_held(inner, &name, &id, code::UNAVAILABLE, &msg).await;
                continue;
            }
            metrics::counter!("hearth_fleet_claimed_total").increment(1);
            tracing::debug!(operation = %name, tries = claimed.tries, "claimed from the shared queue");
            run_here(inner.clone(), name, id, job).await;
            took = true;
            if inner.scheduler.spare_slots() == 0 {
                return Ok(());
            }
        }
        // What was taken shifted the rest up: look at the same page again.
        if !took {
            page += 1;
        }
    }
    Ok(())
}

/// Ends a queued operation with an error (malformed, timed out).
async fn fail_queued(inner: &Inner, name: &str, code: i32, msg: &str) {
    let Ok(Some((id, snap))) = inner.read_op(name).await else {
        // Nothing to tell anyone; just take it out.
        let mut conn = inner.state.conn();
        let _: redis::RedisResult<()> = conn.zrem(inner.state.channel("queue"), name).await;
        return;
    };
    if let Err(e) = inner
        .finish(name, None, &id, &failed(snap, code, msg))
        .await
    {
        tracing::warn!(operation = name, error = %e, "cannot fail a queued operation");
    }
}

/// Fails jobs queued for longer than the queue timeout.
pub async fn time_out_queued(inner: &Inner) -> redis::RedisResult<()> {
    let msg = format!(
        "no executor took this action within the queue timeout of {}s",
        inner.config.queue_timeout.as_secs()
    );
    for name in inner.state.overdue(inner.config.queue_timeout).await? {
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
            Ok(Some(claimed)) => match decode_job(name, &claimed.job) {
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
    // The other replicas learn of it now, not at the next advert.
    let advertise = inner.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::replicas::exchange(&advertise).await {
            tracing::warn!(error = %e, "cannot advertise a new executor");
        }
    });
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
