//! Counts and times the calls a store answers, by operation and outcome,
//! so an operator sees what the slow tier costs and when it fails
//! (`hearth_cas_tier_requests_total`, `hearth_cas_tier_request_seconds`).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use metrics::{counter, histogram};

use crate::store::{BlobSource, BlobStream};
use crate::{BlobStore, Digest, StoreError, StoreResult};

pub struct Metered {
    inner: Arc<dyn BlobStore>,
    tier: &'static str,
}

impl Metered {
    pub fn new(inner: Arc<dyn BlobStore>, tier: &'static str) -> Self {
        Metered { inner, tier }
    }

    fn record<T>(&self, op: &'static str, started: Instant, result: &StoreResult<T>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(StoreError::NotFound(_)) => "not_found",
            Err(_) => "error",
        };
        counter!("hearth_cas_tier_requests_total", "tier" => self.tier, "op" => op, "outcome" => outcome)
            .increment(1);
        histogram!("hearth_cas_tier_request_seconds", "tier" => self.tier, "op" => op)
            .record(started.elapsed().as_secs_f64());
    }
}

#[async_trait]
impl BlobStore for Metered {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        let started = Instant::now();
        let result = self.inner.find_missing(digests).await;
        self.record("find_missing", started, &result);
        result
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        let started = Instant::now();
        let result = self.inner.read(digest, offset, limit).await;
        self.record("read", started, &result);
        result
    }

    /// Times until the stream is open (its bytes flow at the reader's pace).
    async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<BlobStream> {
        let started = Instant::now();
        let result = self.inner.read_stream(digest, offset, limit).await;
        self.record("read_stream", started, &result);
        result
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        let started = Instant::now();
        let result = self.inner.write(digest, source).await;
        self.record("write", started, &result);
        result
    }
}
