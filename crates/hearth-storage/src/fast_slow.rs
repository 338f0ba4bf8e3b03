//! A local disk tier in front of a slow, durable one (an object store):
//! reads are served from disk, filling it from the slow tier on a miss;
//! writes go to the slow tier first and succeed once it has the blob, then
//! to the disk. FindMissingBlobs asks the slow tier (an existence cache in
//! front of it keeps that cheap), so a blob only this disk holds is never
//! reported present to a client that other replicas serve too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use tokio::io::AsyncWriteExt;

use crate::disk::blocking;
use crate::error::IoContext;
use crate::store::{BlobSource, BlobStream};
use crate::{BlobStore, Digest, DiskStore, PinGuard, StagedFile, StoreError, StoreResult};

/// Blobs up to this size are filled through memory; bigger ones through a
/// staging file.
const FILL_IN_MEMORY: u64 = 4 * 1024 * 1024;

type Gates = Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>;

pub struct FastSlow {
    fast: Arc<DiskStore>,
    slow: Arc<dyn BlobStore>,
    /// One fill per blob at a time; the others wait for it.
    fills: Gates,
}

/// A turn at filling one digest; its entry leaves the map with the last
/// turn, however the turn ends (a dropped read included).
struct FillTurn<'a> {
    fills: &'a Gates,
    digest: Digest,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> FillTurn<'a> {
    fn new(fills: &'a Gates, digest: Digest) -> Self {
        let gate = lock(fills).entry(digest).or_default().clone();
        FillTurn {
            fills,
            digest,
            gate,
        }
    }
}

impl Drop for FillTurn<'_> {
    fn drop(&mut self) {
        // Under the map's lock nobody takes a new turn: a count of two is
        // the map's and this one's, so this is the last.
        let mut fills = lock(self.fills);
        if Arc::strong_count(&self.gate) == 2 {
            fills.remove(&self.digest);
        }
    }
}

fn lock(fills: &Gates) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<tokio::sync::Mutex<()>>>> {
    fills.lock().unwrap_or_else(|p| p.into_inner())
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
        let turn = FillTurn::new(&self.fills, *d);
        let _filling = turn.gate.lock().await;
        if self.fast.contains(d) {
            return Ok(());
        }
        copy_into_disk(self.slow.as_ref(), &self.fast, d).await
    }

    /// Keeps `d` on disk from its fill until it has been opened (a blob
    /// bigger than the disk tier's room would otherwise go at once).
    fn pin(&self, d: &Digest) -> PinGuard {
        PinGuard::new(self.fast.clone(), vec![*d])
    }
}

/// Copies `d` from `from` into the disk store `to` (which checks it), through
/// memory when small, else through a staging file.
pub async fn copy_into_disk(from: &dyn BlobStore, to: &DiskStore, d: &Digest) -> StoreResult<()> {
    if d.size() <= FILL_IN_MEMORY {
        let data = from.read(d, 0, None).await?;
        return to.put(d, data).await;
    }
    // Removed if the copy stops half-way, dropped or failed.
    let staged = StagedFile::new(to.staging_file());
    let path = staged.path().to_path_buf();
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
        .ctx(|| format!("writing {}", path.display()))?;
    drop(file);
    to.adopt(d, staged).await
}

#[async_trait]
impl BlobStore for FastSlow {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        self.slow.find_missing(digests).await
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        match self.fast.read(digest, offset, limit).await {
            Err(StoreError::NotFound(_)) => {
                let _pinned = self.pin(digest);
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
                // Pinned until the file is open; an open file outlives its
                // eviction.
                let _pinned = self.pin(digest);
                self.fill(digest).await?;
                self.fast.read_stream(digest, offset, limit).await
            }
            other => other,
        }
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        match source {
            BlobSource::Bytes(data) => {
                self.slow
                    .write(digest, BlobSource::Bytes(data.clone()))
                    .await?;
                if let Err(e) = self.fast.write(digest, BlobSource::Bytes(data)).await {
                    tracing::warn!(digest = %digest, error = %e, "stored in the slow tier, not on disk");
                }
            }
            BlobSource::File(file) => {
                // The slow tier gets a link to the file (or a copy, across
                // file systems), then the disk takes the file itself.
                let link = StagedFile::new(self.fast.staging_file());
                let (from, to) = (file.path().to_path_buf(), link.path().to_path_buf());
                blocking(move || {
                    std::fs::hard_link(&from, &to)
                        .or_else(|_| std::fs::copy(&from, &to).map(|_| ()))
                        .ctx(|| format!("linking {} for the slow tier", from.display()))
                })
                .await?;
                if let Err(e) = self.slow.write(digest, BlobSource::File(link)).await {
                    file.remove().await;
                    return Err(e);
                }
                if let Err(e) = self.fast.adopt(digest, file).await {
                    tracing::warn!(digest = %digest, error = %e, "stored in the slow tier, not on disk");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    /// A slow tier that fails every write, or never answers a read.
    struct Broken {
        hang_reads: bool,
    }

    #[async_trait]
    impl BlobStore for Broken {
        async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
            Ok(digests.to_vec())
        }
        async fn read(&self, d: &Digest, _: u64, _: Option<u64>) -> StoreResult<Bytes> {
            if self.hang_reads {
                std::future::pending::<()>().await;
            }
            Err(StoreError::NotFound(*d))
        }
        async fn write(&self, _: &Digest, source: BlobSource) -> StoreResult<()> {
            if let BlobSource::File(file) = source {
                file.remove().await;
            }
            Err(StoreError::Backend {
                context: "storing".into(),
                message: "the bucket is down".into(),
            })
        }
    }

    fn disk(dir: &tempfile::TempDir, limit: u64) -> Arc<DiskStore> {
        Arc::new(DiskStore::open(dir.path(), limit).unwrap())
    }

    #[tokio::test]
    async fn a_write_the_slow_tier_refuses_fails_and_leaves_nothing_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let fast = disk(&dir, 0);
        let tiers = FastSlow::new(fast.clone(), Arc::new(Broken { hang_reads: false }));
        let data = Bytes::from_static(b"only durable blobs are promised");
        let d = Digest::of(&data);
        let e = tiers.put(&d, data.clone()).await.unwrap_err();
        assert!(matches!(e, StoreError::Backend { .. }), "{e}");
        assert!(!fast.contains(&d));
        let spool = fast.staging_file();
        std::fs::write(&spool, &data).unwrap();
        let e = tiers
            .write(&d, BlobSource::File(StagedFile::new(spool.clone())))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Backend { .. }), "{e}");
        assert!(!fast.contains(&d));
        assert!(!spool.exists());
        assert_eq!(std::fs::read_dir(fast.staging_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn present_means_present_in_the_slow_tier() {
        let dir = tempfile::tempdir().unwrap();
        let fast = disk(&dir, 0);
        let slow = Arc::new(MemoryStore::new());
        let tiers = FastSlow::new(fast.clone(), slow.clone());
        let data = Bytes::from_static(b"on this disk only");
        let d = Digest::of(&data);
        fast.put(&d, data).await.unwrap();
        assert_eq!(tiers.find_missing(&[d]).await.unwrap(), vec![d]);
    }

    #[tokio::test]
    async fn a_blob_bigger_than_the_disk_tier_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let fast = disk(&dir, 1024);
        let slow = Arc::new(MemoryStore::new());
        let tiers = FastSlow::new(fast.clone(), slow.clone());
        let small = Bytes::from(vec![7u8; 4096]);
        let big = Bytes::from(vec![9u8; (FILL_IN_MEMORY + 4096) as usize]);
        for data in [small, big] {
            let d = Digest::of(&data);
            slow.put(&d, data.clone()).await.unwrap();
            assert_eq!(tiers.read(&d, 0, None).await.unwrap(), data);
            let chunks: Vec<Bytes> = tiers
                .read_stream(&d, 0, None)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            assert_eq!(chunks.concat(), data);
        }
        assert_eq!(std::fs::read_dir(fast.staging_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_dropped_fill_leaves_no_gate_behind() {
        let dir = tempfile::tempdir().unwrap();
        let tiers = Arc::new(FastSlow::new(
            disk(&dir, 0),
            Arc::new(Broken { hang_reads: true }),
        ));
        let d = Digest::of(b"never comes");
        let reads: Vec<_> = (0..3)
            .map(|_| {
                let t = tiers.clone();
                tokio::spawn(async move { t.read(&d, 0, None).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(lock(&tiers.fills).len(), 1, "one gate while they wait");
        for r in reads {
            r.abort();
            let _ = r.await;
        }
        assert!(lock(&tiers.fills).is_empty(), "the last turn took it away");
    }
}
