//! A local disk tier in front of a slow, durable one (an object store):
//! reads are served from disk, filling it from the slow tier on a miss;
//! writes go to both, and succeed only once the slow tier has the blob.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use tokio::io::AsyncWriteExt;

use crate::error::IoContext;
use crate::store::{BlobSource, BlobStream};
use crate::{BlobStore, Digest, DiskStore, StoreError, StoreResult};

/// Blobs up to this size are filled through memory; bigger ones through a
/// staging file.
const FILL_IN_MEMORY: u64 = 4 * 1024 * 1024;

pub struct FastSlow {
    fast: Arc<DiskStore>,
    slow: Arc<dyn BlobStore>,
    /// One fill per blob at a time; the others wait for it.
    fills: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl FastSlow {
    pub fn new(fast: Arc<DiskStore>, slow: Arc<dyn BlobStore>) -> Self {
        FastSlow {
            fast,
            slow,
            fills: Mutex::default(),
        }
    }

    /// Copies a blob from the slow tier into the fast one (the fast tier
    /// checks it against the digest on the way in).
    async fn fill(&self, d: &Digest) -> StoreResult<()> {
        let gate = {
            let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
            fills.entry(*d).or_default().clone()
        };
        let filled = async {
            let _turn = gate.lock().await;
            if self.fast.contains(d) {
                return Ok(());
            }
            copy_into_disk(self.slow.as_ref(), &self.fast, d).await
        }
        .await;
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&gate) <= 2 {
            fills.remove(d);
        }
        filled
    }
}

/// Copies `d` from `from` into the disk store `to` (which checks it), through
/// memory when small, else through a staging file.
pub async fn copy_into_disk(from: &dyn BlobStore, to: &DiskStore, d: &Digest) -> StoreResult<()> {
    if d.size() <= FILL_IN_MEMORY {
        let data = from.read(d, 0, None).await?;
        return to.put(d, data).await;
    }
    let path = to.staging_file();
    let written = async {
        let mut file = tokio::fs::File::create(&path)
            .await
            .ctx(|| format!("creating {}", path.display()))?;
        let mut chunks = from.read_stream(d, 0, None).await?;
        while let Some(chunk) = chunks.try_next().await? {
            file.write_all(&chunk)
                .await
                .ctx(|| format!("writing {}", path.display()))?;
        }
        file.flush()
            .await
            .ctx(|| format!("writing {}", path.display()))
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e);
    }
    to.adopt_file(d, &path).await
}

#[async_trait]
impl BlobStore for FastSlow {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        // What this server's disk holds it can serve; only the rest needs
        // the slow tier's answer.
        let unknown = self.fast.find_missing(digests).await?;
        if unknown.is_empty() {
            return Ok(unknown);
        }
        self.slow.find_missing(&unknown).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        match self.fast.read(digest, offset, limit).await {
            Err(StoreError::NotFound(_)) => {
                self.fill(digest).await?;
                self.fast.read(digest, offset, limit).await
            }
            other => other,
        }
    }

    async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<BlobStream> {
        match self.fast.read_stream(digest, offset, limit).await {
            Err(StoreError::NotFound(_)) => {
                self.fill(digest).await?;
                self.fast.read_stream(digest, offset, limit).await
            }
            other => other,
        }
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        match source {
            BlobSource::Bytes(data) => {
                let slow = BlobSource::Bytes(data.clone());
                tokio::try_join!(
                    self.fast.write(digest, BlobSource::Bytes(data)),
                    self.slow.write(digest, slow)
                )?;
            }
            BlobSource::File(path) => {
                // The disk tier takes the file (a rename); the slow tier
                // gets a link to what it stored.
                self.fast.adopt_file(digest, &path).await?;
                let link = self.fast.link_out(digest).await?;
                self.slow.write(digest, BlobSource::File(link)).await?;
            }
        }
        Ok(())
    }
}
