//! Blobs in an object store (S3 and anything `object_store` speaks): one
//! object per blob at `PREFIX/cas/<sha256>-<size>`. The bucket is the
//! durable tier; eviction is its lifecycle rules' business. Nothing read
//! from it is trusted: every whole read is hashed, and an object that does
//! not match its digest is deleted and reported missing, so the client
//! uploads it again.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::disk::{blocking, check_file};
use crate::error::IoContext;
use crate::store::{clamp_range, BlobSource, BlobStream};
use crate::{BlobStore, Digest, DigestHasher, StoreError, StoreResult};

/// Blobs up to this size go up in one PUT; bigger ones in parts of this size.
pub const MULTIPART_PART: usize = 8 * 1024 * 1024;
/// HEAD requests in flight for one `find_missing`.
const HEAD_PARALLELISM: usize = 32;
/// Parts in flight for one multipart upload.
const PART_PARALLELISM: usize = 4;

pub struct ObjectBlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl ObjectBlobStore {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        ObjectBlobStore {
            store,
            prefix: ObjectPath::from(prefix.trim_matches('/')),
        }
    }

    /// An S3 bucket, with the endpoint and credentials from the standard
    /// `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`).
    pub fn s3_from_env(bucket: &str, prefix: &str) -> StoreResult<Self> {
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| backend(format!("configuring S3 bucket {bucket:?}"), e))?;
        Ok(Self::new(Arc::new(s3), prefix))
    }

    /// Where a blob lives in the bucket.
    pub fn key(&self, d: &Digest) -> ObjectPath {
        self.prefix
            .clone()
            .join("cas")
            .join(format!("{}-{}", d.hash_hex(), d.size()))
    }

    /// The whole blob as a stream that ends with an error unless its bytes
    /// hash to `d` (a bad object is deleted).
    async fn verified_stream(&self, d: &Digest) -> StoreResult<BlobStream> {
        let key = self.key(d);
        let got = self.store.get(&key).await.map_err(|e| not_found_or(d, e))?;
        let d = *d;
        let store = self.store.clone();
        if got.meta.size != d.size() {
            // Not read at all: a wrong object could be any size.
            tracing::error!(digest = %d, size = got.meta.size, key = %key, "object has the wrong size; deleting it");
            let _ = store.delete(&key).await;
            return Err(StoreError::NotFound(d));
        }
        let chunks = got
            .into_stream()
            .map_err(move |e| backend(format!("reading {d}"), e));
        let state = (chunks.boxed(), Some(DigestHasher::default()));
        Ok(stream::try_unfold(state, move |(mut chunks, hasher)| {
            let store = store.clone();
            let key = key.clone();
            async move {
                let Some(mut hasher) = hasher else {
                    return Ok(None);
                };
                match chunks.try_next().await? {
                    Some(chunk) => {
                        hasher.update(&chunk);
                        Ok(Some((chunk, (chunks, Some(hasher)))))
                    }
                    None if hasher.finish() == d => Ok(None),
                    None => {
                        tracing::error!(digest = %d, key = %key, "object does not match its digest; deleting it");
                        let _ = store.delete(&key).await;
                        Err(StoreError::NotFound(d))
                    }
                }
            }
        })
        .boxed())
    }

    async fn put_bytes(&self, d: &Digest, data: Bytes) -> StoreResult<()> {
        let key = self.key(d);
        if data.len() <= MULTIPART_PART {
            self.store
                .put(&key, PutPayload::from(data))
                .await
                .map_err(|e| backend(format!("storing {d}"), e))?;
            return Ok(());
        }
        let mut upload = self.multipart(d).await?;
        upload.put(data);
        upload
            .finish()
            .await
            .map_err(|e| backend(format!("finishing the upload of {d}"), e))?;
        Ok(())
    }

    async fn multipart(&self, d: &Digest) -> StoreResult<WriteMultipart> {
        let upload = self
            .store
            .put_multipart(&self.key(d))
            .await
            .map_err(|e| backend(format!("starting the upload of {d}"), e))?;
        Ok(WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART))
    }

    /// Uploads a file already checked against `d`, in parts, never whole
    /// in memory.
    async fn put_file(&self, d: &Digest, path: &std::path::Path) -> StoreResult<()> {
        if d.size() as usize <= MULTIPART_PART {
            let data = tokio::fs::read(path)
                .await
                .ctx(|| format!("reading {}", path.display()))?;
            return self.put_bytes(d, Bytes::from(data)).await;
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .ctx(|| format!("opening {}", path.display()))?;
        let mut upload = self.multipart(d).await?;
        let mut buf = vec![0u8; MULTIPART_PART];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = upload.abort().await;
                    return Err(StoreError::io(format!("reading {}", path.display()), e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = upload.wait_for_capacity(PART_PARALLELISM).await {
                let _ = upload.abort().await;
                return Err(backend(format!("uploading {d}"), e));
            }
            upload.write(&buf[..n]);
        }
        upload
            .finish()
            .await
            .map_err(|e| backend(format!("finishing the upload of {d}"), e))?;
        Ok(())
    }
}

/// Whether the object for `d` is there with the right size.
async fn exists(store: &dyn ObjectStore, key: ObjectPath, d: &Digest) -> StoreResult<bool> {
    match store.head(&key).await {
        Ok(meta) if meta.size == d.size() => Ok(true),
        Ok(meta) => {
            tracing::error!(digest = %d, size = meta.size, "object has the wrong size; ignoring it");
            Ok(false)
        }
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(backend(format!("looking up {d}"), e)),
    }
}

fn backend(context: String, e: object_store::Error) -> StoreError {
    StoreError::Backend {
        context,
        message: e.to_string(),
    }
}

fn not_found_or(d: &Digest, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound(*d),
        e => backend(format!("reading {d}"), e),
    }
}

/// Hashes on the blocking pool when the data is big enough to matter.
async fn check(d: Digest, data: Bytes) -> StoreResult<Bytes> {
    let verify = move || crate::memory::verify(&d, &data).map(|_| data);
    if d.size() <= 64 * 1024 {
        return verify();
    }
    blocking(verify).await
}

#[async_trait]
impl BlobStore for ObjectBlobStore {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        // S3 has no batch lookup: one HEAD per blob, many in flight.
        let wanted: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob())
            .copied()
            .collect();
        let lookups = wanted.into_iter().map(|d| {
            let store = self.store.clone();
            let key = self.key(&d);
            async move { Ok::<_, StoreError>((d, exists(store.as_ref(), key, &d).await?)) }
        });
        let found: Vec<(Digest, bool)> = stream::iter(lookups)
            .buffered(HEAD_PARALLELISM)
            .try_collect()
            .await?;
        Ok(found
            .into_iter()
            .filter(|(_, present)| !present)
            .map(|(d, _)| d)
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        let (start, len) = clamp_range(digest, digest.size(), offset, limit)?;
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        // A range cannot be checked on its own: the whole blob is read and
        // hashed, then cut (a tier in front keeps this rare).
        let data: Vec<Bytes> = self.verified_stream(digest).await?.try_collect().await?;
        let mut whole = Vec::with_capacity(digest.size() as usize);
        for chunk in data {
            whole.extend_from_slice(&chunk);
        }
        let whole = Bytes::from(whole);
        Ok(whole.slice(start as usize..(start + len) as usize))
    }

    async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<BlobStream> {
        let (_, len) = clamp_range(digest, digest.size(), offset, limit)?;
        if offset == 0 && len == digest.size() && !digest.is_empty_blob() {
            return self.verified_stream(digest).await;
        }
        let data = self.read(digest, offset, limit).await?;
        Ok(stream::once(async move { Ok(data) }).boxed())
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        match source {
            BlobSource::Bytes(data) => {
                let data = check(*digest, data).await?;
                if digest.is_empty_blob() {
                    return Ok(());
                }
                self.put_bytes(digest, data).await
            }
            BlobSource::File(file) => {
                // `file` lives until the upload ends (or is dropped, and
                // removes the file then).
                let stored = self.put_checked_file(digest, file.path()).await;
                file.remove().await;
                stored
            }
        }
    }
}

impl ObjectBlobStore {
    /// Hashes the file, then uploads it if it matches `digest`.
    async fn put_checked_file(&self, digest: &Digest, path: &std::path::Path) -> StoreResult<()> {
        let (d, p) = (*digest, path.to_path_buf());
        blocking(move || check_file(&d, &p)).await?;
        if digest.is_empty_blob() {
            return Ok(());
        }
        self.put_file(digest, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn store() -> (Arc<InMemory>, ObjectBlobStore) {
        let mem = Arc::new(InMemory::new());
        (mem.clone(), ObjectBlobStore::new(mem, "/team/"))
    }

    #[tokio::test]
    async fn blobs_live_under_the_prefix_by_hash_and_size() {
        let (mem, s) = store();
        let d = Digest::of(b"hello");
        s.put(&d, Bytes::from_static(b"hello")).await.unwrap();
        let key = format!("team/cas/{}-5", d.hash_hex());
        assert_eq!(
            mem.get(&ObjectPath::from(key))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
            "hello"
        );
        assert_eq!(s.read(&d, 1, Some(3)).await.unwrap(), "ell");
        assert!(s.find_missing(&[d]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_write_that_does_not_match_its_digest_stores_nothing() {
        let (mem, s) = store();
        let d = Digest::of(b"hello");
        let e = s.put(&d, Bytes::from_static(b"jello")).await.unwrap_err();
        assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
        assert!(mem.head(&s.key(&d)).await.is_err());
    }
}
