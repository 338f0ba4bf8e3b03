//! Clones of a runner key's newest snapshot, for an action whose key has
//! no pooled or saved VM here: the snapshot this executor took when it
//! last parked the key's VM (its VM is busy: a burst), else the one the
//! server knows of, fetched from the CAS straight into the new VM's
//! directory (its chunks checked as they are written), so no second copy
//! of a snapshot is made. An executor keeps no fetched snapshot: once the
//! clone is parked, its own runner snapshot serves the next burst.

use std::sync::Arc;
use std::time::Instant;

use hearth_executor::{ExecError, SharedSnapshot, StartKind};
use tokio_util::sync::CancellationToken;

use crate::clean::{CleanMeta, CleanStore};
use crate::fresh::{needed_work_size, Wanted};
use crate::images::VmSize;
use crate::park::runner_snapshot_key;
use crate::pool::Lease;
use crate::runner::{Inputs, VmRunner};
use crate::share::Sharing;
use crate::VmError;

/// Largest workspace disk a fetched snapshot may ask for (sparse, but
/// bounded whatever a manifest says).
const MAX_WORK_SIZE: u64 = 1 << 40;

impl VmRunner {
    /// A clone of the runner key's newest snapshot: the local one, else
    /// the shared one. None if there is neither, or it would not do (the
    /// action then gets a fresh VM).
    pub(crate) async fn runner_clone(
        &self,
        store: &Arc<CleanStore>,
        key: &str,
        shared: Option<&SharedSnapshot>,
        want: &Wanted<'_>,
        inputs: Inputs<'_>,
        cancel: &CancellationToken,
    ) -> Result<Option<(Lease, StartKind)>, ExecError> {
        if let Some(snap) = store.get(&runner_snapshot_key(key)) {
            if needed_work_size(inputs, want.size) > snap.meta.work_size {
                return Ok(None);
            }
            return match self.clone_of(&snap, want, inputs).await {
                Ok(lease) => Ok(Some((lease, StartKind::Clone))),
                Err(e) => {
                    tracing::warn!(error = %e, "a runner snapshot did not clone; discarded it");
                    store.discard(&snap);
                    Ok(None)
                }
            };
        }
        let (Some(share), Some(shared)) = (&self.parking.share, shared) else {
            return Ok(None);
        };
        // One fetch per key at a time: a burst on an executor new to the
        // key fetches the chunks once (the next ones find them cached).
        let _fetching = self.maker_of(&runner_snapshot_key(key), cancel).await?;
        let t = Instant::now();
        let fetched = tokio::select! {
            r = self.fetched_clone(share, shared, key, want, inputs) => r,
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        };
        match fetched {
            Ok(Some(lease)) => {
                tracing::info!(
                    took_ms = t.elapsed().as_millis() as u64,
                    "microVM started from a shared runner snapshot"
                );
                Ok(Some((lease, StartKind::Fetched)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "a shared runner snapshot did not fetch or restore; booting fresh");
                Ok(None)
            }
        }
    }

    /// Fetches `shared` into a new VM directory (while its workspace disk
    /// is made) and boots it. None if the inputs do not fit its workspace.
    async fn fetched_clone(
        &self,
        share: &Sharing,
        shared: &SharedSnapshot,
        key: &str,
        want: &Wanted<'_>,
        inputs: Inputs<'_>,
    ) -> Result<Option<Lease>, VmError> {
        let manifest = share.manifest(shared, key).await?;
        let meta = manifest.meta.clone();
        check_size(&meta, want.size)?;
        if needed_work_size(inputs, want.size) > meta.work_size {
            return Ok(None);
        }
        let dir = self.new_vm_dir().await?;
        let base = dir.0.clone();
        let files = share.unpack(manifest, &base);
        self.boot_clone(dir, &meta, &base, want, inputs, files)
            .await
            .map(Some)
    }
}

/// The runner key names the VM's size, but a fetched VM is booted from
/// what its manifest says: it must say the same, whoever wrote it.
fn check_size(meta: &CleanMeta, size: VmSize) -> Result<(), VmError> {
    if (meta.vcpus, meta.memory_mib) != (size.vcpus, size.memory_mib)
        || meta.work_size > MAX_WORK_SIZE
    {
        return Err(VmError::Setup(format!(
            "the shared snapshot is of a VM of {} vCPUs, {} MiB and a {}-byte workspace, not of this key's size",
            meta.vcpus, meta.memory_mib, meta.work_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_must_name_the_size_the_key_names() {
        let size = VmSize {
            vcpus: 2,
            memory_mib: 1024,
            disk_bytes: 4 << 30,
        };
        let meta = CleanMeta {
            format: crate::clean::CLEAN_FORMAT,
            key: "runner:k".into(),
            vcpus: 2,
            memory_mib: 1024,
            network: true,
            dockerd: true,
            work_size: 8 << 30,
            saved_unix_secs: 0,
        };
        check_size(&meta, size).unwrap();
        for hostile in [
            CleanMeta {
                memory_mib: 1 << 30,
                ..meta.clone()
            },
            CleanMeta {
                vcpus: 64,
                ..meta.clone()
            },
            CleanMeta {
                work_size: u64::MAX,
                ..meta.clone()
            },
        ] {
            let e = check_size(&hostile, size).unwrap_err();
            assert!(e.to_string().contains("not of this key's size"), "{e}");
        }
    }
}
