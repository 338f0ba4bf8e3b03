//! Remembers which blobs a slow store was seen to hold, for a while, so a
//! FindMissingBlobs of a thousand digests that were there a minute ago asks
//! the store nothing (Buildbarn's existence caching). A blob the store
//! loses (its lifecycle rules expire it) is reported present at most `ttl`
//! longer; a read that finds it gone forgets it at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::store::{BlobSource, BlobStream};
use crate::{BlobStore, Digest, StoreError, StoreResult};

pub struct ExistenceCache {
    inner: Arc<dyn BlobStore>,
    ttl: Duration,
    max_entries: usize,
    seen: Mutex<HashMap<Digest, Instant>>,
}

impl ExistenceCache {
    pub fn new(inner: Arc<dyn BlobStore>, ttl: Duration, max_entries: usize) -> Self {
        ExistenceCache {
            inner,
            ttl,
            max_entries,
            seen: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Instant>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, digests: impl IntoIterator<Item = Digest>) {
        let now = Instant::now();
        let mut seen = self.lock();
        for d in digests {
            if seen.len() >= self.max_entries {
                // Forgetting everything at once costs one pass per
                // `max_entries` insertions, not one per insertion; what is
                // forgotten is asked about again.
                seen.clear();
            }
            seen.insert(d, now);
        }
    }

    fn forget(&self, d: &Digest) {
        self.lock().remove(d);
    }

    fn forget_if_gone<T>(&self, d: &Digest, result: StoreResult<T>) -> StoreResult<T> {
        if let Err(StoreError::NotFound(_)) = &result {
            self.forget(d);
        }
        result
    }
}

#[async_trait]
impl BlobStore for ExistenceCache {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        let unknown: Vec<Digest> = {
            let now = Instant::now();
            let seen = self.lock();
            digests
                .iter()
                .filter(|d| {
                    seen.get(d)
                        .is_none_or(|at| now.duration_since(*at) >= self.ttl)
                })
                .copied()
                .collect()
        };
        if unknown.is_empty() {
            return Ok(unknown);
        }
        let missing = self.inner.find_missing(&unknown).await?;
        let gone: std::collections::HashSet<&Digest> = missing.iter().collect();
        self.remember(unknown.iter().filter(|d| !gone.contains(d)).copied());
        Ok(missing)
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        let read = self.inner.read(digest, offset, limit).await;
        self.forget_if_gone(digest, read)
    }

    async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<BlobStream> {
        let read = self.inner.read_stream(digest, offset, limit).await;
        self.forget_if_gone(digest, read)
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        self.inner.write(digest, source).await?;
        self.remember([*digest]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the digests the store behind is asked about.
    struct Counting(MemoryStore, AtomicUsize);

    #[async_trait]
    impl BlobStore for Counting {
        async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
            self.1.fetch_add(digests.len(), Ordering::SeqCst);
            self.0.find_missing(digests).await
        }
        async fn read(&self, d: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
            self.0.read(d, offset, limit).await
        }
        async fn write(&self, d: &Digest, source: BlobSource) -> StoreResult<()> {
            self.0.write(d, source).await
        }
    }

    #[tokio::test]
    async fn present_blobs_are_asked_about_once_missing_ones_every_time() {
        let inner = Arc::new(Counting(MemoryStore::new(), AtomicUsize::new(0)));
        let cache = ExistenceCache::new(inner.clone(), Duration::from_secs(60), 1000);
        let blobs: Vec<(Digest, Bytes)> = (0..100)
            .map(|i| {
                let b = Bytes::from(format!("blob {i}"));
                (Digest::of(&b), b)
            })
            .collect();
        for (d, b) in &blobs[..50] {
            inner.0.put(d, b.clone()).await.unwrap();
        }
        let all: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        assert_eq!(cache.find_missing(&all).await.unwrap().len(), 50);
        assert_eq!(inner.1.load(Ordering::SeqCst), 100);
        assert_eq!(cache.find_missing(&all).await.unwrap().len(), 50);
        assert_eq!(
            inner.1.load(Ordering::SeqCst),
            150,
            "only the missing asked again"
        );
        cache.put(&blobs[99].0, blobs[99].1.clone()).await.unwrap();
        assert_eq!(cache.find_missing(&all).await.unwrap().len(), 49);
    }

    #[tokio::test]
    async fn what_expires_is_asked_again() {
        let inner = Arc::new(Counting(MemoryStore::new(), AtomicUsize::new(0)));
        let cache = ExistenceCache::new(inner.clone(), Duration::from_millis(1), 1000);
        let d = Digest::of(b"x");
        cache.put(&d, Bytes::from_static(b"x")).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        cache.find_missing(&[d]).await.unwrap();
        assert_eq!(inner.1.load(Ordering::SeqCst), 1);
    }
}
