//! Warm runners (`recycle-runner=true`): waking a parked VM (park.rs) for
//! the next action with an equal runner key, or restoring one saved to disk
//! when the pool evicted it or the executor stopped.

use std::time::Instant;

use hearth_executor::StartKind;
use hearth_guest::protocol::{Request, WORK_SERIAL};

use crate::outputs::reset_disk;
use crate::pool::{Lease, VmDir};
use crate::runner::{Inputs, VmRunner};
use crate::snapshots::{OUT_FILE, STATE_FILE, WORK_FILE};
use crate::{disks, VmError, VmSpec};

/// Room the workspace needs beyond twice the inputs.
const WORKSPACE_SLACK: u64 = 64 << 20;

impl VmRunner {
    /// A warm VM for this key with a fresh workspace built from `inputs`:
    /// a paused one from the pool, else one restored from a snapshot. None
    /// if there is neither, or waking it failed (the action then boots a
    /// fresh VM).
    pub(crate) async fn warm(&self, key: &str, inputs: Inputs<'_>) -> Option<(Lease, StartKind)> {
        // A VM of this key being parked is the one to resume.
        self.parking.settled(key).await;
        if let Some(lease) = self.parking.pool.take(key) {
            match self.resume(lease, inputs).await {
                Ok(l) => return Some((l, StartKind::Resume)),
                Err(e) => {
                    tracing::warn!(error = %e, "recycled VM did not resume; booting a fresh one")
                }
            }
        }
        match self.restore(key, inputs).await {
            Ok(l) => l.map(|l| (l, StartKind::Restore)),
            Err(e) => {
                tracing::warn!(error = %e, "VM snapshot did not restore; deleted it, booting a fresh VM");
                None
            }
        }
    }

    /// Wakes a paused VM and gives it a fresh workspace and an empty output
    /// disk. On failure (a wedged QEMU among them: QMP `cont` is bounded)
    /// the VM is killed.
    async fn resume(&self, mut lease: Lease, inputs: Inputs<'_>) -> Result<Lease, VmError> {
        let t = Instant::now();
        let mkfs_ms = match Self::wake(&mut lease, inputs).await {
            Ok(ms) => ms,
            Err(e) => {
                lease.vm.kill().await;
                return Err(e);
            }
        };
        lease.pending = vec![mount_request()];
        tracing::debug!(
            mkfs_ms,
            resume_ms = t.elapsed().as_millis() as u64,
            "recycled microVM resumed"
        );
        Ok(lease)
    }

    /// Returns how long the disks took, in milliseconds.
    async fn wake(lease: &mut Lease, inputs: Inputs<'_>) -> Result<u64, VmError> {
        let t = Instant::now();
        check_fits(inputs, lease.work_size, "recycled")?;
        // The guest unmounted the old workspace and dropped its cached
        // blocks; rewrite the same file in place. The mount goes out with
        // the command.
        disks::mkfs(&lease.work_image, lease.work_size, Some(inputs.dir)).await?;
        reset_disk(&lease.out_image, lease.out_size)?;
        let mkfs_ms = t.elapsed().as_millis() as u64;
        lease.vm.set_running(true).await?;
        Ok(mkfs_ms)
    }

    /// Restores the newest snapshot with this key, if there is one. The
    /// snapshot's directory becomes the VM's; on failure it is deleted.
    async fn restore(&self, key: &str, inputs: Inputs<'_>) -> Result<Option<Lease>, VmError> {
        let Some(store) = &self.parking.snapshots else {
            return Ok(None);
        };
        let dir = VmDir(self.config.work_dir.join(uuid::Uuid::new_v4().to_string()));
        let Some(meta) = store.take(key, &dir.0) else {
            return Ok(None);
        };
        let t = Instant::now();
        let work_image = dir.0.join(WORK_FILE);
        check_fits(inputs, meta.work_size, "saved")?;
        disks::mkfs(&work_image, meta.work_size, Some(inputs.dir)).await?;
        // The saved VM had this disk; its size is fixed with the VM.
        let out_image = dir.0.join(OUT_FILE);
        let out_size = std::fs::metadata(&out_image)
            .map_err(|e| VmError::io("the saved VM's output disk", e))?
            .len();
        reset_disk(&out_image, out_size)?;
        let spec = VmSpec {
            incoming: Some(dir.0.join(STATE_FILE)),
            ..self.vm_spec(
                &dir.0,
                &meta.root_image,
                meta.vcpus,
                meta.memory_mib,
                meta.network,
                true,
            )
        };
        let vm = self.vmm.boot(&spec).await?;
        let mut lease = Lease {
            vm,
            dir,
            spec: VmSpec {
                incoming: None,
                ..spec
            },
            work_image,
            work_size: meta.work_size,
            out_image,
            out_size,
            pending: vec![],
            dockerd_up: false,
        };
        if let Err(e) = mount_workspace(&mut lease).await {
            lease.vm.kill().await;
            return Err(e);
        }
        tracing::info!(
            restore_ms = t.elapsed().as_millis() as u64,
            "microVM restored from a snapshot"
        );
        Ok(Some(lease))
    }
}

/// Whether `inputs` fit a warm VM's workspace disk of
/// `work_size` bytes (the disk's size is fixed when the VM boots).
fn check_fits(inputs: Inputs<'_>, work_size: u64, which: &str) -> Result<(), VmError> {
    if inputs.bytes * 2 + WORKSPACE_SLACK > work_size {
        return Err(VmError::Setup(format!(
            "the inputs do not fit the {which} VM's workspace"
        )));
    }
    Ok(())
}

/// Mounts the fresh workspace disk at /work in the guest.
pub(crate) fn mount_request() -> Request {
    Request::MountDisk {
        serial: WORK_SERIAL.into(),
        path: "/work".into(),
    }
}

async fn mount_workspace(lease: &mut Lease) -> Result<(), VmError> {
    lease.vm.agent().call(&mount_request()).await.map(|_| ())
}
