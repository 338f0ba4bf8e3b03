//! Each replica's advert of its executors, renewed every second with a short
//! life: the others read it to refuse actions no executor of the fleet can
//! run, and to leave work with a warm runner to the replica that holds it.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;

use crate::codec::{advert, decode_advert};
use crate::Inner;

/// An advert not renewed for this long is of a replica gone.
const ADVERT_TTL: Duration = Duration::from_secs(5);

pub async fn advert_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Err(e) = exchange(&inner).await {
            tracing::warn!(error = %e, "cannot exchange adverts with the other replicas");
        }
    }
}

/// Writes this replica's advert and reads the others'.
pub async fn exchange(inner: &Inner) -> redis::RedisResult<()> {
    let mut conn = inner.state.conn();
    let set = inner.state.channel("replicas");
    let ours = advert(inner.me(), &inner.scheduler.stats(None));
    let (ids, queued): (Vec<String>, u64) = redis::pipe()
        .cmd("SET")
        .arg(inner.state.key("replica", inner.me()))
        .arg(ours)
        .arg("PX")
        .arg(ADVERT_TTL.as_millis() as u64)
        .ignore()
        .sadd(&set, inner.me())
        .ignore()
        .smembers(&set)
        .zcard(inner.state.channel("queue"))
        .query_async(&mut conn)
        .await?;
    metrics::gauge!("hearth_fleet_queue_length").set(queued as f64);
    metrics::gauge!("hearth_fleet_held").set(inner.held_lock().len() as f64);
    let others: Vec<String> = ids.into_iter().filter(|id| id != inner.me()).collect();
    let mut fleet = vec![];
    if !others.is_empty() {
        let keys: Vec<String> = others
            .iter()
            .map(|id| inner.state.key("replica", id))
            .collect();
        let ads: Vec<Option<Vec<u8>>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        for (id, ad) in others.iter().zip(ads) {
            match ad.map(|b| decode_advert(&b)) {
                Some(Ok(r)) => fleet.push(r),
                Some(Err(e)) => {
                    tracing::warn!(replica = %id, error = %e, "ignoring a malformed advert")
                }
                None => {
                    let _: () = conn.srem(&set, id).await?;
                }
            }
        }
    }
    metrics::gauge!("hearth_fleet_replicas").set((fleet.len() + 1) as f64);
    *inner.fleet.write().unwrap_or_else(|p| p.into_inner()) = fleet;
    Ok(())
}
