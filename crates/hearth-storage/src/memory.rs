use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::IoContext;
use crate::store::{clamp_range, BlobSource, Occupancy};
use crate::{BlobStore, Digest, StoreError, StoreResult, StoreStats};

/// An unbounded in-memory store, for tests and throwaway servers.
pub struct MemoryStore {
    blobs: Mutex<HashMap<[u8; 32], Bytes>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            blobs: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Bytes>> {
        self.blobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn verify(digest: &Digest, data: &[u8]) -> StoreResult<()> {
    StoreError::check_digest(digest, Digest::of(data))
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        let blobs = self.lock();
        Ok(digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !blobs.contains_key(d.hash()))
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        if digest.is_empty_blob() {
            clamp_range(digest, 0, offset, limit)?;
            return Ok(Bytes::new());
        }
        let data = self
            .lock()
            .get(digest.hash())
            .cloned()
            .ok_or(StoreError::NotFound(*digest))?;
        let (start, len) = clamp_range(digest, data.len() as u64, offset, limit)?;
        Ok(data.slice(start as usize..(start + len) as usize))
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        let data = match source {
            BlobSource::Bytes(data) => data,
            BlobSource::File(file) => {
                let path = file.path();
                let read = tokio::fs::read(path)
                    .await
                    .ctx(|| format!("reading {}", path.display()));
                file.remove().await;
                Bytes::from(read?)
            }
        };
        verify(digest, &data)?;
        self.lock().insert(*digest.hash(), data);
        Ok(())
    }
}

impl Occupancy for MemoryStore {
    fn stats(&self) -> StoreStats {
        let blobs = self.lock();
        StoreStats {
            bytes: blobs.values().map(|b| b.len() as u64).sum(),
            blobs: blobs.len() as u64,
            limit_bytes: 0,
        }
    }
}
