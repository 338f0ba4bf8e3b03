use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};

use crate::{Digest, StagedFile, StoreResult};

/// Occupancy of a store, for `hearth status` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub bytes: u64,
    pub blobs: u64,
    /// 0 when unbounded.
    pub limit_bytes: u64,
}

/// The bytes of a blob being written.
#[derive(Debug)]
pub enum BlobSource {
    Bytes(Bytes),
    /// A file on local disk holding the whole blob. The store takes it: it
    /// may rename it into itself, and it is gone when the call returns,
    /// whether the write succeeded or not — or when the call is dropped.
    File(StagedFile),
}

/// A blob's bytes as a stream of chunks.
pub type BlobStream = BoxStream<'static, StoreResult<Bytes>>;

/// Chunk size of streamed reads (one ByteStream message's worth).
pub const READ_CHUNK: u64 = 1024 * 1024;

/// A content-addressable blob store: what every store can do, local or
/// remote (Buildbarn's BlobAccess is the model). Every write is verified
/// against its digest where it enters; a blob is either wholly visible or
/// not at all. Disk-only abilities (adopting files, pins, occupancy) are
/// the disk store's own API and the [`Pins`] and [`Occupancy`] traits;
/// tiers and caches are decorators over this trait.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The subset of `digests` this store does not hold.
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>>;

    /// Bytes `[offset, offset+limit)` of a blob (`limit = None`: to the end),
    /// in memory.
    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes>;

    /// The same range as a stream of chunks. A stream that ends with an
    /// error must not be taken as the blob. The default reads the range
    /// into memory as one chunk; stores that hold big blobs stream them.
    async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<BlobStream> {
        let data = self.read(digest, offset, limit).await?;
        Ok(stream::once(async move { Ok(data) }).boxed())
    }

    /// Stores a blob, which must hash to `digest`.
    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()>;

    /// Stores bytes held in memory.
    async fn put(&self, digest: &Digest, data: Bytes) -> StoreResult<()> {
        self.write(digest, BlobSource::Bytes(data)).await
    }
}

/// Keeps blobs from being evicted while work needs them (the disk store).
pub trait Pins: Send + Sync + 'static {
    /// Pinning a blob that is not (yet) present is allowed.
    fn pin(&self, digests: &[Digest]);
    fn unpin(&self, digests: &[Digest]);
}

/// What a store holds, for stores that can say so cheaply (not an object
/// store, whose size its own console reports).
pub trait Occupancy: Send + Sync + 'static {
    fn stats(&self) -> StoreStats;
}

/// Holds a set of pins and releases them when dropped.
pub struct PinGuard {
    pins: Arc<dyn Pins>,
    digests: Vec<Digest>,
}

impl PinGuard {
    pub fn new(pins: Arc<dyn Pins>, digests: Vec<Digest>) -> Self {
        pins.pin(&digests);
        PinGuard { pins, digests }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.pins.unpin(&self.digests);
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
