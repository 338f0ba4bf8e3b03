//! Blob ownership in Redis, shared by every replica that names the same
//! `--state`: one key per (tenant, blob), `PREFIX:own:<tenant hash>:<blob>`,
//! that lives as long as action-cache entries do and is renewed by every
//! grant. As with [`crate::Owners`], a record that is lost (expired,
//! evicted) only hides a blob from its tenant, which uploads it again; a
//! missing key never reveals one.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use sha2::{Digest as _, Sha256};

use crate::owners::Ownership;
use crate::redis_ac::{backend, connect_redis};
use crate::{Digest, StoreResult};

pub struct RedisOwners {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
}

impl RedisOwners {
    /// Connects to `url`; keys start with `prefix`, and a grant lives `ttl`.
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> StoreResult<Self> {
        Ok(RedisOwners {
            conn: connect_redis(url).await?,
            prefix: prefix.to_string(),
            ttl,
        })
    }

    fn key(&self, tenant_hash: &str, d: &Digest) -> String {
        format!(
            "{}own:{tenant_hash}:{}-{}",
            self.prefix,
            d.hash_hex(),
            d.size()
        )
    }
}

/// Tenant names are the operator's (any length, any bytes): keys hold a
/// hash of them.
fn tenant_hash(tenant: &str) -> String {
    hex::encode(&Sha256::digest(tenant.as_bytes())[..16])
}

#[async_trait]
impl Ownership for RedisOwners {
    async fn partition(
        &self,
        tenant: &str,
        digests: &[Digest],
    ) -> StoreResult<(Vec<Digest>, Vec<Digest>)> {
        // Everyone may read the empty blob.
        let asked: Vec<&Digest> = digests.iter().filter(|d| !d.is_empty_blob()).collect();
        if asked.is_empty() {
            return Ok((digests.to_vec(), vec![]));
        }
        let t = tenant_hash(tenant);
        let keys: Vec<String> = asked.iter().map(|d| self.key(&t, d)).collect();
        let found: Vec<Option<u8>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| backend(format!("reading blob ownership of {} blobs", keys.len()), e))?;
        let hidden: std::collections::HashSet<&Digest> = asked
            .iter()
            .zip(found)
            .filter(|(_, f)| f.is_none())
            .map(|(d, _)| *d)
            .collect();
        Ok(digests.iter().partition(|d| !hidden.contains(d)))
    }

    async fn grant(&self, tenant: &str, digests: &[Digest]) -> StoreResult<()> {
        if digests.is_empty() {
            return Ok(());
        }
        let t = tenant_hash(tenant);
        let mut pipe = redis::pipe();
        for d in digests {
            pipe.cmd("SET")
                .arg(self.key(&t, d))
                .arg(1)
                .arg("EX")
                .arg(self.ttl.as_secs().max(1))
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| backend(format!("recording ownership of {} blobs", digests.len()), e))
    }
}
