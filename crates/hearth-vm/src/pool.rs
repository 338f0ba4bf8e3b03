//! Paused VMs kept for the next action with the same runner key
//! (`recycle-runner=true`), bounded by count and memory, least recently
//! used evicted first.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use crate::{QemuVm, VmSpec};

/// A VM and the files that live and die with it.
pub struct Lease {
    pub vm: QemuVm,
    /// The VM's directory (disks, sockets, console); removed when the lease
    /// is dropped, after the VM (fields drop in order).
    pub dir: VmDir,
    /// What the VM was started with.
    pub spec: VmSpec,
    pub work_image: PathBuf,
    pub work_size: u64,
    /// The raw output disk (see outputs.rs) and its size.
    pub out_image: PathBuf,
    pub out_size: u64,
    /// Requests the VM needs before the command (a clone's reseed, the
    /// mount of a fresh workspace), sent with it to save round trips.
    pub pending: Vec<hearth_guest::protocol::Request>,
    /// dockerd runs in it (started, or there when it was saved).
    pub dockerd_up: bool,
}

impl Lease {
    /// Its memory is a file of its own: it can be snapshotted and saved by
    /// copying that file. A clone mapping a snapshot's memory privately has
    /// its RAM in anonymous pages (saving it would mean streaming all of
    /// it); a VM without a memory file has it nowhere to copy from.
    pub fn owns_memory(&self) -> bool {
        self.spec.memory_file.is_some() && !self.spec.memory_private
    }
}

/// Removes a VM's directory when dropped.
pub struct VmDir(pub PathBuf);

impl Drop for VmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Entry<T> {
    key: String,
    item: T,
    memory_mib: u64,
    paused_at: Instant,
}

pub struct Pool<T> {
    max_items: usize,
    max_memory_mib: u64,
    entries: Mutex<Vec<Entry<T>>>,
}

impl<T> Pool<T> {
    pub fn new(max_items: usize, max_memory_mib: u64) -> Self {
        Pool {
            max_items,
            max_memory_mib,
            entries: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry<T>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `/metrics` what the pool holds now.
    fn publish(entries: &[Entry<T>]) {
        let mib: u64 = entries.iter().map(|e| e.memory_mib).sum();
        metrics::gauge!("hearth_vm_pool_runners").set(entries.len() as f64);
        metrics::gauge!("hearth_vm_pool_memory_bytes").set((mib << 20) as f64);
    }

    /// The most recently added item with this key, if any.
    pub fn take(&self, key: &str) -> Option<T> {
        let mut entries = self.lock();
        let i = entries.iter().rposition(|e| e.key == key)?;
        let item = entries.remove(i).item;
        Self::publish(&entries);
        Some(item)
    }

    /// Adds an item; returns those evicted (least recently added first) to
    /// stay within the bounds, with their keys, for the caller to dispose of.
    pub fn put(&self, key: String, item: T, memory_mib: u64) -> Vec<(String, T)> {
        let mut entries = self.lock();
        entries.push(Entry {
            key,
            item,
            memory_mib,
            paused_at: Instant::now(),
        });
        let mut evicted = Vec::new();
        loop {
            let memory: u64 = entries.iter().map(|e| e.memory_mib).sum();
            if entries.len() <= self.max_items && memory <= self.max_memory_mib {
                break;
            }
            let Some(oldest) = entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.paused_at)
                .map(|(i, _)| i)
            else {
                break;
            };
            let e = entries.remove(oldest);
            evicted.push((e.key, e.item));
        }
        Self::publish(&entries);
        evicted
    }

    /// Empties the pool (at shutdown).
    pub fn drain(&self) -> Vec<(String, T)> {
        let mut entries = self.lock();
        let all = entries.drain(..).map(|e| (e.key, e.item)).collect();
        Self::publish(&entries);
        all
    }

    /// The keys held, for the scheduler's affinity.
    pub fn keys(&self) -> Vec<String> {
        self.lock().iter().map(|e| e.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_by_key_and_evicts_least_recent_beyond_bounds() {
        let pool = Pool::new(2, 1000);
        assert!(pool.put("a".into(), 1, 100).is_empty());
        assert!(pool.put("b".into(), 2, 100).is_empty());
        assert_eq!(
            pool.put("c".into(), 3, 100),
            vec![("a".to_string(), 1)],
            "count bound evicts the oldest"
        );
        assert_eq!(pool.take("a"), None);
        assert_eq!(pool.take("c"), Some(3));
        assert_eq!(
            pool.put("d".into(), 4, 950),
            vec![("b".to_string(), 2)],
            "memory bound evicts too"
        );
        assert_eq!(pool.keys(), vec!["d".to_string()]);
        assert_eq!(pool.drain(), vec![("d".to_string(), 4)]);
        assert!(pool.keys().is_empty());
    }
}
