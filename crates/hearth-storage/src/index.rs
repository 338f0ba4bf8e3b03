//! In-memory bookkeeping for a size-bounded store: what is present, in which
//! order it was last used, which blobs are pinned by in-flight actions, and
//! which have left the index but whose files are still being deleted.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::Digest;

struct Entry {
    size: u64,
    tick: u64,
}

#[derive(Default)]
pub(crate) struct Index {
    entries: HashMap<[u8; 32], Entry>,
    /// Last-use tick → hash; the first entry is the least recently used.
    order: BTreeMap<u64, [u8; 32]>,
    pins: HashMap<[u8; 32], u32>,
    /// Removed from the index, file not yet unlinked: the unlink happens
    /// without the lock, so nothing may put a new file at that path until
    /// [`Index::unlinked`] (see `DiskStore`'s eviction).
    doomed: HashSet<[u8; 32]>,
    tick: u64,
    bytes: u64,
}

impl Index {
    /// Present with this exact size (a file whose size disagrees with its
    /// digest, e.g. truncated on disk, does not count).
    pub fn contains(&self, d: &Digest) -> bool {
        self.entries
            .get(d.hash())
            .is_some_and(|e| e.size == d.size())
    }

    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records a use (read or write) of a present blob. Returns false if absent.
    pub fn touch(&mut self, d: &Digest) -> bool {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(d.hash()) {
            Some(e) if e.size == d.size() => {
                self.order.remove(&e.tick);
                e.tick = tick;
                self.order.insert(tick, *d.hash());
                true
            }
            _ => false,
        }
    }

    /// Adds a blob as most recently used (no-op if present, apart from the touch).
    pub fn insert(&mut self, d: &Digest) {
        if self.touch(d) {
            return;
        }
        if let Some(stale) = self
            .entries
            .get(d.hash())
            .map(|e| Digest::new(*d.hash(), e.size))
        {
            self.remove(&stale);
        }
        self.tick += 1;
        self.entries.insert(
            *d.hash(),
            Entry {
                size: d.size(),
                tick: self.tick,
            },
        );
        self.order.insert(self.tick, *d.hash());
        self.bytes += d.size();
    }

    pub fn remove(&mut self, d: &Digest) {
        if let Some(e) = self.entries.remove(d.hash()) {
            self.order.remove(&e.tick);
            self.bytes -= e.size;
        }
    }

    /// Removes a blob whose file the caller is about to delete, outside the
    /// lock; until [`Index::unlinked`], [`Index::is_doomed`] says so.
    pub fn doom(&mut self, d: &Digest) {
        self.remove(d);
        self.doomed.insert(*d.hash());
    }

    /// A file at this blob's path is being deleted: writing one now could be undone.
    pub fn is_doomed(&self, d: &Digest) -> bool {
        self.doomed.contains(d.hash())
    }

    /// The files of `digests` are gone; their paths may be written again.
    pub fn unlinked(&mut self, digests: &[Digest]) {
        for d in digests {
            self.doomed.remove(d.hash());
        }
    }

    pub fn pin(&mut self, d: &Digest) {
        *self.pins.entry(*d.hash()).or_insert(0) += 1;
    }

    pub fn unpin(&mut self, d: &Digest) {
        if let Some(n) = self.pins.get_mut(d.hash()) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(d.hash());
            }
        }
    }

    /// Removes least-recently-used unpinned blobs until at most `limit` bytes
    /// remain, returning what was removed. They are doomed: the caller
    /// deletes their files and then calls [`Index::unlinked`].
    pub fn evict_to(&mut self, limit: u64) -> Vec<Digest> {
        let mut victims = Vec::new();
        if self.bytes <= limit {
            return victims;
        }
        let mut over = self.bytes - limit;
        for (_, hash) in self.order.iter() {
            if over == 0 {
                break;
            }
            if self.pins.contains_key(hash) {
                continue;
            }
            let size = self.entries[hash].size;
            victims.push(Digest::new(*hash, size));
            over = over.saturating_sub(size);
        }
        for d in &victims {
            self.doom(d);
        }
        victims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, size: u64) -> Digest {
        Digest::new([n; 32], size)
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut ix = Index::default();
        ix.insert(&blob(1, 10));
        ix.insert(&blob(2, 10));
        ix.insert(&blob(3, 10));
        ix.touch(&blob(1, 10));
        let gone = ix.evict_to(20);
        assert_eq!(gone, vec![blob(2, 10)]);
        assert_eq!(ix.bytes(), 20);
        assert!(ix.contains(&blob(1, 10)) && ix.contains(&blob(3, 10)));
    }

    #[test]
    fn pinned_blobs_survive_eviction() {
        let mut ix = Index::default();
        ix.insert(&blob(1, 10));
        ix.insert(&blob(2, 10));
        ix.pin(&blob(1, 10));
        let gone = ix.evict_to(0);
        assert_eq!(gone, vec![blob(2, 10)]);
        assert!(ix.contains(&blob(1, 10)));
        ix.unpin(&blob(1, 10));
        assert_eq!(ix.evict_to(0), vec![blob(1, 10)]);
        assert_eq!(ix.bytes(), 0);
    }

    #[test]
    fn victims_stay_doomed_until_unlinked() {
        let mut ix = Index::default();
        ix.insert(&blob(1, 10));
        ix.insert(&blob(2, 10));
        let gone = ix.evict_to(10);
        assert_eq!(gone, vec![blob(1, 10)]);
        assert!(ix.is_doomed(&blob(1, 10)) && !ix.is_doomed(&blob(2, 10)));
        assert!(!ix.contains(&blob(1, 10)));
        ix.unlinked(&gone);
        assert!(!ix.is_doomed(&blob(1, 10)));
    }
}
