//! Parking a VM that ran a recyclable action: first a runner snapshot of it
//! (with clean snapshots on) that clones for a burst of actions with its
//! key start from, while this VM serves one of them; then the pool, whose
//! evictions are saved to disk (snapshots.rs). Parking runs in the
//! background, after the action's result is back: an action wanting the
//! key meanwhile waits for it, and the key counts as warm throughout.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

use crate::clean::{CleanMeta, CleanStore, CLEAN_FORMAT};
use crate::fresh::sparse_copy;
use crate::pool::{Lease, Pool};
use crate::runner::affinity_of;
use crate::share::Sharing;
use crate::snapshots::{
    now_secs, SnapshotMeta, SnapshotStore, MEMORY_FILE, SCRATCH_FILE, STATE_FILE,
};
use crate::VmError;

/// A key's runner snapshot is taken again at a park only once the last one
/// is this old: the next sequential action waits for a snapshot being
/// taken (~50 ms under emulation), and a burst's clones may start from
/// state a few seconds old, as they may find any of the key's VMs.
const RESNAPSHOT_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// The clean store's key of a runner key's newest snapshot.
pub(crate) fn runner_snapshot_key(runner_key: &str) -> String {
    format!("runner:{runner_key}")
}

pub(crate) struct Parking {
    pub pool: Pool<Lease>,
    pub snapshots: Option<SnapshotStore>,
    pub clean: Option<Arc<CleanStore>>,
    /// Shares runner snapshots with other executors through the CAS.
    pub share: Option<Arc<Sharing>>,
    /// Per runner key: held for writing while a VM of the key is being
    /// parked. (One small entry per runner key ever parked.)
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

impl Parking {
    pub fn new(
        pool: Pool<Lease>,
        snapshots: Option<SnapshotStore>,
        clean: Option<Arc<CleanStore>>,
        share: Option<Arc<Sharing>>,
    ) -> Self {
        Parking {
            pool,
            snapshots,
            clean,
            share,
            locks: Mutex::default(),
        }
    }

    fn lock_of(&self, key: &str) -> Arc<RwLock<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Waits until no VM of `key` is being parked.
    pub async fn settled(&self, key: &str) {
        let lock = self.lock_of(key);
        let _read = lock.read().await;
    }

    /// Runner keys of the VMs pooled, saved or being parked, one per VM.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = self.pool.keys();
        if let Some(s) = &self.snapshots {
            keys.extend(s.keys());
        }
        let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        keys.extend(
            locks
                .iter()
                .filter(|(_, l)| l.try_read().is_err())
                .map(|(k, _)| k.clone()),
        );
        keys
    }

    /// Parks a paused VM in the background: marks its key as being parked
    /// now, so that an action for it that arrives next waits for the VM.
    pub async fn park(self: &Arc<Self>, key: String, lease: Lease) {
        let guard = self.lock_of(&key).write_owned().await;
        let this = self.clone();
        tokio::spawn(async move {
            let snapshotted = this.settle(key.clone(), lease, guard).await;
            if snapshotted {
                this.publish(&key).await;
            }
        });
    }

    /// Shares the key's newest runner snapshot through the CAS, unless it
    /// was shared moments ago. (After the VM is in the pool: an action
    /// for the key does not wait for this.)
    async fn publish(&self, key: &str) {
        let (Some(share), Some(clean)) = (&self.share, &self.clean) else {
            return;
        };
        if !share.due(key) {
            return;
        }
        let Some(snap) = clean.get(&runner_snapshot_key(key)) else {
            return;
        };
        let t = Instant::now();
        match share
            .publish(key, &affinity_of(key), &snap.dir, &snap.meta)
            .await
        {
            Ok(manifest) => tracing::info!(
                publish_ms = t.elapsed().as_millis() as u64,
                manifest = %manifest,
                "runner snapshot shared through the CAS"
            ),
            Err(e) => tracing::warn!(error = %e, "could not share a runner snapshot"),
        }
    }

    /// Takes the runner snapshot and pools the VM; true if a snapshot was
    /// taken.
    async fn settle(
        &self,
        key: String,
        mut lease: Lease,
        _parking: OwnedRwLockWriteGuard<()>,
    ) -> bool {
        let due = self.clean.as_ref().filter(|store| {
            store
                .age(&runner_snapshot_key(&key))
                .is_none_or(|age| age >= RESNAPSHOT_AFTER)
        });
        let snapshotted = due.is_some();
        if let Some(store) = due {
            let t = Instant::now();
            match snapshot(store, &key, &mut lease).await {
                Ok(()) => tracing::debug!(
                    snapshot_ms = t.elapsed().as_millis() as u64,
                    "runner snapshot taken for clones"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "could not snapshot the parked VM; not pooling it");
                    lease.vm.kill().await;
                    return false;
                }
            }
        }
        let memory = lease.spec.memory_mib;
        for (key, evicted) in self.pool.put(key, lease, memory) {
            self.save(key, evicted).await;
        }
        snapshotted
    }

    /// Saves a paused VM to the snapshot store, or stops it if it can't be.
    async fn save(&self, key: String, mut lease: Lease) {
        let Some(store) = &self.snapshots else {
            lease.vm.kill().await;
            return;
        };
        if !lease.owns_memory() {
            lease.vm.kill().await;
            return;
        }
        let t = Instant::now();
        if let Err(e) = lease.vm.save(&lease.dir.0.join(STATE_FILE)).await {
            tracing::warn!(error = %e, "could not save the VM; dropping it");
            lease.vm.kill().await;
            return;
        }
        let meta = SnapshotMeta {
            key,
            root_image: lease.spec.disks[0].path.clone(),
            vcpus: lease.spec.vcpus,
            memory_mib: lease.spec.memory_mib,
            network: lease.spec.network,
            work_size: lease.work_size,
            saved_unix_secs: now_secs(),
        };
        match store.put(&lease.dir.0, &meta) {
            Ok(()) => tracing::info!(
                save_ms = t.elapsed().as_millis() as u64,
                "microVM saved to a snapshot"
            ),
            Err(e) => tracing::warn!(error = %e, "could not store the VM snapshot; dropped it"),
        }
    }

    /// Saves every pooled VM (at executor shutdown), after the parkings
    /// under way.
    pub async fn save_all(&self) {
        let locks: Vec<_> = {
            let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.values().cloned().collect()
        };
        for l in locks {
            let _settled = l.read().await;
        }
        for (key, lease) in self.pool.drain() {
            self.save(key, lease).await;
        }
    }
}

/// Takes the runner snapshot of a paused VM: its device state, and frozen
/// copies of its memory file and scratch disk (the VM goes on using its
/// own), stored as the newest snapshot of its key; then lets the VM have
/// its disks back, paused again. Fails only if the VM may be unusable; a
/// snapshot that could not be stored is logged.
async fn snapshot(store: &Arc<CleanStore>, key: &str, lease: &mut Lease) -> Result<(), VmError> {
    if !lease.owns_memory() {
        return Err(VmError::Setup(
            "the VM's memory is not in a file of its own".into(),
        ));
    }
    let staging = store.staging_async().await?;
    // Back to plain paused, with its disks, whatever the copies did; an
    // error here leaves the VM in doubt.
    lease.vm.checkpoint(&staging.join(STATE_FILE)).await?;
    let copied = copy_files(&lease.dir.0, &staging).await;
    lease.vm.set_running(true).await?;
    lease.vm.set_running(false).await?;
    let meta = CleanMeta {
        format: CLEAN_FORMAT,
        key: runner_snapshot_key(key),
        vcpus: lease.spec.vcpus,
        memory_mib: lease.spec.memory_mib,
        network: lease.spec.network,
        dockerd: lease.dockerd_up,
        work_size: lease.work_size,
        saved_unix_secs: now_secs(),
    };
    let store = store.clone();
    let stored = tokio::task::spawn_blocking(move || match copied {
        Ok(()) => store.put(&staging, &meta),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    })
    .await;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not store a runner snapshot"),
        Err(e) => tracing::warn!(error = %e, "storing a runner snapshot"),
    }
    Ok(())
}

async fn copy_files(vm_dir: &Path, into: &Path) -> Result<(), VmError> {
    let (mem_from, mem_to) = (vm_dir.join(MEMORY_FILE), into.join(MEMORY_FILE));
    let (disk_from, disk_to) = (vm_dir.join(SCRATCH_FILE), into.join(SCRATCH_FILE));
    let (a, b) = tokio::join!(
        sparse_copy(&mem_from, &mem_to),
        sparse_copy(&disk_from, &disk_to)
    );
    a.and(b)
}
