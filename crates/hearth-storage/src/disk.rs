//! The on-disk CAS: one file per blob under `cas/<first two hex>/<hash>`.
//! Writes go to `staging/` first and are renamed into place, so a crash never
//! leaves a truncated blob visible; the size of every file is checked against
//! its digest on read, and a file that does not match is dropped.
//!
//! Every file operation runs on the blocking pool (the server and, in
//! `hearth up`, the executor share one runtime); the index lock is held only
//! for bookkeeping, never across a file operation that can take long.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::IoContext;
use crate::index::Index;
use crate::memory::verify;
use crate::store::{clamp_range, BlobSource, BlobStream, Occupancy, Pins, READ_CHUNK};
use crate::{BlobStore, Digest, DigestHasher, StagedFile, StoreError, StoreResult, StoreStats};
use futures::stream::{self, StreamExt};

mod sink;
pub use sink::BlobSink;

/// What [`DiskStore::ingest`] reads before it decides whether a staging
/// file is needed (and the size of its copy buffer after).
const INGEST_BUFFER: usize = 256 * 1024;

#[cfg(test)]
type UnlinkHook = Box<dyn Fn(&Digest) + Send + Sync>;

pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    cas: PathBuf,
    staging: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    /// Signalled when doomed blobs' files are gone (see [`Inner::unlink`]).
    unlinked: Condvar,
    /// Runs before each unlink, so a test can interleave a re-insert.
    #[cfg(test)]
    before_unlink: Mutex<Option<UnlinkHook>>,
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
                unlinked: Condvar::new(),
                #[cfg(test)]
                before_unlink: Mutex::new(None),
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

    /// Opens a present blob for reading (checking its size, recording a
    /// use), to stream it elsewhere. Blocking: call it off the async threads.
    /// An evicted blob's open file stays readable: unlinking spares open files.
    pub fn open_blob(&self, digest: &Digest) -> StoreResult<fs::File> {
        self.inner.open_checked(digest)
    }

    /// Reads a whole (small) blob, the empty one included, checking its
    /// size like [`BlobStore::read`]. Blocking: for a caller already on the
    /// blocking pool, which need not hand each read off again.
    pub fn read_blocking(&self, digest: &Digest) -> StoreResult<Bytes> {
        self.inner.read_range(digest, 0, None)
    }

    /// A writer for a blob that arrives in chunks (see [`BlobSink`]).
    pub fn sink(&self, expected: Digest) -> BlobSink {
        BlobSink::new(self.inner.clone(), expected)
    }

    /// True when the blob is present; records a use.
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

    /// Drops least-recently-used unpinned blobs until under the limit.
    fn evict(&self) {
        if self.limit == 0 {
            return;
        }
        let victims = self.lock().evict_to(self.limit);
        for d in &victims {
            tracing::debug!(digest = %d, "evicting blob");
        }
        if !victims.is_empty() {
            let bytes: u64 = victims.iter().map(Digest::size).sum();
            metrics::counter!("hearth_cas_evictions_total").increment(victims.len() as u64);
            metrics::counter!("hearth_cas_evicted_bytes_total").increment(bytes);
        }
        self.unlink(&victims);
    }

    /// Deletes the files of blobs the index has doomed (taken out, see
    /// [`Index::doom`]). Runs without the lock: unlinking a big file can take
    /// milliseconds, and every lookup (FindMissingBlobs, pins, reads) needs
    /// that lock. A commit of one of these digests waits until this is done
    /// (see [`Inner::commit`]), so a late unlink never removes a new file.
    fn unlink(&self, victims: &[Digest]) {
        if victims.is_empty() {
            return;
        }
        for d in victims {
            #[cfg(test)]
            if let Some(hook) = &*self.before_unlink.lock().unwrap_or_else(|p| p.into_inner()) {
                hook(d);
            }
            let _ = fs::remove_file(self.path_of(d));
        }
        self.lock().unlinked(victims);
        self.unlinked.notify_all();
    }

    /// Moves a verified staging file into place and records it.
    fn commit(&self, d: &Digest, staged: &Path) -> StoreResult<()> {
        let target = self.path_of(d);
        {
            // The previous file at this path may be mid-unlink; renaming onto
            // it now would let that unlink delete the new file.
            let mut index = self
                .unlinked
                .wait_while(self.lock(), |ix| ix.is_doomed(d))
                .unwrap_or_else(|p| p.into_inner());
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
        // Most outputs of build actions are small, and many are empty (a
        // compiler's stdout) or already stored: read up to one buffer first,
        // and only a source longer than that, or a small blob the store
        // lacks, gets a staging file. Every file made and deleted costs
        // inode allocation, which on a busy file system is not free.
        let mut buf = vec![0u8; INGEST_BUFFER];
        let mut filled = 0;
        while filled < buf.len() {
            let n = source
                .read(&mut buf[filled..])
                .ctx(|| "reading an output".into())?;
            if n == 0 {
                let data = &buf[..filled];
                let d = Digest::of(data);
                if !d.is_empty_blob() {
                    self.write_hashed(&d, data)?;
                }
                return Ok(d);
            }
            filled += n;
        }
        let staged = self.staging_file();
        let result = (|| {
            let mut out =
                fs::File::create(&staged).ctx(|| format!("creating {}", staged.display()))?;
            let mut hasher = DigestHasher::default();
            let mut n = filled;
            while n > 0 {
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .ctx(|| format!("writing {}", staged.display()))?;
                n = source.read(&mut buf).ctx(|| "reading an output".into())?;
            }
            let d = hasher.finish();
            self.commit(&d, &staged).map(|_| d)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&staged);
        }
        result
    }

    fn write_bytes(&self, d: &Digest, data: &[u8]) -> StoreResult<()> {
        verify(d, data)?;
        self.write_hashed(d, data)
    }

    /// Stores `data`, which the caller has just hashed to `d`.
    fn write_hashed(&self, d: &Digest, data: &[u8]) -> StoreResult<()> {
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

    /// Opens a present, non-empty blob whose file has the digest's size.
    fn open_checked(&self, d: &Digest) -> StoreResult<fs::File> {
        if !self.lock().touch(d) {
            return Err(StoreError::NotFound(*d));
        }
        let path = self.path_of(d);
        let file = match fs::File::open(&path) {
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
            self.lock().doom(d);
            self.unlink(&[*d]);
            return Err(StoreError::NotFound(*d));
        }
        Ok(file)
    }

    fn read_range(&self, d: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        if d.is_empty_blob() {
            clamp_range(d, 0, offset, limit)?;
            return Ok(Bytes::new());
        }
        let mut file = self.open_checked(d)?;
        let path = self.path_of(d);
        let (start, count) = clamp_range(d, d.size(), offset, limit)?;
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

/// Hashes a file and checks it is the blob `d` names.
pub(crate) fn check_file(d: &Digest, path: &Path) -> StoreResult<()> {
    StoreError::check_digest(d, hash_file(path)?)
}

/// Runs file work on the blocking pool (the store's, the action cache's
/// and the object tier's).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::io("store worker thread", std::io::Error::other(e)))?
}

impl DiskStore {
    /// Takes the file at `path` (which must hash to `digest`) into the
    /// store: a rename when it is on the store's file system (stage it in
    /// [`DiskStore::staging_dir`]), else a copy. The file is gone afterwards,
    /// whatever the outcome.
    pub async fn adopt_file(&self, digest: &Digest, path: &Path) -> StoreResult<()> {
        self.adopt(digest, StagedFile::new(path.to_path_buf()))
            .await
    }

    /// [`DiskStore::adopt_file`] of a file whose guard comes along: dropped
    /// before the work starts, it removes the file.
    pub async fn adopt(&self, digest: &Digest, file: StagedFile) -> StoreResult<()> {
        let inner = self.inner.clone();
        let d = *digest;
        blocking(move || {
            let path = file.keep();
            let adopted = inner.adopt(&d, &path);
            if adopted.is_err() {
                let _ = fs::remove_file(&path);
            }
            adopted
        })
        .await
    }

    /// Where a caller may stage files for [`DiskStore::adopt_file`] so that
    /// adoption is a rename.
    pub fn staging_dir(&self) -> &Path {
        &self.inner.staging
    }

    /// A private hard link to a stored blob, in the staging directory: a
    /// file to hand to another store's [`BlobSource::File`] write without
    /// copying, which eviction cannot pull away.
    pub async fn link_out(&self, digest: &Digest) -> StoreResult<StagedFile> {
        let inner = self.inner.clone();
        let d = *digest;
        blocking(move || {
            let link = inner.staging_file();
            if d.is_empty_blob() {
                fs::write(&link, b"").ctx(|| format!("creating {}", link.display()))?;
                return Ok(StagedFile::new(link));
            }
            drop(inner.open_checked(&d)?);
            fs::hard_link(inner.path_of(&d), &link).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StoreError::NotFound(d)
                } else {
                    StoreError::io(format!("linking {} out of the store", d), e)
                }
            })?;
            Ok(StagedFile::new(link))
        })
        .await
    }

    /// A fresh, unused path in [`DiskStore::staging_dir`].
    pub fn staging_file(&self) -> PathBuf {
        self.inner.staging_file()
    }
}

impl Inner {
    fn adopt(&self, d: &Digest, path: &Path) -> StoreResult<()> {
        check_file(d, path)?;
        if d.is_empty_blob() {
            let _ = fs::remove_file(path);
            return Ok(());
        }
        let staged = if path.starts_with(&self.staging) {
            path.to_path_buf()
        } else {
            let staged = self.staging_file();
            if fs::rename(path, &staged).is_err() {
                fs::copy(path, &staged)
                    .ctx(|| format!("copying {} into the store", path.display()))?;
                let _ = fs::remove_file(path);
            }
            staged
        };
        self.commit(d, &staged).inspect_err(|_| {
            let _ = fs::remove_file(&staged);
        })
    }
}

/// Streams `[start, start+len)` of an open blob file, a chunk per hand-off
/// to the blocking pool.
fn file_stream(file: fs::File, path: PathBuf, start: u64, len: u64) -> BlobStream {
    let state = (Arc::new(Mutex::new(file)), start, start + len);
    stream::try_unfold(state, move |(file, pos, end)| {
        let path = path.clone();
        async move {
            if pos >= end {
                return Ok(None);
            }
            let n = (end - pos).min(READ_CHUNK);
            let f = file.clone();
            let chunk = blocking(move || {
                let mut file = f.lock().unwrap_or_else(|p| p.into_inner());
                let mut buf = vec![0u8; n as usize];
                file.seek(SeekFrom::Start(pos))
                    .and_then(|_| file.read_exact(&mut buf))
                    .ctx(|| format!("reading {}", path.display()))?;
                Ok(Bytes::from(buf))
            })
            .await?;
            Ok(Some((chunk, (file, pos + n, end))))
        }
    })
    .boxed()
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
        // Even a small read is a syscall that can stall on a busy disk, so
        // every read goes to the blocking pool (a hand-off costs microseconds).
        let inner = self.inner.clone();
        let d = *digest;
        blocking(move || inner.read_range(&d, offset, limit)).await
    }

    async fn read_stream(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<BlobStream> {
        let (start, len) = clamp_range(digest, digest.size(), offset, limit)?;
        if len <= READ_CHUNK {
            let data = self.read(digest, offset, limit).await?;
            return Ok(stream::once(async move { Ok(data) }).boxed());
        }
        let inner = self.inner.clone();
        let d = *digest;
        let file = blocking(move || inner.open_checked(&d)).await?;
        Ok(file_stream(file, self.path_of(digest), start, len))
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        match source {
            BlobSource::Bytes(data) => {
                let inner = self.inner.clone();
                let d = *digest;
                blocking(move || inner.write_bytes(&d, &data)).await
            }
            BlobSource::File(file) => self.adopt(digest, file).await,
        }
    }
}

impl Pins for DiskStore {
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
}

impl Occupancy for DiskStore {
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
mod tests;
