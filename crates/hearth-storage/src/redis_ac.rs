//! The action cache in Redis, shared by every server replica that names the
//! same `--state`: one key per entry (`PREFIX:ac:<key hex>`), the encoded
//! ActionResult as its value, with a time to live that every hit renews
//! (GETEX), so entries nobody reads expire and the ones in use stay.

use std::time::Duration;

use async_trait::async_trait;
use hearth_proto::reapi::ActionResult;
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::{ActionCache, Digest, StoreError, StoreResult};

pub struct RedisActionCache {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
}

impl RedisActionCache {
    /// Connects to `url` (`redis://HOST:PORT/DB`); keys start with `prefix`.
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> StoreResult<Self> {
        let conn = connect_redis(url).await?;
        Ok(RedisActionCache {
            conn,
            prefix: prefix.to_string(),
            ttl,
        })
    }

    fn key(&self, action: &Digest) -> String {
        format!("{}ac:{}-{}", self.prefix, action.hash_hex(), action.size())
    }
}

/// A connection to `url` that reconnects on its own, with 5 s connect and
/// response timeouts: a Redis that hangs must not hang the calls waiting
/// on it.
pub async fn connect_redis(url: &str) -> StoreResult<ConnectionManager> {
    let client = redis::Client::open(url).map_err(|e| backend(format!("Redis URL {url:?}"), e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| backend(format!("connecting to Redis at {url}"), e))
}

pub(crate) fn backend(context: String, e: redis::RedisError) -> StoreError {
    StoreError::Backend {
        context,
        message: e.to_string(),
    }
}

#[async_trait]
impl ActionCache for RedisActionCache {
    async fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = conn
            .get_ex(self.key(action), redis::Expiry::EX(self.ttl.as_secs()))
            .await
            .map_err(|e| backend(format!("reading action result {action}"), e))?;
        let Some(bytes) = value else {
            return Ok(None);
        };
        match ActionResult::decode(bytes.as_slice()) {
            Ok(result) => Ok(Some(result)),
            Err(e) => {
                // Not ours to trust: drop it and report a miss.
                tracing::error!(action = %action, error = %e, "undecodable action result in Redis; dropping it");
                let _: Result<(), _> = conn.del(self.key(action)).await;
                Ok(None)
            }
        }
    }

    async fn put(&self, action: &Digest, result: &ActionResult) -> StoreResult<()> {
        // Bounded by the largest gRPC message the server accepts.
        let bytes = result.encode_to_vec();
        let mut conn = self.conn.clone();
        conn.set_ex::<_, _, ()>(self.key(action), bytes, self.ttl.as_secs())
            .await
            .map_err(|e| backend(format!("storing action result {action}"), e))
    }

    async fn remove(&self, action: &Digest) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(self.key(action))
            .await
            .map_err(|e| backend(format!("removing action result {action}"), e))
    }
}
