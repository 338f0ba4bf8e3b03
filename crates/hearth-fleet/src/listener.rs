//! Following the shared state: the `ops`, `wake` and `cancel` channels, and
//! a poll of the watched operations (pub/sub drops messages while its
//! connection is down) that also keeps their `watch:` keys alive.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::codec::decode_op;
use crate::Inner;

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
    loop {
        tick.tick().await;
        let names = inner.watches.watched();
        if names.is_empty() {
            continue;
        }
        if let Err(e) = poll(&inner, &names).await {
            tracing::warn!(error = %e, "cannot poll watched operations");
        }
    }
}

async fn poll(inner: &Inner, names: &[String]) -> redis::RedisResult<()> {
    let mut conn = inner.state.conn();
    let mut pipe = redis::pipe();
    let ttl = inner.config.abandon_unwatched.as_millis() as u64;
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
    for bytes in ops.into_iter().flatten() {
        if let Ok((_, snap)) = decode_op(&bytes) {
            inner.watches.deliver(snap);
        }
    }
    Ok(())
}
