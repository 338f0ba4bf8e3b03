//! The action cache: action digest → ActionResult, bounded in bytes with
//! least-recently-used eviction (a `get` that finds an entry counts as a use).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use hearth_proto::reapi::ActionResult;
use prost::Message;

use crate::disk::blocking;
use crate::error::IoContext;
use crate::{Digest, StoreError, StoreResult};

/// The action cache's key for `action` run by `tenant` on `instance`: a
/// digest of the three, so that no tenant or instance name reads or
/// overwrites another's results. Each string goes in with its length in
/// front, so no two different triples hash alike; the size is the action's.
pub fn action_key(tenant: &str, instance: &str, action: &Digest) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for s in [tenant.as_bytes(), instance.as_bytes()] {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s);
    }
    h.update(action.hash());
    h.update(action.size().to_be_bytes());
    Digest::new(h.finalize().into(), action.size())
}

#[async_trait]
pub trait ActionCache: Send + Sync + 'static {
    async fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>>;
    async fn put(&self, action: &Digest, result: &ActionResult) -> StoreResult<()>;
    /// Forgets an entry (e.g. one whose outputs were evicted from the CAS).
    async fn remove(&self, action: &Digest) -> StoreResult<()>;
}

/// Which entries exist, how big they are and in which order they were last
/// used; `evict_to` names the least recently used ones to drop.
#[derive(Default)]
struct Lru {
    /// Entry → (bytes, last-use tick).
    entries: HashMap<Digest, (u64, u64)>,
    /// Last-use tick → entry; the first is the least recently used.
    order: BTreeMap<u64, Digest>,
    /// Out of `entries`, file not yet deleted (the disk cache deletes
    /// without the lock; nothing may write that entry until it is done).
    doomed: HashSet<Digest>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn touch(&mut self, d: &Digest) -> bool {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(d) {
            Some((_, t)) => {
                self.order.remove(t);
                *t = tick;
                self.order.insert(tick, *d);
                true
            }
            None => false,
        }
    }

    /// Adds or replaces an entry as the most recently used.
    fn insert(&mut self, d: &Digest, bytes: u64) {
        self.remove(d);
        self.tick += 1;
        self.entries.insert(*d, (bytes, self.tick));
        self.order.insert(self.tick, *d);
        self.bytes += bytes;
    }

    fn remove(&mut self, d: &Digest) {
        if let Some((bytes, tick)) = self.entries.remove(d) {
            self.order.remove(&tick);
            self.bytes -= bytes;
        }
    }

    /// Drops least recently used entries until at most `limit` bytes remain
    /// (0 = unbounded); returns them, doomed until [`Lru::unlinked`].
    fn evict_to(&mut self, limit: u64) -> Vec<Digest> {
        let mut victims = Vec::new();
        if limit == 0 {
            return victims;
        }
        while self.bytes > limit {
            let Some((_, d)) = self.order.pop_first() else {
                break;
            };
            if let Some((bytes, _)) = self.entries.remove(&d) {
                self.bytes -= bytes;
            }
            self.doomed.insert(d);
            victims.push(d);
        }
        victims
    }

    /// Removes an entry whose file the caller deletes next, without the lock.
    fn doom(&mut self, d: &Digest) {
        self.remove(d);
        self.doomed.insert(*d);
    }

    fn unlinked(&mut self, victims: &[Digest]) {
        for d in victims {
            self.doomed.remove(d);
        }
    }
}

/// In memory, bounded to `max_bytes` of encoded results (0 = unbounded).
#[derive(Default)]
pub struct MemoryActionCache {
    max_bytes: u64,
    inner: Mutex<(HashMap<Digest, ActionResult>, Lru)>,
}

impl MemoryActionCache {
    pub fn new(max_bytes: u64) -> Self {
        MemoryActionCache {
            max_bytes,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (HashMap<Digest, ActionResult>, Lru)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl ActionCache for MemoryActionCache {
    async fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>> {
        let mut inner = self.lock();
        inner.1.touch(action);
        Ok(inner.0.get(action).cloned())
    }

    async fn put(&self, action: &Digest, result: &ActionResult) -> StoreResult<()> {
        let mut inner = self.lock();
        let (entries, lru) = &mut *inner;
        entries.insert(*action, result.clone());
        lru.insert(action, result.encoded_len() as u64);
        for d in lru.evict_to(self.max_bytes) {
            entries.remove(&d);
        }
        Ok(())
    }

    async fn remove(&self, action: &Digest) -> StoreResult<()> {
        let mut inner = self.lock();
        inner.0.remove(action);
        inner.1.remove(action);
        Ok(())
    }
}

/// One file per entry under `ac/`, replaced atomically, bounded to
/// `max_bytes` of files (0 = unbounded). The use order survives restarts: a
/// hit sets the entry file's modification time, and `open` orders entries by
/// it. All file work runs on the blocking pool.
pub struct DiskActionCache {
    inner: Arc<DiskInner>,
}

struct DiskInner {
    dir: PathBuf,
    staging: PathBuf,
    max_bytes: u64,
    /// Held while an entry file is renamed into place, so the index and
    /// the directory agree; deletions happen after it is released (see
    /// [`DiskInner::unlink`]).
    lru: Mutex<Lru>,
    /// Signalled when doomed entries' files are gone.
    unlinked: Condvar,
}

impl DiskActionCache {
    /// Opens (creating) the cache under `root/ac`, indexing what is there
    /// (oldest use first) and evicting down to `max_bytes`.
    pub fn open(root: &Path, max_bytes: u64) -> StoreResult<Self> {
        let dir = root.join("ac");
        let staging = root.join("ac-staging");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).ctx(|| format!("creating {}", staging.display()))?;
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let meta = entry
                .metadata()
                .ctx(|| format!("stat {}", entry.path().display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match parse_entry_name(&name) {
                Some(d) if meta.is_file() => found.push((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    d,
                    meta.len(),
                )),
                _ => {
                    tracing::warn!(path = %entry.path().display(), "removing stray file from the action cache");
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let mut lru = Lru::default();
        for (_, d, len) in &found {
            lru.insert(d, *len);
        }
        let inner = DiskInner {
            dir,
            staging,
            max_bytes,
            lru: Mutex::new(lru),
            unlinked: Condvar::new(),
        };
        let victims = inner.lock().evict_to(max_bytes);
        inner.unlink(&victims);
        Ok(DiskActionCache {
            inner: Arc::new(inner),
        })
    }

    /// Entries and their bytes.
    pub fn stats(&self) -> (usize, u64) {
        let lru = self.inner.lock();
        (lru.entries.len(), lru.bytes)
    }
}

fn parse_entry_name(name: &str) -> Option<Digest> {
    let (hash, size) = name.split_once('-')?;
    Digest::parse(hash, size.parse().ok()?).ok()
}

impl DiskInner {
    fn lock(&self) -> MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{}-{}", d.hash_hex(), d.size()))
    }

    /// Deletes the files of doomed entries, without the lock (other
    /// lookups need not wait on the disk). A put of the same entry waits
    /// for this (see [`DiskInner::put`]), so a late delete never removes a
    /// fresh result.
    fn unlink(&self, victims: &[Digest]) {
        if victims.is_empty() {
            return;
        }
        for d in victims {
            tracing::debug!(action = %d, "deleting action cache entry");
            let _ = fs::remove_file(self.path_of(d));
        }
        self.lock().unlinked(victims);
        self.unlinked.notify_all();
    }

    fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>> {
        let path = self.path_of(action);
        let read = fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .and_then(|mut f| {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)?;
                // The use order, for the next open.
                let _ = f.set_modified(SystemTime::now());
                Ok(bytes)
            });
        match read {
            Ok(bytes) => match ActionResult::decode(bytes.as_slice()) {
                Ok(r) => {
                    self.lock().touch(action);
                    Ok(Some(r))
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "dropping undecodable action cache entry");
                    self.remove(action);
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Evicted meanwhile, or deleted from outside: forget it.
                let mut lru = self.lock();
                if !path.exists() {
                    lru.remove(action);
                }
                Ok(None)
            }
            Err(e) => Err(StoreError::io(format!("reading {}", path.display()), e)),
        }
    }

    fn put(&self, action: &Digest, bytes: &[u8]) -> StoreResult<()> {
        let staged = self.staging.join(uuid::Uuid::new_v4().to_string());
        let target = self.path_of(action);
        let written = fs::File::create(&staged)
            .and_then(|mut f| f.write_all(bytes))
            .ctx(|| format!("writing {}", staged.display()));
        if written.is_err() {
            let _ = fs::remove_file(&staged);
            return written;
        }
        let victims = {
            let mut lru = self
                .unlinked
                .wait_while(self.lock(), |lru| lru.doomed.contains(action))
                .unwrap_or_else(|p| p.into_inner());
            if let Err(e) = fs::rename(&staged, &target) {
                drop(lru);
                let _ = fs::remove_file(&staged);
                return Err(StoreError::io(format!("writing {}", target.display()), e));
            }
            lru.insert(action, bytes.len() as u64);
            lru.evict_to(self.max_bytes)
        };
        self.unlink(&victims);
        Ok(())
    }

    fn remove(&self, action: &Digest) {
        self.lock().doom(action);
        self.unlink(&[*action]);
    }
}

#[async_trait]
impl ActionCache for DiskActionCache {
    async fn get(&self, action: &Digest) -> StoreResult<Option<ActionResult>> {
        let (inner, action) = (self.inner.clone(), *action);
        blocking(move || inner.get(&action)).await
    }

    async fn put(&self, action: &Digest, result: &ActionResult) -> StoreResult<()> {
        let (inner, action, bytes) = (self.inner.clone(), *action, result.encode_to_vec());
        blocking(move || inner.put(&action, &bytes)).await
    }

    async fn remove(&self, action: &Digest) -> StoreResult<()> {
        let (inner, action) = (self.inner.clone(), *action);
        blocking(move || {
            inner.remove(&action);
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(exit_code: i32, size: usize) -> ActionResult {
        ActionResult {
            exit_code,
            stdout_raw: vec![b'x'; size],
            ..Default::default()
        }
    }

    fn key(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[tokio::test]
    async fn disk_ac_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = Digest::of(b"action");
        let result = ActionResult {
            exit_code: 3,
            ..Default::default()
        };
        {
            let ac = DiskActionCache::open(dir.path(), 0).unwrap();
            assert!(ac.get(&key).await.unwrap().is_none());
            ac.put(&key, &result).await.unwrap();
        }
        let ac = DiskActionCache::open(dir.path(), 0).unwrap();
        assert_eq!(ac.get(&key).await.unwrap(), Some(result));
        ac.remove(&key).await.unwrap();
        assert!(ac.get(&key).await.unwrap().is_none());
        assert_eq!(ac.stats(), (0, 0));
    }

    /// Three entries of ~1000 bytes under a 2500-byte bound: putting the
    /// third evicts the least recently used, and a get counts as a use.
    async fn evicts_least_recently_used(ac: &dyn ActionCache) {
        let entry = result(0, 1000).encoded_len();
        assert!(entry * 2 < 2500 && entry * 3 > 2500, "{entry}");
        ac.put(&key(1), &result(1, 1000)).await.unwrap();
        ac.put(&key(2), &result(2, 1000)).await.unwrap();
        // 1 is used after 2 was written, so 2 is now the least recent.
        assert!(ac.get(&key(1)).await.unwrap().is_some());
        ac.put(&key(3), &result(3, 1000)).await.unwrap();
        assert!(ac.get(&key(2)).await.unwrap().is_none(), "2 was evicted");
        assert_eq!(ac.get(&key(1)).await.unwrap().unwrap().exit_code, 1);
        assert_eq!(ac.get(&key(3)).await.unwrap().unwrap().exit_code, 3);
        // Replacing an entry does not count it twice.
        ac.put(&key(3), &result(3, 1000)).await.unwrap();
        assert!(ac.get(&key(1)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn memory_ac_evicts_least_recently_used() {
        evicts_least_recently_used(&MemoryActionCache::new(2500)).await;
    }

    #[tokio::test]
    async fn disk_ac_evicts_least_recently_used_and_deletes_files() {
        let dir = tempfile::tempdir().unwrap();
        let ac = DiskActionCache::open(dir.path(), 2500).unwrap();
        evicts_least_recently_used(&ac).await;
        let (entries, bytes) = ac.stats();
        assert_eq!(entries, 2);
        assert!(bytes <= 2500);
        let files = fs::read_dir(dir.path().join("ac")).unwrap().count();
        assert_eq!(files, 2, "the evicted entry's file is deleted");
    }

    #[tokio::test]
    async fn disk_ac_reopen_keeps_the_use_order_and_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ac = DiskActionCache::open(dir.path(), 0).unwrap();
            for n in 1..=3 {
                ac.put(&key(n), &result(n as i32, 1000)).await.unwrap();
            }
            // Written long ago, 1 first: without the hit below, 1 would be
            // the least recently used.
            let now = SystemTime::now();
            for (n, age) in [(1, 30), (2, 20), (3, 10)] {
                fs::File::options()
                    .write(true)
                    .open(ac.inner.path_of(&key(n)))
                    .unwrap()
                    .set_modified(now - std::time::Duration::from_secs(age))
                    .unwrap();
            }
            assert!(ac.get(&key(1)).await.unwrap().is_some());
        }
        // Reopened with room for two: the least recently used (2) goes.
        let ac = DiskActionCache::open(dir.path(), 2500).unwrap();
        assert_eq!(ac.stats().0, 2);
        assert!(ac.get(&key(2)).await.unwrap().is_none());
        assert!(ac.get(&key(1)).await.unwrap().is_some());
        assert!(ac.get(&key(3)).await.unwrap().is_some());
    }

    /// Puts, removes and evictions of the same entries from many threads:
    /// deletions run outside the lock, yet the index and the directory
    /// still agree at the end (no indexed entry lost its file, no file is
    /// outside the index).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_ac_concurrent_puts_removes_and_evictions_agree_with_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ac = Arc::new(DiskActionCache::open(dir.path(), 5000).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u8 {
            let ac = ac.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..150u8 {
                    let k = key((i + t) % 10);
                    if i % 5 == 4 {
                        ac.remove(&k).await.unwrap();
                    } else {
                        ac.put(&k, &result(i as i32, 1000)).await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let lru = ac.inner.lock();
        for d in lru.entries.keys() {
            assert!(
                ac.inner.path_of(d).exists(),
                "{d} is indexed but its file is gone"
            );
        }
        let files = fs::read_dir(dir.path().join("ac")).unwrap().count();
        assert_eq!(files, lru.entries.len(), "no file outside the index");
        assert!(lru.doomed.is_empty());
    }
}
