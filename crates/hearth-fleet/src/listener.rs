//! Following the shared state: the `ops`, `wake` and `cancel` channels, and
//! a poll of the watched operations (pub/sub drops messages while its
//! connection is down) that also keeps their `watch:` keys alive.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::codec::decode_op;
use crate::{code, Inner};

pub async fn run(inner: Arc<Inner>) {
    loop {
        if let Err(e) = listen(&inner).await {
            tracing::warn!(error = %e, "lost the shared state's channels; reconnecting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen(inner: &Inner) -> redis::RedisResult<()> {
    let mut pubsub = inner.client.get_async_pubsub().await?;
    let (ops, wake, cancel) = (
        inner.state.channel("ops"),
        inner.state.channel("wake"),
        inner.state.channel("cancel"),
    );
    pubsub.subscribe(&[&ops, &wake, &cancel]).await?;
    // Work queued while the channel was down.
    inner.wake.notify_one();
    let mut messages = pubsub.into_on_message();
    while let Some(msg) = messages.next().await {
        let channel = msg.get_channel_name();
        if channel == wake {
            inner.wake.notify_one();
        } else if channel == ops {
            match decode_op(msg.get_payload_bytes()) {
                Ok((_, snap)) => inner.watches.deliver(snap),
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed operation message"),
            }
        } else if channel == cancel {
            let name = String::from_utf8_lossy(msg.get_payload_bytes());
            if inner.held_lock().contains_key(name.as_ref()) {
                tracing::info!(operation = %name, "cancelled through another replica");
                inner.scheduler.cancel(&name, None);
            }
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Io,
        "the subscription ended",
    )))
}

/// Every second: re-reads the operations clients here watch, and marks them
/// watched for the replicas that run them.
pub async fn poll_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut missing = HashSet::new();
    loop {
        tick.tick().await;
        let names = inner.watches.watched();
        if names.is_empty() {
            continue;
        }
        match poll(&inner, &names, &missing).await {
            Ok(now_missing) => missing = now_missing,
            Err(e) => tracing::warn!(error = %e, "cannot poll watched operations"),
        }
    }
}

/// Returns the operations whose records are missing; one missing at two
/// polls in a row is gone (Redis lost it, or it expired), and its watchers
/// are told so rather than left waiting.
async fn poll(
    inner: &Inner,
    names: &[String],
    missing_before: &HashSet<String>,
) -> redis::RedisResult<HashSet<String>> {
    let mut conn = inner.state.conn();
    let mut pipe = redis::pipe();
    let ttl = inner.watch_ttl().as_millis() as u64;
    for name in names {
        pipe.cmd("SET")
            .arg(inner.state.key("watch", name))
            .arg(1)
            .arg("PX")
            .arg(ttl)
            .ignore();
    }
    pipe.cmd("MGET").arg(
        names
            .iter()
            .map(|n| inner.state.key("op", n))
            .collect::<Vec<_>>(),
    );
    let (ops,): (Vec<Option<Vec<u8>>>,) = pipe.query_async(&mut conn).await?;
    let mut missing = HashSet::new();
    for (name, bytes) in names.iter().zip(ops) {
        match bytes.map(|b| decode_op(&b)) {
            Some(Ok((_, snap))) if snap.name == *name => inner.watches.deliver(snap),
            Some(_) => tracing::warn!(operation = %name, "ignoring a malformed operation record"),
            None if missing_before.contains(name) => {
                tracing::warn!(operation = %name, "its record is gone from the shared state");
                inner.watches.fail(
                    name,
                    code::UNAVAILABLE,
                    "the operation's record is gone from the shared state (Redis lost or \
                     evicted it); execute the action again",
                );
            }
            None => {
                missing.insert(name.clone());
            }
        }
    }
    Ok(missing)
}
