//! The on-disk CAS: one file per blob under `cas/<first two hex>/<hash>`.
//! Writes go to `staging/` first and are renamed into place, so a crash never
//! leaves a truncated blob visible; the size of every file is checked against
//! its digest on read, and a file that does not match is dropped.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::IoContext;
use crate::index::Index;
use crate::memory::verify;
use crate::store::clamp_range;
use crate::{BlobStore, Digest, DigestHasher, StoreError, StoreResult, StoreStats};

/// Blobs at least this big are hashed and written on the blocking pool.
const INLINE_LIMIT: usize = 256 * 1024;

pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    cas: PathBuf,
    staging: PathBuf,
    limit: u64,
    index: Mutex<Index>,
}

impl DiskStore {
    /// Opens (creating if needed) a store under `root`, bounded to
    /// `limit_bytes` (0 = unbounded). Scans existing blobs; leftovers from an
    /// interrupted write are removed.
    pub fn open(root: &Path, limit_bytes: u64) -> StoreResult<Self> {
        let cas = root.join("cas");
        let staging = root.join("staging");
        if staging.exists() {
            fs::remove_dir_all(&staging).ctx(|| format!("clearing {}", staging.display()))?;
        }
        fs::create_dir_all(&staging).ctx(|| format!("creating {}", staging.display()))?;
        for i in 0..=255u8 {
            let dir = cas.join(hex::encode([i]));
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        let mut found = scan(&cas)?;
        found.sort_by_key(|(mtime, _)| *mtime);
        let mut index = Index::default();
        for (_, d) in &found {
            index.insert(d);
        }
        tracing::info!(
            blobs = index.len(),
            bytes = index.bytes(),
            path = %cas.display(),
            "opened disk store"
        );
        let store = DiskStore {
            inner: Arc::new(Inner {
                cas,
                staging,
                limit: limit_bytes,
                index: Mutex::new(index),
            }),
        };
        store.inner.evict();
        Ok(store)
    }

    /// Where the blob lives on disk (whether or not it is present). Callers
    /// that hardlink from here must treat the file as read-only.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.inner.path_of(digest)
    }

    /// True when the blob is present; records a use.
    /// Stores what `source` yields and returns its digest. The bytes are
    /// hashed as they are copied into a private staging file, so the stored
    /// blob is exactly the bytes that were hashed even if whoever wrote the
    /// source is still changing it. Blocking: call it off the async threads.
    pub fn ingest(&self, source: &mut impl Read) -> StoreResult<Digest> {
        self.inner.ingest(source)
    }

    /// [`DiskStore::ingest`] of a file, on the blocking pool.
    pub async fn ingest_file(&self, mut file: fs::File) -> StoreResult<Digest> {
        let store = DiskStore {
            inner: self.inner.clone(),
        };
        blocking(move || store.ingest(&mut file)).await
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.inner.lock().touch(digest)
    }
}

fn scan(cas: &Path) -> StoreResult<Vec<(SystemTime, Digest)>> {
    let mut found = Vec::new();
    for sub in fs::read_dir(cas).ctx(|| format!("listing {}", cas.display()))? {
        let sub = sub.ctx(|| format!("listing {}", cas.display()))?.path();
        for entry in fs::read_dir(&sub).ctx(|| format!("listing {}", sub.display()))? {
            let entry = entry.ctx(|| format!("listing {}", sub.display()))?;
            let meta = entry
                .metadata()
                .ctx(|| format!("stat {}", entry.path().display()))?;
            let name = entry.file_name();
            match Digest::parse(&name.to_string_lossy(), meta.len() as i64) {
                Ok(d) if meta.is_file() => {
                    found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), d))
                }
                _ => {
                    tracing::warn!(path = %entry.path().display(), "removing stray file from CAS");
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
    Ok(found)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        let hex = d.hash_hex();
        self.cas.join(&hex[..2]).join(hex)
    }

    fn staging_file(&self) -> PathBuf {
        self.staging.join(uuid::Uuid::new_v4().to_string())
    }

    /// Drops least-recently-used unpinned blobs until under the limit. Files
    /// are deleted under the index lock so that a concurrent re-insert of the
    /// same blob cannot be undone by a late delete.
    fn evict(&self) {
        if self.limit == 0 {
            return;
        }
        let mut index = self.lock();
        for d in index.evict_to(self.limit) {
            tracing::debug!(digest = %d, "evicting blob");
            let _ = fs::remove_file(self.path_of(&d));
        }
    }

    /// Moves a verified staging file into place and records it.
    fn commit(&self, d: &Digest, staged: &Path) -> StoreResult<()> {
        let target = self.path_of(d);
        {
            let mut index = self.lock();
            if index.contains(d) {
                index.touch(d);
                let _ = fs::remove_file(staged);
                return Ok(());
            }
            // Read-only: executors hardlink blobs into action workspaces.
            fs::set_permissions(staged, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .ctx(|| format!("chmod {}", staged.display()))?;
            fs::rename(staged, &target)
                .ctx(|| format!("moving {} to {}", staged.display(), target.display()))?;
            index.insert(d);
        }
        self.evict();
        Ok(())
    }

    fn ingest(&self, source: &mut impl Read) -> StoreResult<Digest> {
        let staged = self.staging_file();
        let result = (|| {
            let mut out =
                fs::File::create(&staged).ctx(|| format!("creating {}", staged.display()))?;
            let mut hasher = DigestHasher::default();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = source.read(&mut buf).ctx(|| "reading an output".into())?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .ctx(|| format!("writing {}", staged.display()))?;
            }
            let d = hasher.finish();
            if d.is_empty_blob() {
                let _ = fs::remove_file(&staged);
                return Ok(d);
            }
            self.commit(&d, &staged).map(|_| d)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&staged);
        }
        result
    }

    fn write_bytes(&self, d: &Digest, data: &[u8]) -> StoreResult<()> {
        verify(d, data)?;
        if self.lock().touch(d) {
            return Ok(());
        }
        let staged = self.staging_file();
        let result = fs::File::create(&staged)
            .and_then(|mut f| f.write_all(data))
            .ctx(|| format!("writing {}", staged.display()))
            .and_then(|_| self.commit(d, &staged));
        if result.is_err() {
            let _ = fs::remove_file(&staged);
        }
        result
    }

    fn read_range(&self, d: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        if d.is_empty_blob() {
            clamp_range(d, 0, offset, limit)?;
            return Ok(Bytes::new());
        }
        if !self.lock().touch(d) {
            return Err(StoreError::NotFound(*d));
        }
        let path = self.path_of(d);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.lock().remove(d);
                return Err(StoreError::NotFound(*d));
            }
            Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
        };
        let len = file
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        if len != d.size() {
            tracing::error!(digest = %d, len, "blob on disk has the wrong size; dropping it");
            self.lock().remove(d);
            let _ = fs::remove_file(&path);
            return Err(StoreError::NotFound(*d));
        }
        let (start, count) = clamp_range(d, len, offset, limit)?;
        let mut buf = vec![0u8; count as usize];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut buf))
            .ctx(|| format!("reading {}", path.display()))?;
        Ok(Bytes::from(buf))
    }
}

/// Hashes a file by streaming it.
pub(crate) fn hash_file(path: &Path) -> StoreResult<Digest> {
    let mut file = fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut hasher = DigestHasher::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::io("store worker thread", std::io::Error::other(e)))?
}

#[async_trait]
impl BlobStore for DiskStore {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        let mut index = self.inner.lock();
        Ok(digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !index.touch(d))
            .copied()
            .collect())
    }

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        let inner = self.inner.clone();
        let d = *digest;
        if d.size() < INLINE_LIMIT as u64 {
            return inner.read_range(&d, offset, limit);
        }
        blocking(move || inner.read_range(&d, offset, limit)).await
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> StoreResult<()> {
        if data.len() < INLINE_LIMIT {
            return self.inner.write_bytes(digest, &data);
        }
        let inner = self.inner.clone();
        let d = *digest;
        blocking(move || inner.write_bytes(&d, &data)).await
    }

    async fn adopt_file(&self, digest: &Digest, path: &Path) -> StoreResult<()> {
        let inner = self.inner.clone();
        let path = path.to_path_buf();
        let d = *digest;
        blocking(move || {
            let actual = hash_file(&path)?;
            if actual != d {
                let _ = fs::remove_file(&path);
                return Err(StoreError::Mismatch {
                    expected: d,
                    actual_hash: actual.hash_hex(),
                    actual_size: actual.size(),
                });
            }
            if d.is_empty_blob() {
                let _ = fs::remove_file(&path);
                return Ok(());
            }
            let staged = if path.starts_with(&inner.staging) {
                path
            } else {
                let staged = inner.staging_file();
                if fs::rename(&path, &staged).is_err() {
                    fs::copy(&path, &staged)
                        .ctx(|| format!("copying {} into the store", path.display()))?;
                    let _ = fs::remove_file(&path);
                }
                staged
            };
            inner.commit(&d, &staged).inspect_err(|_| {
                let _ = fs::remove_file(&staged);
            })
        })
        .await
    }

    fn staging_dir(&self) -> &Path {
        &self.inner.staging
    }

    fn pin(&self, digests: &[Digest]) {
        let mut index = self.inner.lock();
        for d in digests {
            index.pin(d);
        }
    }

    fn unpin(&self, digests: &[Digest]) {
        let mut index = self.inner.lock();
        for d in digests {
            index.unpin(d);
        }
    }

    fn stats(&self) -> StoreStats {
        let index = self.inner.lock();
        StoreStats {
            bytes: index.bytes(),
            blobs: index.len(),
            limit_bytes: self.inner.limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(s: &str) -> (Digest, Bytes) {
        let b = Bytes::from(s.to_string());
        (Digest::of(&b), b)
    }

    #[tokio::test]
    async fn put_read_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (d, b) = blob("hello world");
        {
            let store = DiskStore::open(dir.path(), 0).unwrap();
            assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
            store.put(&d, b.clone()).await.unwrap();
            assert!(store.find_missing(&[d]).await.unwrap().is_empty());
        }
        let store = DiskStore::open(dir.path(), 0).unwrap();
        assert_eq!(store.read(&d, 0, None).await.unwrap(), b);
        assert_eq!(
            store.read(&d, 6, Some(3)).await.unwrap(),
            Bytes::from("wor")
        );
        assert!(matches!(
            store.read(&d, 100, None).await,
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[tokio::test]
    async fn rejects_data_that_does_not_match_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 0).unwrap();
        let (d, _) = blob("expected");
        let err = store.put(&d, Bytes::from("other")).await.unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
        assert_eq!(store.stats().blobs, 0);
        assert!(!store.path_of(&d).exists());
    }

    #[tokio::test]
    async fn truncated_file_on_disk_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let (d, b) = blob("some content that will be truncated");
        {
            let store = DiskStore::open(dir.path(), 0).unwrap();
            store.put(&d, b).await.unwrap();
            fs::write(store.path_of(&d), b"some").unwrap();
        }
        let store = DiskStore::open(dir.path(), 0).unwrap();
        assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
        assert!(matches!(
            store.read(&d, 0, None).await,
            Err(StoreError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn interrupted_writes_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DiskStore::open(dir.path(), 0).unwrap();
            fs::write(store.staging_dir().join("partial"), b"half a blo").unwrap();
        }
        let store = DiskStore::open(dir.path(), 0).unwrap();
        assert_eq!(fs::read_dir(store.staging_dir()).unwrap().count(), 0);
        assert_eq!(store.stats().blobs, 0);
    }

    #[tokio::test]
    async fn lru_eviction_spares_pinned_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 20).unwrap();
        let (a, ab) = blob("aaaaaaaaaa");
        let (b, bb) = blob("bbbbbbbbbb");
        let (c, cb) = blob("cccccccccc");
        store.put(&a, ab).await.unwrap();
        store.put(&b, bb).await.unwrap();
        store.pin(&[a]);
        store.put(&c, cb).await.unwrap();
        // a is the oldest but pinned, so b goes.
        assert_eq!(store.find_missing(&[a, b, c]).await.unwrap(), vec![b]);
        assert!(!store.path_of(&b).exists());
        assert_eq!(store.stats().bytes, 20);
    }

    /// Rewrites the file it reads after its first read, as a process the
    /// action left behind might while outputs are collected.
    struct RewrittenWhileRead {
        file: fs::File,
        path: PathBuf,
        rewritten: bool,
    }

    impl Read for RewrittenWhileRead {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let len = buf.len().min(4);
            let n = self.file.read(&mut buf[..len])?;
            if !self.rewritten {
                self.rewritten = true;
                fs::write(&self.path, b"EVILEVILEVIL")?;
            }
            Ok(n)
        }
    }

    #[test]
    fn ingest_stores_exactly_the_bytes_it_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(&dir.path().join("s"), 0).unwrap();
        let path = dir.path().join("out");
        fs::write(&path, b"good output!").unwrap();
        let mut source = RewrittenWhileRead {
            file: fs::File::open(&path).unwrap(),
            path: path.clone(),
            rewritten: false,
        };
        let d = store.ingest(&mut source).unwrap();
        let stored = fs::read(store.path_of(&d)).unwrap();
        assert_eq!(
            Digest::of(&stored),
            d,
            "the blob is stored under its own digest"
        );
        assert_eq!(d.size(), 12);
    }

    #[tokio::test]
    async fn adopt_and_ingest() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(&dir.path().join("s"), 0).unwrap();
        let src = dir.path().join("f");
        fs::write(&src, b"file body").unwrap();
        let d = store
            .ingest_file(fs::File::open(&src).unwrap())
            .await
            .unwrap();
        assert_eq!(d, Digest::of(b"file body"));
        assert!(src.exists(), "ingest copies");
        let wrong = Digest::of(b"nope");
        assert!(store.adopt_file(&wrong, &src).await.is_err());
        fs::write(&src, b"other body").unwrap();
        store
            .adopt_file(&Digest::of(b"other body"), &src)
            .await
            .unwrap();
        assert!(!src.exists(), "adopt_file takes the file");
        assert_eq!(
            store
                .read(&Digest::of(b"other body"), 0, None)
                .await
                .unwrap(),
            Bytes::from("other body")
        );
    }
}
