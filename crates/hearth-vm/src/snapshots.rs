//! Recycled VMs saved to disk: when the pool evicts a paused VM, and for
//! every pooled VM when the executor shuts down. A snapshot is a directory
//! holding the VM's shared memory file, its scratch, workspace and output
//! disks, the device state QEMU wrote, and `meta.json` (written last: a
//! directory without it is an interrupted save and is deleted). Restoring moves the
//! directory back into a VM directory, so a snapshot is used once; the VM
//! it becomes may be saved again later.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::VmError;

/// The files of a saveable VM's directory.
pub const MEMORY_FILE: &str = "mem";
pub const STATE_FILE: &str = "state";
pub const SCRATCH_FILE: &str = "scratch.img";
pub const WORK_FILE: &str = "work.img";
pub const OUT_FILE: &str = "out.img";
const META_FILE: &str = "meta.json";

/// What is needed, besides the files, to start the saved VM again with the
/// same command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The runner key; it covers QEMU's version, the kernel, the agent
    /// (through the initramfs hash), the image and the size.
    pub key: String,
    pub root_image: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub network: bool,
    pub work_size: u64,
    pub saved_unix_secs: u64,
}

pub struct SnapshotStore {
    dir: PathBuf,
    max: usize,
    /// The complete snapshots, oldest first. The store is the only writer
    /// of `dir`, so this is read from disk once, at open; the lock also
    /// serialises moves in and out of `dir`.
    entries: Mutex<Vec<Entry>>,
}

/// One stored snapshot: its directory, metadata and the disk blocks its
/// files took when it was stored (measured once, for `/metrics`).
struct Entry {
    path: PathBuf,
    meta: SnapshotMeta,
    bytes: u64,
}

impl Entry {
    fn new(path: PathBuf, meta: SnapshotMeta) -> Entry {
        let bytes = crate::clean::allocated(&path);
        Entry { path, meta, bytes }
    }
}

fn read_meta(entry: &Path) -> Option<SnapshotMeta> {
    let text = std::fs::read(entry.join(META_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

impl SnapshotStore {
    /// Opens (creating) the store, deleting interrupted saves.
    pub fn open(dir: &Path, max: usize) -> Result<Self, VmError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| VmError::io(format!("creating {}", dir.display()), e))?;
        let list = std::fs::read_dir(dir)
            .map_err(|e| VmError::io(format!("reading {}", dir.display()), e))?;
        let mut entries = Vec::new();
        for path in list.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            match read_meta(&path) {
                Some(meta) => entries.push(Entry::new(path, meta)),
                None => {
                    tracing::info!(path = %path.display(), "deleting an incomplete VM snapshot");
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        entries.sort_by_key(|e| e.meta.saved_unix_secs);
        Self::publish(&entries);
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
            max,
            entries: Mutex::new(entries),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `/metrics` how many snapshots the store holds and their disk
    /// blocks.
    fn publish(entries: &[Entry]) {
        let bytes: u64 = entries.iter().map(|e| e.bytes).sum();
        metrics::gauge!("hearth_vm_saved_snapshots").set(entries.len() as f64);
        metrics::gauge!("hearth_vm_saved_snapshot_bytes").set(bytes as f64);
    }

    /// The keys of the snapshots held.
    pub fn keys(&self) -> Vec<String> {
        self.lock().iter().map(|e| e.meta.key.clone()).collect()
    }

    /// Moves a saved VM's directory (holding the files named above) into
    /// the store, then deletes the oldest snapshots beyond the bound.
    pub fn put(&self, vm_dir: &Path, meta: &SnapshotMeta) -> Result<(), VmError> {
        let mut entries = self.lock();
        let entry = self.dir.join(uuid::Uuid::new_v4().to_string());
        std::fs::rename(vm_dir, &entry)
            .map_err(|e| VmError::io(format!("moving {} to the snapshots", vm_dir.display()), e))?;
        // Sockets and logs (run/, run-retry/) are not part of the VM.
        if let Ok(list) = std::fs::read_dir(&entry) {
            for sub in list.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir_all(sub.path());
            }
        }
        let body = serde_json::to_vec_pretty(meta)
            .map_err(|e| VmError::Setup(format!("encoding the snapshot metadata: {e}")))?;
        let tmp = entry.join("meta.json.tmp");
        let written =
            std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, entry.join(META_FILE)));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&entry);
            return Err(VmError::io("writing the snapshot metadata", e));
        }
        entries.push(Entry::new(entry, meta.clone()));
        while entries.len() > self.max {
            let old = entries.remove(0);
            tracing::info!(key = %old.meta.key, "deleting the oldest VM snapshot beyond the bound");
            let _ = std::fs::remove_dir_all(old.path);
        }
        Self::publish(&entries);
        Ok(())
    }

    /// Moves the newest snapshot with this key to `into` (which must not
    /// exist) and returns its metadata.
    pub fn take(&self, key: &str, into: &Path) -> Option<SnapshotMeta> {
        let mut entries = self.lock();
        let i = entries.iter().rposition(|e| e.meta.key == key)?;
        let Entry { path, meta, .. } = entries.remove(i);
        Self::publish(&entries);
        match std::fs::rename(&path, into) {
            Ok(()) => Some(meta),
            Err(e) => {
                tracing::warn!(error = %e, "could not take a VM snapshot; deleting it");
                let _ = std::fs::remove_dir_all(&path);
                None
            }
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_vm(root: &Path, name: &str) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(d.join("run")).unwrap();
        for f in [MEMORY_FILE, STATE_FILE, SCRATCH_FILE, WORK_FILE, OUT_FILE] {
            std::fs::write(d.join(f), name).unwrap();
        }
        d
    }

    fn meta(key: &str, saved: u64) -> SnapshotMeta {
        SnapshotMeta {
            key: key.into(),
            root_image: "/images/a.ext4".into(),
            vcpus: 1,
            memory_mib: 512,
            network: true,
            work_size: 1 << 30,
            saved_unix_secs: saved,
        }
    }

    #[test]
    fn put_take_bound_and_cleanup() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&tmp.path().join("snaps"), 2).unwrap();
        store
            .put(&saved_vm(tmp.path(), "vm1"), &meta("a", 1))
            .unwrap();
        store
            .put(&saved_vm(tmp.path(), "vm2"), &meta("b", 2))
            .unwrap();
        assert!(!tmp.path().join("vm1").exists(), "the VM directory moves");
        let mut keys = store.keys();
        keys.sort();
        assert_eq!(keys, ["a", "b"]);

        store
            .put(&saved_vm(tmp.path(), "vm3"), &meta("c", 3))
            .unwrap();
        let mut keys = store.keys();
        keys.sort();
        assert_eq!(keys, ["b", "c"], "the oldest goes beyond the bound");

        let into = tmp.path().join("restored");
        assert_eq!(store.take("b", &into), Some(meta("b", 2)));
        assert_eq!(
            std::fs::read_to_string(into.join(MEMORY_FILE)).unwrap(),
            "vm2"
        );
        assert!(!into.join("run").exists(), "sockets and logs are not kept");
        assert_eq!(
            store.take("b", &tmp.path().join("again")),
            None,
            "used once"
        );
        assert_eq!(store.keys(), ["c"]);

        // An interrupted save (no meta.json) is deleted when the store opens.
        let half = tmp.path().join("snaps").join("half");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join(STATE_FILE), "x").unwrap();
        let store = SnapshotStore::open(&tmp.path().join("snaps"), 2).unwrap();
        assert!(!half.exists());
        assert_eq!(store.keys(), ["c"]);
    }
}
