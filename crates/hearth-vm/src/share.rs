//! Runner snapshots shared through the CAS, so that an executor that never
//! ran a runner key can start from another's warm VM. A snapshot is a
//! manifest (JSON, a CAS blob) of its files (device state, memory, scratch
//! disk) cut in fixed-size chunks: all-zero chunks (most of a memory file)
//! are left out, each other chunk is a CAS blob, compressed with zstd when
//! that saves a tenth, so equal chunks are stored and fetched once. Every
//! chunk names its blob by SHA-256 (of the stored bytes, checked when it is
//! fetched and again when it is written out) and carries the SHA-256 of
//! its raw bytes (so an unchanged chunk is not compressed again); a
//! manifest of another format, or of another runner key (another QEMU,
//! kernel, agent, image or size), is refused.
//!
//! Chunk work (reading, hashing, compressing, writing) is blocking and runs
//! on the blocking pool: one chunk at a time when publishing (in the
//! background), a few at once when fetching (an action waits), so memory
//! stays at a few chunks.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use hearth_executor::{ExecError, LocalCas, SharedSnapshot};
use hearth_storage::{BlobStore, Digest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::clean::{CleanMeta, CLEAN_FORMAT};
use crate::park::runner_snapshot_key;
use crate::snapshots::{MEMORY_FILE, SCRATCH_FILE, STATE_FILE};
use crate::VmError;

/// Bumped when the manifest's layout or meaning changes.
pub const SHARE_FORMAT: u32 = 1;
const CHUNK_SIZE: u64 = 2 << 20;
/// The files of a shared snapshot; a manifest naming others is refused.
const FILES: [&str; 3] = [STATE_FILE, MEMORY_FILE, SCRATCH_FILE];
/// A runner key is published again at most this often.
const REPUBLISH_AFTER: Duration = Duration::from_secs(30);
/// Most chunk hashes remembered (raw hash → stored blob), so that a chunk
/// unchanged since the last publication is not compressed again.
const KNOWN_CHUNKS: usize = 200_000;
/// Largest manifest read (a 64 GiB disk in 2 MiB chunks is ~6 MB of JSON).
const MAX_MANIFEST: u64 = 64 << 20;
/// Chunks unpacked at once when a snapshot is fetched.
const UNPACK_PARALLELISM: usize = 4;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub meta: CleanMeta,
    pub chunk_size: u64,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// Its offset in the file, in chunks.
    pub index: u64,
    /// SHA-256 of the chunk's bytes (before compression), hex: what
    /// publication deduplicates by.
    pub sha256: String,
    /// The CAS blob holding it.
    pub blob: String,
    pub blob_size: u64,
    pub zstd: bool,
}

impl Chunk {
    fn digest(&self) -> Result<Digest, VmError> {
        Digest::parse(&self.blob, self.blob_size.min(i64::MAX as u64) as i64)
            .map_err(|e| VmError::Setup(format!("a chunk's digest: {e}")))
    }
}

/// Publishing and fetching for one executor.
pub(crate) struct Sharing {
    cas: LocalCas,
    /// Publications not yet reported to the server.
    published: Mutex<Vec<SharedSnapshot>>,
    last: Mutex<HashMap<String, Instant>>,
    known: Mutex<HashMap<[u8; 32], (Digest, bool)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn store_err(what: &str) -> impl FnOnce(ExecError) -> VmError + '_ {
    move |e| VmError::Setup(format!("{what}: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VmError> + Send + 'static,
) -> Result<T, VmError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VmError::Setup(format!("snapshot chunk work: {e}")))?
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> VmError {
    move |e| VmError::io(what, e)
}

/// The offset of the first data at or after `offset` (SEEK_DATA), or the
/// file's end if only a hole follows.
fn next_data(file: &File, offset: u64, size: u64) -> u64 {
    // SAFETY: lseek on a descriptor we own; it only moves the offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: nothing but a hole to the end. Other errors: read it all.
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            size
        } else {
            offset
        };
    }
    r as u64
}

/// Reads chunk `index` of `path`, or None if it is all zero.
fn read_chunk(path: &Path, index: u64, size: u64) -> Result<Option<Vec<u8>>, VmError> {
    let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let start = index * CHUNK_SIZE;
    let len = CHUNK_SIZE.min(size - start) as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, start)
        .map_err(io(format!("reading {}", path.display())))?;
    Ok(buf.iter().any(|b| *b != 0).then_some(buf))
}

/// The indexes of the chunks of `path` that hold data (holes skipped).
fn data_chunks(path: &Path) -> Result<(u64, Vec<u64>), VmError> {
    let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let size = file
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    let mut chunks = vec![];
    let mut index = 0;
    while index * CHUNK_SIZE < size {
        let data = next_data(&file, index * CHUNK_SIZE, size);
        if data >= size {
            break;
        }
        index = index.max(data / CHUNK_SIZE);
        chunks.push(index);
        index += 1;
    }
    Ok((size, chunks))
}

impl Sharing {
    pub fn new(cas: LocalCas) -> Self {
        Sharing {
            cas,
            published: Mutex::default(),
            last: Mutex::default(),
            known: Mutex::default(),
        }
    }

    /// Publications since the last call, for the executor's next message.
    pub fn take_published(&self) -> Vec<SharedSnapshot> {
        std::mem::take(&mut *lock(&self.published))
    }

    /// Whether `runner_key` is due to be published.
    pub fn due(&self, runner_key: &str) -> bool {
        lock(&self.last)
            .get(runner_key)
            .is_none_or(|t| t.elapsed() >= REPUBLISH_AFTER)
    }

    /// Stores the snapshot in `dir` (its files named as in [`FILES`]) in
    /// the CAS, on the server too, and queues its publication.
    pub async fn publish(
        &self,
        runner_key: &str,
        affinity_key: &str,
        dir: &Path,
        meta: &CleanMeta,
    ) -> Result<Digest, VmError> {
        lock(&self.last).insert(runner_key.to_string(), Instant::now());
        let store = self.cas.local().clone();
        let mut files = vec![];
        let mut blobs = vec![];
        for name in FILES {
            let path = dir.join(name);
            let p = path.clone();
            let (size, indexes) = blocking(move || data_chunks(&p)).await?;
            let mut chunks = vec![];
            for index in indexes {
                let p = path.clone();
                let Some(raw) = blocking(move || read_chunk(&p, index, size)).await? else {
                    continue;
                };
                let sha: [u8; 32] = Sha256::digest(&raw).into();
                let known = lock(&self.known).get(&sha).copied();
                let (digest, zstd) = match known {
                    Some(k) if store.find_missing(&[k.0]).await.is_ok_and(|m| m.is_empty()) => k,
                    _ => {
                        let (digest, zstd, data) = blocking(move || pack(raw)).await?;
                        store
                            .put(&digest, data)
                            .await
                            .map_err(|e| VmError::Setup(format!("storing a chunk: {e}")))?;
                        let mut known = lock(&self.known);
                        if known.len() >= KNOWN_CHUNKS {
                            known.clear();
                        }
                        known.insert(sha, (digest, zstd));
                        (digest, zstd)
                    }
                };
                blobs.push(digest);
                chunks.push(Chunk {
                    index,
                    sha256: hex::encode(sha),
                    blob: digest.hash_hex(),
                    blob_size: digest.size(),
                    zstd,
                });
            }
            files.push(FileEntry {
                name: name.to_string(),
                size,
                chunks,
            });
        }
        let manifest = Manifest {
            format: SHARE_FORMAT,
            meta: meta.clone(),
            chunk_size: CHUNK_SIZE,
            files,
        };
        let body = Bytes::from(
            serde_json::to_vec(&manifest)
                .map_err(|e| VmError::Setup(format!("encoding a snapshot manifest: {e}")))?,
        );
        let digest = Digest::of(&body);
        store
            .put(&digest, body)
            .await
            .map_err(|e| VmError::Setup(format!("storing a snapshot manifest: {e}")))?;
        blobs.sort_by_key(|d| d.hash_hex());
        blobs.dedup();
        blobs.push(digest);
        self.cas
            .push(&blobs)
            .await
            .map_err(store_err("sending a snapshot to the server"))?;
        lock(&self.published).push(SharedSnapshot {
            affinity_key: affinity_key.to_string(),
            runner_key: runner_key.to_string(),
            manifest: Some(digest),
        });
        Ok(digest)
    }

    /// Withdraws the key's shared snapshot (its runner failed an action),
    /// and lets the next one be published at once.
    pub fn withdraw(&self, runner_key: &str, affinity_key: &str) {
        lock(&self.last).remove(runner_key);
        lock(&self.published).push(SharedSnapshot {
            affinity_key: affinity_key.to_string(),
            runner_key: runner_key.to_string(),
            manifest: None,
        });
    }

    /// The checked manifest of the snapshot `shared` names.
    pub async fn manifest(
        &self,
        shared: &SharedSnapshot,
        runner_key: &str,
    ) -> Result<Manifest, VmError> {
        if shared.runner_key != runner_key {
            return Err(VmError::Setup(
                "the shared snapshot is of another VM configuration".into(),
            ));
        }
        let Some(manifest) = shared.manifest else {
            return Err(VmError::Setup("the shared snapshot was withdrawn".into()));
        };
        if manifest.size() > MAX_MANIFEST {
            return Err(VmError::Setup("the snapshot manifest is too big".into()));
        }
        let body = self
            .cas
            .read(&manifest)
            .await
            .map_err(store_err("fetching the snapshot manifest"))?;
        parse_manifest(&body, runner_key)
    }

    /// Fetches the chunks `manifest` names (those not in the local cache)
    /// and writes its files into the directory `into`, checking each
    /// chunk's hash.
    pub async fn unpack(&self, manifest: Manifest, into: &Path) -> Result<(), VmError> {
        let t = Instant::now();
        let mut digests = vec![];
        for f in &manifest.files {
            for c in &f.chunks {
                digests.push(c.digest()?);
            }
        }
        let _pinned = self.cas.pin(digests.clone());
        self.cas
            .ensure(&digests)
            .await
            .map_err(store_err("fetching the snapshot's chunks"))?;
        let fetched = t.elapsed();
        let mut work = vec![];
        for f in manifest.files {
            let path = into.join(&f.name);
            let file = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
            file.set_len(f.size)
                .map_err(io(format!("sizing {}", path.display())))?;
            let file = std::sync::Arc::new(file);
            for c in f.chunks {
                work.push((self.cas.path_of(&c.digest()?), c, f.size, file.clone()));
            }
        }
        // Decompressing and hashing is most of the time: a few chunks at
        // once, each on the blocking pool.
        stream::iter(work)
            .map(|(blob, c, size, file)| blocking(move || unpack_into(&blob, &c, size, &file)))
            .buffer_unordered(UNPACK_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        tracing::debug!(
            chunks = digests.len(),
            fetch_ms = fetched.as_millis() as u64,
            unpack_ms = (t.elapsed() - fetched).as_millis() as u64,
            "shared snapshot fetched"
        );
        Ok(())
    }
}

/// Compresses a chunk when that saves a tenth; returns its blob.
fn pack(raw: Vec<u8>) -> Result<(Digest, bool, Bytes), VmError> {
    let packed = zstd::bulk::compress(&raw, 1)
        .map_err(|e| VmError::Setup(format!("compressing a chunk: {e}")))?;
    let (zstd, data) = if packed.len() < raw.len() - raw.len() / 10 {
        (true, Bytes::from(packed))
    } else {
        (false, Bytes::from(raw))
    };
    Ok((Digest::of(&data), zstd, data))
}

/// Checks a manifest from the CAS before anything is written from it.
pub(crate) fn parse_manifest(body: &[u8], runner_key: &str) -> Result<Manifest, VmError> {
    let m: Manifest = serde_json::from_slice(body)
        .map_err(|e| VmError::Setup(format!("the snapshot manifest does not parse: {e}")))?;
    if m.format != SHARE_FORMAT || m.meta.format != CLEAN_FORMAT {
        return Err(VmError::Setup(format!(
            "the shared snapshot has format {}/{}, this executor reads {SHARE_FORMAT}/{CLEAN_FORMAT}",
            m.format, m.meta.format
        )));
    }
    if m.meta.key != runner_snapshot_key(runner_key) {
        return Err(VmError::Setup(
            "the shared snapshot is of another VM configuration".into(),
        ));
    }
    if m.chunk_size != CHUNK_SIZE {
        return Err(VmError::Setup(format!(
            "the shared snapshot's chunks are {} bytes, not {CHUNK_SIZE}",
            m.chunk_size
        )));
    }
    let mut names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    let mut want = FILES.to_vec();
    want.sort_unstable();
    if names != want {
        return Err(VmError::Setup(format!(
            "the shared snapshot holds {names:?}, not {want:?}"
        )));
    }
    // The memory file is the VM's memory; the disks are bounded by the
    // largest VM there can be (whatever a hostile manifest says).
    for f in &m.files {
        let max = if f.name == MEMORY_FILE {
            m.meta.memory_mib << 20
        } else {
            1 << 40
        };
        if f.size > max {
            return Err(VmError::Setup(format!(
                "the shared snapshot's {} is {} bytes, over {max}",
                f.name, f.size
            )));
        }
        for c in &f.chunks {
            if c.index.saturating_mul(CHUNK_SIZE) >= f.size || c.blob_size > 2 * CHUNK_SIZE {
                return Err(VmError::Setup(format!(
                    "the shared snapshot's {} has a chunk out of bounds",
                    f.name
                )));
            }
        }
    }
    Ok(m)
}

/// Writes chunk `c`, read from its blob file, into `file`, checking the
/// blob's digest first (the stored bytes, often a quarter of the chunk's:
/// a damaged blob, local or fetched, never reaches the file).
fn unpack_into(blob: &PathBuf, c: &Chunk, size: u64, file: &File) -> Result<(), VmError> {
    let stored = std::fs::read(blob).map_err(io(format!("reading {}", blob.display())))?;
    let start = c.index * CHUNK_SIZE;
    let len = CHUNK_SIZE.min(size - start) as usize;
    let damaged = || {
        VmError::Setup(format!(
            "a chunk of the shared snapshot is damaged (chunk {} of {len} bytes)",
            c.index
        ))
    };
    if stored.len() as u64 != c.blob_size || hex::encode(Sha256::digest(&stored)) != c.blob {
        return Err(damaged());
    }
    let raw = if c.zstd {
        zstd::bulk::decompress(&stored, len).map_err(|_| damaged())?
    } else {
        stored
    };
    if raw.len() != len {
        return Err(damaged());
    }
    file.write_all_at(&raw, start)
        .map_err(io("writing a snapshot file".into()))
}

#[cfg(test)]
#[path = "share_tests.rs"]
mod tests;
