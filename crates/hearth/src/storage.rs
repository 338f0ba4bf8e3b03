//! The CAS as `--cas-store` asks for it, assembled in plain view: the disk
//! store alone, or the disk store as a cache tier in front of an object
//! store with an existence cache (see `docs/design.md`, "Storage").

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use hearth_storage::{
    ActionCache, BlobStore, DiskActionCache, DiskStore, ExistenceCache, FastSlow, Metered,
    ObjectBlobStore, Owners, Ownership, RedisActionCache, RedisOwners,
};

/// How long the object tier's existence cache trusts a "present".
const EXISTENCE_TTL: Duration = Duration::from_secs(300);
/// Digests it remembers at most (about 70 bytes each).
const EXISTENCE_ENTRIES: usize = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasStore {
    Disk,
    S3 { bucket: String, prefix: String },
}

impl CasStore {
    pub fn parse(text: &str) -> Result<CasStore, String> {
        if text == "disk" {
            return Ok(CasStore::Disk);
        }
        let Some(rest) = text.strip_prefix("s3://") else {
            return Err(format!(
                "{text:?} is not a CAS store: use `disk` or `s3://BUCKET/PREFIX`"
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{text:?} names no bucket"));
        }
        Ok(CasStore::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }
}

/// Where shared state lives: in this process (and its data directory), or
/// in Redis, shared by every replica that names the same database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateStore {
    Embedded,
    Redis(String),
}

impl StateStore {
    pub fn parse(text: &str) -> Result<StateStore, String> {
        if text == "embedded" {
            return Ok(StateStore::Embedded);
        }
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            return Ok(StateStore::Redis(text.to_string()));
        }
        Err(format!(
            "{text:?} is not a state store: use `embedded` or `redis://HOST:PORT/DB`"
        ))
    }
}

/// The action cache where `--state` puts it; the disk one is also handed
/// back for its gauges.
pub async fn open_action_cache(
    data_dir: &std::path::Path,
    max_bytes: u64,
    state: &StateStore,
    ttl: Duration,
) -> Result<(Arc<dyn ActionCache>, Option<Arc<DiskActionCache>>)> {
    match state {
        StateStore::Embedded => {
            let ac = Arc::new(
                DiskActionCache::open(data_dir, max_bytes).context("opening the action cache")?,
            );
            Ok((ac.clone(), Some(ac)))
        }
        StateStore::Redis(url) => {
            let ac = RedisActionCache::connect(url, REDIS_PREFIX, ttl)
                .await
                .context("opening the action cache in Redis")?;
            tracing::info!(url = %redact(url), "action cache in Redis");
            Ok((Arc::new(ac), None))
        }
    }
}

/// Who may read which blob (with `--auth-keys`): on the local disk, or in
/// Redis beside the action cache, where grants live as long as its entries.
pub async fn open_owners(
    data_dir: &std::path::Path,
    state: &StateStore,
    ttl: Duration,
) -> Result<Arc<dyn Ownership>> {
    Ok(match state {
        StateStore::Embedded => {
            Arc::new(Owners::open(data_dir).context("opening the blob ownership index")?)
        }
        StateStore::Redis(url) => Arc::new(
            RedisOwners::connect(url, REDIS_PREFIX, ttl)
                .await
                .context("opening the blob ownership index in Redis")?,
        ),
    })
}

/// Keys Hearth writes in a Redis database start with this.
const REDIS_PREFIX: &str = "hearth:";

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Where the S3 bucket is and how to sign in; each falls back to the
/// standard `AWS_*` variable (as any S3 tool reads them), and all of them
/// can be set in the `--config` file.
#[derive(Args, Debug, Clone, Default)]
pub struct S3Options {
    /// S3 endpoint URL (for non-AWS servers).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    pub s3_region: Option<String>,
    #[arg(long, env = "AWS_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Allow a plain-HTTP endpoint.
    #[arg(long, env = "AWS_ALLOW_HTTP")]
    pub s3_allow_http: Option<bool>,
}

/// The stores a server works with.
pub struct Storage {
    /// The local disk store: the whole CAS, or the cache tier.
    pub disk: Arc<DiskStore>,
    /// What the services read and write.
    pub cas: Arc<dyn BlobStore>,
    /// The durable tier behind the disk, when there is one.
    pub slow: Option<Arc<dyn BlobStore>>,
}

pub fn open(
    data_dir: &std::path::Path,
    max_bytes: u64,
    kind: &CasStore,
    s3: &S3Options,
) -> Result<Storage> {
    let disk = Arc::new(
        DiskStore::open(data_dir, max_bytes)
            .with_context(|| format!("opening the CAS in {}", data_dir.display()))?,
    );
    match kind {
        CasStore::Disk => Ok(Storage {
            cas: disk.clone(),
            disk,
            slow: None,
        }),
        CasStore::S3 { bucket, prefix } => {
            let bucket_store = s3_bucket(bucket, s3)?;
            let objects: Arc<dyn BlobStore> = Arc::new(Metered::new(
                Arc::new(ObjectBlobStore::new(Arc::new(bucket_store), prefix)),
                "s3",
            ));
            let slow: Arc<dyn BlobStore> = Arc::new(ExistenceCache::new(
                objects,
                EXISTENCE_TTL,
                EXISTENCE_ENTRIES,
            ));
            tracing::info!(
                bucket,
                prefix,
                "CAS in S3, with the disk store as its cache"
            );
            Ok(Storage {
                cas: Arc::new(FastSlow::new(disk.clone(), slow.clone())),
                disk,
                slow: Some(slow),
            })
        }
    }
}

fn s3_bucket(bucket: &str, o: &S3Options) -> Result<object_store::aws::AmazonS3> {
    let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(v) = &o.s3_endpoint {
        b = b.with_endpoint(v);
    }
    if let Some(v) = &o.s3_region {
        b = b.with_region(v);
    }
    if let Some(v) = &o.s3_access_key_id {
        b = b.with_access_key_id(v);
    }
    if let Some(v) = &o.s3_secret_access_key {
        b = b.with_secret_access_key(v);
    }
    if let Some(v) = o.s3_allow_http {
        b = b.with_allow_http(v);
    }
    match b.build() {
        Ok(s3) => Ok(s3),
        Err(e) => bail!("configuring S3 bucket {bucket:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_store_urls() {
        assert_eq!(CasStore::parse("disk"), Ok(CasStore::Disk));
        assert_eq!(
            CasStore::parse("s3://b/team/cas/"),
            Ok(CasStore::S3 {
                bucket: "b".into(),
                prefix: "team/cas".into()
            })
        );
        assert_eq!(
            CasStore::parse("s3://b"),
            Ok(CasStore::S3 {
                bucket: "b".into(),
                prefix: String::new()
            })
        );
        assert!(CasStore::parse("s3:///x").is_err());
        assert!(CasStore::parse("gs://b").is_err());
    }

    #[test]
    fn state_urls_and_their_passwords() {
        assert_eq!(StateStore::parse("embedded"), Ok(StateStore::Embedded));
        assert_eq!(
            StateStore::parse("redis://h:6379/2"),
            Ok(StateStore::Redis("redis://h:6379/2".into()))
        );
        assert!(StateStore::parse("mysql://h").is_err());
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://…@h:6379/0");
        assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
    }
}
