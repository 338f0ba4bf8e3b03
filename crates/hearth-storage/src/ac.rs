//! The action cache: action digest → ActionResult.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use hearth_proto::reapi::ActionResult;
use prost::Message;

use crate::error::IoContext;
use crate::{Digest, StoreResult};

#[async_trait]
pub trait ActionCache: Send + Sync + 'static {
    async fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>>;
    async fn put(&self, action: &Digest, result: &ActionResult) -> StoreResult<()>;
    /// Forgets an entry (e.g. one whose outputs were evicted from the CAS).
    async fn remove(&self, action: &Digest) -> StoreResult<()>;
}

#[derive(Default)]
pub struct MemoryActionCache {
    entries: Mutex<HashMap<Digest, ActionResult>>,
}

#[async_trait]
impl ActionCache for MemoryActionCache {
    async fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>> {
        Ok(self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(action)
            .cloned())
    }

    async fn put(&self, action: &Digest, result: &ActionResult) -> StoreResult<()> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*action, result.clone());
        Ok(())
    }

    async fn remove(&self, action: &Digest) -> StoreResult<()> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(action);
        Ok(())
    }
}

/// One file per entry under `ac/`, replaced atomically.
pub struct DiskActionCache {
    dir: PathBuf,
    staging: PathBuf,
}

impl DiskActionCache {
    pub fn open(root: &Path) -> StoreResult<Self> {
        let dir = root.join("ac");
        let staging = root.join("ac-staging");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).ctx(|| format!("creating {}", staging.display()))?;
        Ok(DiskActionCache { dir, staging })
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{}-{}", d.hash_hex(), d.size()))
    }
}

#[async_trait]
impl ActionCache for DiskActionCache {
    async fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>> {
        let path = self.path_of(action);
        match fs::read(&path) {
            Ok(bytes) => match ActionResult::decode(bytes.as_slice()) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "dropping undecodable action cache entry");
                    let _ = fs::remove_file(&path);
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(crate::StoreError::io(
                format!("reading {}", path.display()),
                e,
            )),
        }
    }

    async fn put(&self, action: &Digest, result: &ActionResult) -> StoreResult<()> {
        let staged = self.staging.join(uuid::Uuid::new_v4().to_string());
        let target = self.path_of(action);
        let write = fs::File::create(&staged)
            .and_then(|mut f| f.write_all(&result.encode_to_vec()))
            .and_then(|_| fs::rename(&staged, &target))
            .ctx(|| format!("writing {}", target.display()));
        if write.is_err() {
            let _ = fs::remove_file(&staged);
        }
        write
    }

    async fn remove(&self, action: &Digest) -> StoreResult<()> {
        let _ = fs::remove_file(self.path_of(action));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn disk_ac_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = Digest::of(b"action");
        let result = ActionResult {
            exit_code: 3,
            ..Default::default()
        };
        {
            let ac = DiskActionCache::open(dir.path()).unwrap();
            assert!(ac.get(&key).await.unwrap().is_none());
            ac.put(&key, &result).await.unwrap();
        }
        let ac = DiskActionCache::open(dir.path()).unwrap();
        assert_eq!(ac.get(&key).await.unwrap(), Some(result));
        ac.remove(&key).await.unwrap();
        assert!(ac.get(&key).await.unwrap().is_none());
    }
}
