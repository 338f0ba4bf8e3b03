//! Fresh VMs: an action that gets no warm runner gets a VM no action ran in.
//! With clean snapshots on (the default), that VM is a clone of its
//! configuration's clean snapshot (clean.rs): QEMU loads the snapshot's
//! device state, maps its memory file privately (copy-on-write) and sees
//! its scratch disk through a qcow2 overlay, and the agent, told it was
//! restored, reseeds the kernel's random numbers from host randomness and
//! sets the clock before the workspace is mounted and the command runs.
//! The first action of a configuration makes the snapshot (boot with an
//! empty workspace, dockerd if asked, unmount, save), then clones it like
//! the rest; with no snapshot to be had, a fresh VM boots cold.
//!
//! A clone for a recyclable action (`recycle-runner=true`) gets sparse
//! copies of the memory file and the scratch disk instead, mapped shared:
//! parked and saved later like any VM, it must own its files.

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hearth_executor::{ExecError, SharedSnapshot, StartKind};
use hearth_guest::protocol::{Request, SCRATCH_SERIAL};
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::clean::{CleanMeta, CleanSnapshot, CleanStore, CLEAN_FORMAT};
use crate::images::{ResolvedImage, VmSize};
use crate::outputs;
use crate::pool::{Lease, VmDir};
use crate::runner::{vm_error, Inputs, VmRunner, OUT_SLACK};
use crate::snapshots::{now_secs, MEMORY_FILE, OUT_FILE, SCRATCH_FILE, STATE_FILE, WORK_FILE};
use crate::warm::mount_request;
use crate::{disks, file_identity, DiskFormat, DiskSpec, VmError, VmSpec};

/// A clone's scratch disk: an overlay over the snapshot's.
const OVERLAY_FILE: &str = "scratch.qcow2";
/// Bytes of host randomness a clone's kernel is reseeded with.
const SEED_BYTES: usize = 64;

/// What kind of fresh VM an action needs.
#[derive(Clone, Copy)]
pub(crate) struct Wanted<'a> {
    pub image: &'a ResolvedImage,
    pub size: VmSize,
    pub network: bool,
    pub dockerd: bool,
    /// It may be parked and saved afterwards (`recycle-runner=true`).
    pub saveable: bool,
}

/// A snapshot's workspace disk is fixed in size with the VM: twice the
/// free space asked for, so that inputs up to that much fit a clone (an
/// action with more boots cold).
fn clean_work_size(size: VmSize) -> u64 {
    size.disk_bytes.saturating_mul(2)
}

/// The cold path's workspace disk size for these inputs, which a clone's
/// disk must be able to hold too.
pub(crate) fn needed_work_size(inputs: Inputs<'_>, size: VmSize) -> u64 {
    inputs.bytes * 2 + size.disk_bytes
}

impl VmRunner {
    /// The clean snapshot's key: everything the booted VM depends on
    /// (QEMU, kernel, agent, image file, size, network, forwarded ports,
    /// dockerd and its flags). Not the tenant: no action ran in a clean
    /// snapshot, and an action only gets here once its image resolved,
    /// which is where a private image's access is checked.
    pub(crate) fn clean_key(&self, want: &Wanted<'_>) -> String {
        let mut h = Sha256::new();
        h.update(format!("clean/{CLEAN_FORMAT}\0").as_bytes());
        h.update(self.vmm.identity().as_bytes());
        h.update([0]);
        h.update(file_identity(&want.image.path).as_bytes());
        let s = want.size;
        h.update(format!("\0{}/{}/{}", s.vcpus, s.memory_mib, s.disk_bytes).as_bytes());
        if want.network {
            h.update(b"\0net");
            for (port, _) in &self.config.forwards {
                h.update(format!("\0fwd:{port}").as_bytes());
            }
        }
        if want.dockerd {
            h.update(b"\0dockerd");
            for arg in self.dockerd_args() {
                h.update(format!("\0{arg}").as_bytes());
            }
        }
        hex::encode(h.finalize())
    }

    /// A VM for the workspace in `inputs` that is not a pooled or saved
    /// one, and how it started. For a runner key (with the shared snapshot
    /// the server knows of it): a clone of the key's newest snapshot, here
    /// (its VM is busy: a burst) or fetched from the CAS; else a fresh VM.
    pub(crate) async fn fresh(
        &self,
        want: &Wanted<'_>,
        runner: Option<(&str, Option<&SharedSnapshot>)>,
        inputs: Inputs<'_>,
        cancel: &CancellationToken,
    ) -> Result<(Lease, StartKind), ExecError> {
        if let (Some(store), Some((key, shared))) = (&self.clean, runner) {
            if let Some(started) = self
                .runner_clone(store, key, shared, want, inputs, cancel)
                .await?
            {
                return Ok(started);
            }
        }
        if let Some(store) = &self.clean {
            if needed_work_size(inputs, want.size) <= clean_work_size(want.size) {
                if let Some(snap) = self.clean_snapshot(store, want, cancel).await? {
                    match self.clone_of(&snap, want, inputs).await {
                        Ok(lease) => return Ok((lease, StartKind::Clone)),
                        Err(e) => {
                            tracing::warn!(error = %e, "a clean snapshot did not clone; discarded it, booting cold");
                            store.discard(&snap);
                        }
                    }
                }
            }
        }
        let lease = self
            .cold(want.image, want.size, want.network, want.saveable, inputs)
            .await?;
        Ok((lease, StartKind::Cold))
    }

    /// A fresh VM with the workspace built from `inputs`.
    pub(crate) async fn cold(
        &self,
        image: &ResolvedImage,
        size: VmSize,
        network: bool,
        saveable: bool,
        inputs: Inputs<'_>,
    ) -> Result<Lease, ExecError> {
        let started = std::time::Instant::now();
        let dir = VmDir(self.config.work_dir.join(uuid::Uuid::new_v4().to_string()));
        std::fs::create_dir_all(&dir.0)
            .map_err(|e| ExecError::io("creating the VM directory", e))?;
        let scratch = dir.0.join(SCRATCH_FILE);
        let work_image = dir.0.join(WORK_FILE);
        let work_size = inputs.bytes * 2 + size.disk_bytes;
        let (a, b) = tokio::join!(
            disks::mkfs(&scratch, size.disk_bytes, None),
            disks::mkfs(&work_image, work_size, Some(inputs.dir))
        );
        a.and(b).map_err(vm_error)?;
        let out_image = dir.0.join(OUT_FILE);
        let out_size = work_size + OUT_SLACK;
        outputs::reset_disk(&out_image, out_size).map_err(vm_error)?;
        let vm_spec = self.vm_spec(
            &dir.0,
            &image.path,
            size.vcpus,
            size.memory_mib,
            network,
            saveable,
        );
        let booting = std::time::Instant::now();
        let vm = self
            .boot_with_retry(vm_spec.clone())
            .await
            .map_err(vm_error)?;
        tracing::debug!(
            disks_ms = (booting - started).as_millis() as u64,
            boot_ms = booting.elapsed().as_millis() as u64,
            "microVM up"
        );
        Ok(Lease {
            vm,
            dir,
            spec: vm_spec,
            work_image,
            work_size,
            out_image,
            out_size,
            pending: vec![],
            dockerd_up: false,
        })
    }

    /// Becomes the one maker (or fetcher) of the snapshot `key`, waiting
    /// for the one before.
    pub(crate) async fn maker_of(
        &self,
        key: &str,
        cancel: &CancellationToken,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, ExecError> {
        let maker = self
            .makers
            .lock()
            .await
            .entry(key.to_string())
            .or_default()
            .clone();
        tokio::select! {
            g = maker.lock_owned() => Ok(g),
            _ = cancel.cancelled() => Err(ExecError::Cancelled),
        }
    }

    /// The clean snapshot for `want`, made now if there is none (one maker
    /// per key; the others wait for it). None if it could not be made.
    async fn clean_snapshot(
        &self,
        store: &Arc<CleanStore>,
        want: &Wanted<'_>,
        cancel: &CancellationToken,
    ) -> Result<Option<CleanSnapshot>, ExecError> {
        let key = self.clean_key(want);
        if let Some(s) = store.get(&key) {
            return Ok(Some(s));
        }
        let _making = self.maker_of(&key, cancel).await?;
        if let Some(s) = store.get(&key) {
            return Ok(Some(s));
        }
        let t = Instant::now();
        let made = tokio::select! {
            r = self.make_clean(store, &key, want) => r,
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        };
        match made {
            Ok(()) => {
                tracing::info!(
                    make_ms = t.elapsed().as_millis() as u64,
                    image = %want.image.name,
                    dockerd = want.dockerd,
                    "clean snapshot made"
                );
                Ok(store.get(&key))
            }
            Err(e) => {
                tracing::warn!(error = %e, image = %want.image.name, "could not make a clean snapshot; booting cold");
                Ok(None)
            }
        }
    }

    /// Boots a VM with an empty workspace, starts dockerd if asked, unmounts
    /// the workspace (clones mount their own) and saves the VM as the clean
    /// snapshot of `key`.
    async fn make_clean(
        &self,
        store: &Arc<CleanStore>,
        key: &str,
        want: &Wanted<'_>,
    ) -> Result<(), ExecError> {
        let blocking = |what: &'static str| {
            move |e: tokio::task::JoinError| ExecError::Internal(format!("{what}: {e}"))
        };
        // Removed if anything below fails (or the action is cancelled).
        let dir = VmDir(store.staging_async().await.map_err(vm_error)?);
        let work_size = clean_work_size(want.size);
        let (scratch, work) = (dir.0.join(SCRATCH_FILE), dir.0.join(WORK_FILE));
        let (a, b) = tokio::join!(
            disks::mkfs(&scratch, want.size.disk_bytes, None),
            disks::mkfs(&work, work_size, None)
        );
        a.and(b).map_err(vm_error)?;
        outputs::reset_disk(&dir.0.join(OUT_FILE), work_size + OUT_SLACK).map_err(vm_error)?;
        let spec = self.vm_spec(
            &dir.0,
            &want.image.path,
            want.size.vcpus,
            want.size.memory_mib,
            want.network,
            true,
        );
        let mut vm = self.boot_with_retry(spec).await.map_err(vm_error)?;
        if want.dockerd {
            // Bounded by the dockerd timeout; the caller's select cancels.
            let never = CancellationToken::new();
            if let Err(e) = self.start_dockerd(&mut vm, want.image, &never).await {
                vm.kill().await;
                return Err(e);
            }
        }
        let unmount = Request::Unmount {
            path: "/work".into(),
        };
        if let Err(e) = vm.agent().call(&unmount).await {
            vm.kill().await;
            return Err(vm_error(e));
        }
        vm.save(&dir.0.join(STATE_FILE)).await.map_err(vm_error)?;
        drop(vm);
        let meta = CleanMeta {
            format: CLEAN_FORMAT,
            key: key.to_string(),
            vcpus: want.size.vcpus,
            memory_mib: want.size.memory_mib,
            network: want.network,
            dockerd: want.dockerd,
            work_size,
            saved_unix_secs: now_secs(),
        };
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            // Only what clones share is kept: they bring their own
            // workspace and output disks, sockets and logs.
            for sub in ["run", "run-retry"] {
                let _ = std::fs::remove_dir_all(dir.0.join(sub));
            }
            for file in [WORK_FILE, OUT_FILE] {
                let _ = std::fs::remove_file(dir.0.join(file));
            }
            store.put(&dir.0, &meta)
        })
        .await
        .map_err(blocking("storing a clean snapshot"))?
        .map_err(vm_error)
    }

    /// A clone of `snap` with the workspace built from `inputs`, its first
    /// requests (reseed and clock, then the mount) pending.
    pub(crate) async fn clone_of(
        &self,
        snap: &CleanSnapshot,
        want: &Wanted<'_>,
        inputs: Inputs<'_>,
    ) -> Result<Lease, VmError> {
        let dir = self.new_vm_dir().await?;
        let (base_mem, own_mem) = (snap.dir.join(MEMORY_FILE), dir.0.join(MEMORY_FILE));
        let (base_scratch, own_scratch) = (snap.dir.join(SCRATCH_FILE), dir.0.join(SCRATCH_FILE));
        let overlay = dir.0.join(OVERLAY_FILE);
        let files = async {
            if want.saveable {
                let (a, b) = tokio::join!(
                    sparse_copy(&base_mem, &own_mem),
                    sparse_copy(&base_scratch, &own_scratch)
                );
                a.and(b)
            } else {
                disks::overlay(&base_scratch, &overlay).await
            }
        };
        self.boot_clone(dir, &snap.meta, &snap.dir, want, inputs, files)
            .await
    }

    /// An empty directory for a new VM.
    pub(crate) async fn new_vm_dir(&self) -> Result<VmDir, VmError> {
        let dir = VmDir(self.config.work_dir.join(uuid::Uuid::new_v4().to_string()));
        tokio::fs::create_dir_all(&dir.0)
            .await
            .map_err(|e| VmError::io("creating the VM directory", e))?;
        Ok(dir)
    }

    /// Boots, in `dir`, a clone of the snapshot `meta` whose device state is
    /// in `base`, once `files` has put its memory file and scratch disk in
    /// place (while the workspace disk is made). A clone that is not
    /// saveable maps `base`'s memory file privately and sees `base`'s
    /// scratch disk through its overlay instead.
    pub(crate) async fn boot_clone(
        &self,
        dir: VmDir,
        meta: &CleanMeta,
        base: &Path,
        want: &Wanted<'_>,
        inputs: Inputs<'_>,
        files: impl std::future::Future<Output = Result<(), VmError>>,
    ) -> Result<Lease, VmError> {
        let t = Instant::now();
        let work_image = dir.0.join(WORK_FILE);
        let out_image = dir.0.join(OUT_FILE);
        let out_size = meta.work_size + OUT_SLACK;
        let mut spec = self.vm_spec(
            &dir.0,
            &want.image.path,
            meta.vcpus,
            meta.memory_mib,
            meta.network,
            true,
        );
        let (a, b) = tokio::join!(
            files,
            disks::mkfs(&work_image, meta.work_size, Some(inputs.dir))
        );
        a.and(b)?;
        outputs::reset_disk(&out_image, out_size)?;
        if !want.saveable {
            spec.memory_file = Some(base.join(MEMORY_FILE));
            spec.memory_private = true;
            if let Some(d) = spec.disks.iter_mut().find(|d| d.serial == SCRATCH_SERIAL) {
                *d = DiskSpec {
                    path: dir.0.join(OVERLAY_FILE),
                    format: DiskFormat::Qcow2,
                    ..d.clone()
                };
            }
        }
        let prepared = t.elapsed();
        let vm = self
            .vmm
            .boot(&VmSpec {
                incoming: Some(base.join(STATE_FILE)),
                ..spec.clone()
            })
            .await?;
        tracing::debug!(
            files_ms = prepared.as_millis() as u64,
            clone_ms = t.elapsed().as_millis() as u64,
            saveable = want.saveable,
            "microVM cloned from a snapshot"
        );
        Ok(Lease {
            vm,
            dir,
            spec,
            work_image,
            work_size: meta.work_size,
            out_image,
            out_size,
            pending: vec![restored_request()?, mount_request()],
            dockerd_up: meta.dockerd,
        })
    }

    /// Hashes the default image, and makes its clean snapshot at the
    /// default size (no network, no dockerd) unless there is one: run once
    /// at start, so that even the first action gets a clone and a key.
    pub async fn prepare_default_snapshot(&self) {
        // The first recyclable action of the default image would otherwise
        // hash it (its runner key names it by content) while it waits.
        if let Err(e) = self.content_ids.of(&self.config.default_image).await {
            tracing::warn!(error = %e, "could not hash the default image");
        }
        if self.clean.is_none() {
            return;
        }
        let image = ResolvedImage {
            path: self.config.default_image.clone(),
            env: vec![],
            name: "the default image".into(),
            hold: Default::default(),
        };
        let want = Wanted {
            image: &image,
            size: self.config.default_size,
            network: false,
            dockerd: false,
            saveable: false,
        };
        if let Some(store) = &self.clean {
            let _ = self
                .clean_snapshot(store, &want, &CancellationToken::new())
                .await;
        }
    }
}

/// Tells a restored VM's agent to reseed its kernel's random numbers from
/// fresh host randomness and to set the clock.
pub(crate) fn restored_request() -> Result<Request, VmError> {
    let mut seed = vec![0u8; SEED_BYTES];
    getrandom::getrandom(&mut seed)
        .map_err(|e| VmError::Setup(format!("no host randomness to reseed a clone: {e}")))?;
    let unix_nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u64::MAX as u128) as u64)
        .unwrap_or(0);
    Ok(Request::Restored { unix_nanos, seed })
}

/// Copies `from` to `to` keeping holes (memory files and disks are mostly
/// holes). coreutils' `cp` does the SEEK_DATA walk; std's copy does not
/// keep holes.
pub(crate) async fn sparse_copy(from: &Path, to: &Path) -> Result<(), VmError> {
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|e| VmError::io("running cp", e))?;
    if !out.status.success() {
        return Err(VmError::Setup(format!(
            "copying {} failed: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
