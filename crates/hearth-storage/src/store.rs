use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Digest, StoreResult};

/// Occupancy of a store, for `hearth status` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub bytes: u64,
    pub blobs: u64,
    /// 0 when unbounded.
    pub limit_bytes: u64,
}

/// A content-addressable blob store. Every write is verified against its
/// digest where it enters; a blob is either wholly visible or not at all.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The subset of `digests` this store does not hold.
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>>;

    /// Bytes `[offset, offset+limit)` of a blob (`limit = None`: to the end).
    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes>;

    /// Stores `data`, which must hash to `digest`.
    async fn put(&self, digest: &Digest, data: Bytes) -> StoreResult<()>;

    /// Takes ownership of the file at `path` (which must hash to `digest`),
    /// moving it into the store when it can. The file is gone afterwards.
    async fn adopt_file(&self, digest: &Digest, path: &Path) -> StoreResult<()>;

    /// A directory where a caller may stage files for [`BlobStore::adopt_file`]
    /// so that adoption is a rename.
    fn staging_dir(&self) -> &Path;

    /// Protects blobs from eviction until the matching [`BlobStore::unpin`].
    /// Pinning a blob that is not (yet) present is allowed.
    fn pin(&self, digests: &[Digest]);
    fn unpin(&self, digests: &[Digest]);

    fn stats(&self) -> StoreStats;
}

/// Holds a set of pins and releases them when dropped.
pub struct PinGuard {
    store: Arc<dyn BlobStore>,
    digests: Vec<Digest>,
}

impl PinGuard {
    pub fn new(store: Arc<dyn BlobStore>, digests: Vec<Digest>) -> Self {
        store.pin(&digests);
        PinGuard { store, digests }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.store.unpin(&self.digests);
    }
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinGuard({} blobs)", self.digests.len())
    }
}

/// Clamps a read range to a blob of `size` bytes.
pub(crate) fn clamp_range(
    digest: &Digest,
    size: u64,
    offset: u64,
    limit: Option<u64>,
) -> StoreResult<(u64, u64)> {
    if offset > size {
        return Err(crate::StoreError::OutOfRange {
            digest: *digest,
            offset,
        });
    }
    let len = match limit {
        Some(l) if l > 0 => l.min(size - offset),
        _ => size - offset,
    };
    Ok((offset, len))
}
