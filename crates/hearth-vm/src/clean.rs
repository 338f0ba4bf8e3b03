//! Clean snapshots (issue 11): per VM configuration, one VM booted until its
//! agent (and dockerd, if asked) answers, and saved before any action ran in
//! it. Fresh VMs become clones of it. Unlike a recycled runner's snapshot
//! (`snapshots.rs`), a clean one is never consumed: clones map its memory
//! privately and see its scratch disk through an overlay, so its files are
//! immutable once stored. A newer snapshot replaces an older one by moving a
//! complete directory into place; an old one is deleted only when no clone
//! is being prepared from it (clones already running keep their open files,
//! so unlinking under them is safe).
//!
//! Plain blocking file work: callers on an async runtime use
//! `spawn_blocking`.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::VmError;

/// Bumped when what a clean snapshot holds or means changes; others are
/// deleted when the store opens.
pub const CLEAN_FORMAT: u32 = 1;
const META_FILE: &str = "meta.json";
const STAGING_PREFIX: &str = ".staging-";

/// What a clone needs, besides the files, to start with the command line
/// the snapshot was saved with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanMeta {
    pub format: u32,
    /// The VM configuration's key (VMM, kernel, agent, image, size,
    /// network, dockerd).
    pub key: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub network: bool,
    pub dockerd: bool,
    /// The workspace disk's size at save time (a bigger one needs a resize).
    pub work_size: u64,
    pub saved_unix_secs: u64,
}

/// A snapshot a clone is being made from: while held, it is not deleted.
pub struct CleanSnapshot {
    pub dir: PathBuf,
    pub meta: CleanMeta,
    _hold: Arc<()>,
}

struct Entry {
    dir: PathBuf,
    meta: CleanMeta,
    /// Disk blocks its files take (they are sparse).
    bytes: u64,
    last_used: u64,
    hold: Arc<()>,
}

impl Entry {
    fn held(&self) -> bool {
        Arc::strong_count(&self.hold) > 1
    }
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Entry>,
    /// Replaced or evicted while a clone was being prepared from it.
    retired: Vec<Entry>,
    clock: u64,
}

impl Inner {
    /// Makes the snapshot in `dir` the live one of its key, the most
    /// recently used; returns the one it replaces.
    fn add(&mut self, dir: PathBuf, meta: &CleanMeta) -> Option<Entry> {
        self.clock += 1;
        let entry = Entry {
            bytes: allocated(&dir),
            last_used: self.clock,
            hold: Arc::new(()),
            dir,
            meta: meta.clone(),
        };
        self.live.insert(meta.key.clone(), entry)
    }
}

pub struct CleanStore {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

/// Disk blocks the files directly in `dir` take, in bytes (sparse files
/// count what they hold, not their length).
pub(crate) fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn read_meta(dir: &Path) -> Option<CleanMeta> {
    let body = std::fs::read(dir.join(META_FILE)).ok()?;
    serde_json::from_slice::<CleanMeta>(&body)
        .ok()
        .filter(|m| m.format == CLEAN_FORMAT)
}

fn delete(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not delete a clean snapshot");
    }
}

impl CleanStore {
    /// Opens (creating) the store, bounded to `max_bytes` of disk, deleting
    /// interrupted saves and snapshots of another format (or a second one
    /// of a key: the newest is kept).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, VmError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| VmError::io(format!("creating {}", dir.display()), e))?;
        let list = std::fs::read_dir(dir)
            .map_err(|e| VmError::io(format!("reading {}", dir.display()), e))?;
        let mut inner = Inner::default();
        let mut found: Vec<(PathBuf, CleanMeta)> = vec![];
        for path in list.flatten().map(|e| e.path()) {
            match read_meta(&path) {
                Some(meta) if path.is_dir() => found.push((path, meta)),
                _ => {
                    tracing::info!(path = %path.display(), "deleting an incomplete or outdated clean snapshot");
                    if path.is_dir() {
                        delete(&path);
                    } else {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort_by_key(|(_, m)| m.saved_unix_secs);
        for (dir, meta) in found {
            if let Some(older) = inner.add(dir, &meta) {
                delete(&older.dir);
            }
        }
        let store = CleanStore {
            dir: dir.to_path_buf(),
            max_bytes,
            inner: Mutex::new(inner),
        };
        store.evict(&mut store.lock());
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new, empty directory inside the store to save a VM into; `put`
    /// makes it a snapshot. Left behind (a crash), `open` deletes it.
    pub fn staging(&self) -> Result<PathBuf, VmError> {
        let dir = self
            .dir
            .join(format!("{STAGING_PREFIX}{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir)
            .map_err(|e| VmError::io(format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }

    /// Makes the saved VM in `staging` the snapshot of `meta.key`,
    /// replacing any older one, then keeps the store within its bound.
    pub fn put(&self, staging: &Path, meta: &CleanMeta) -> Result<(), VmError> {
        let body = serde_json::to_vec_pretty(meta)
            .map_err(|e| VmError::Setup(format!("encoding a clean snapshot's metadata: {e}")))?;
        let tmp = staging.join("meta.json.tmp");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, staging.join(META_FILE)))
            .map_err(|e| VmError::io("writing a clean snapshot's metadata", e))?;
        let dir = self.dir.join(uuid::Uuid::new_v4().to_string());
        std::fs::rename(staging, &dir)
            .map_err(|e| VmError::io(format!("moving {} into place", staging.display()), e))?;
        let mut inner = self.lock();
        if let Some(old) = inner.add(dir, meta) {
            inner.retired.push(old);
        }
        self.evict(&mut inner);
        Ok(())
    }

    /// The snapshot of `key`, held (not deleted) until the returned value
    /// is dropped; it stays in the store for further clones.
    pub fn get(&self, key: &str) -> Option<CleanSnapshot> {
        let mut inner = self.lock();
        // Retired snapshots whose clones have started go now.
        self.evict(&mut inner);
        inner.clock += 1;
        let now = inner.clock;
        let e = inner.live.get_mut(key)?;
        e.last_used = now;
        Some(CleanSnapshot {
            dir: e.dir.clone(),
            meta: e.meta.clone(),
            _hold: e.hold.clone(),
        })
    }

    /// How long ago the snapshot of `key` was saved, if there is one.
    pub fn age(&self, key: &str) -> Option<std::time::Duration> {
        let saved = self.lock().live.get(key)?.meta.saved_unix_secs;
        Some(std::time::Duration::from_secs(
            crate::snapshots::now_secs().saturating_sub(saved),
        ))
    }

    /// [`CleanStore::staging`] off the async threads.
    pub async fn staging_async(self: &Arc<Self>) -> Result<PathBuf, VmError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.staging())
            .await
            .map_err(|e| VmError::Setup(format!("making a staging directory: {e}")))?
    }

    /// Drops `snap` from the store (it failed to clone: damaged, or not
    /// what this QEMU can load); deleted once no other clone is being made
    /// from it. A newer snapshot of its key is left alone.
    pub fn discard(&self, snap: &CleanSnapshot) {
        let mut inner = self.lock();
        if inner
            .live
            .get(&snap.meta.key)
            .is_some_and(|e| e.dir == snap.dir)
        {
            if let Some(e) = inner.live.remove(&snap.meta.key) {
                inner.retired.push(e);
            }
        }
        self.evict(&mut inner);
    }

    /// Drops the snapshot of `key`, if any (deleted once no clone is being
    /// made from it).
    pub fn discard_key(&self, key: &str) {
        let mut inner = self.lock();
        if let Some(e) = inner.live.remove(key) {
            inner.retired.push(e);
        }
        self.evict(&mut inner);
    }

    /// Disk blocks the store's snapshots take now.
    pub fn bytes(&self) -> u64 {
        let inner = self.lock();
        inner
            .live
            .values()
            .chain(&inner.retired)
            .map(|e| e.bytes)
            .sum()
    }

    /// Deletes retired snapshots no clone is being made from, then the
    /// least recently used live ones until the live ones fit the bound (a
    /// held one waits in `retired`). Retired ones do not count: they go as
    /// soon as their clone has started, seconds later, and counting them
    /// would evict snapshots that are still wanted.
    fn evict(&self, inner: &mut Inner) {
        self.evict_to_bound(inner);
        let bytes: u64 = inner
            .live
            .values()
            .chain(&inner.retired)
            .map(|e| e.bytes)
            .sum();
        metrics::gauge!("hearth_vm_clean_snapshots").set(inner.live.len() as f64);
        metrics::gauge!("hearth_vm_clean_snapshot_bytes").set(bytes as f64);
    }

    fn evict_to_bound(&self, inner: &mut Inner) {
        let retired = std::mem::take(&mut inner.retired);
        let (held, free): (Vec<Entry>, Vec<Entry>) = retired.into_iter().partition(Entry::held);
        inner.retired = held;
        for e in free {
            delete(&e.dir);
        }
        loop {
            let total: u64 = inner
                .live
                .values()
                .chain(&inner.retired)
                .map(|e| e.bytes)
                .sum();
            if total <= self.max_bytes {
                return;
            }
            let Some(key) = inner
                .live
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            let Some(e) = inner.live.remove(&key) else {
                return;
            };
            tracing::info!(key = %key, bytes = e.bytes, "evicting a clean snapshot beyond the bound");
            if e.held() {
                inner.retired.push(e);
            } else {
                delete(&e.dir);
            }
        }
    }
}

#[cfg(test)]
#[path = "clean_tests.rs"]
mod tests;
