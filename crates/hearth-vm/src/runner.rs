//! `workload-isolation-type=firecracker`: the action runs in a microVM. The
//! input root goes in as an ext4 workspace disk, the command runs through the
//! guest agent, and the logs and declared outputs come back as a tar stream
//! the agent writes onto a raw output disk (see outputs.rs). With
//! `recycle-runner=true` a VM that ran an action successfully is paused into
//! the pool and resumed, with a fresh workspace, for the next action with an
//! equal runner key; `init-dockerd=true` starts dockerd in it first.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use hearth_executor::{
    ExecError, LocalCas, RunOutcome, RunSpec, Runner, RunnerStart, SharedSnapshot,
};
use hearth_guest::protocol::{
    ExecRequest, Request, Response, OUT_SERIAL, ROOT_SERIAL, SCRATCH_SERIAL, WORK_SERIAL,
};
use hearth_scheduler::affinity_key;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::clean::CleanStore;
use crate::content_id::ContentIds;
use crate::fresh::Wanted;
use crate::images::{self, ImageSource, ResolvedImage, VmSize};
use crate::outputs;
use crate::park::{runner_snapshot_key, Parking};
use crate::pool::Pool;
use crate::share::Sharing;
use crate::snapshots::{SnapshotStore, MEMORY_FILE, OUT_FILE, SCRATCH_FILE, WORK_FILE};
use crate::{DiskFormat, DiskSpec, QemuVm, VmError, VmSpec, Vmm};

#[derive(Debug, Clone)]
pub struct VmRunnerConfig {
    /// Per-VM directories (disks, sockets, console logs) go here.
    pub work_dir: std::path::PathBuf,
    /// The image used when `container-image` is absent or `none`.
    pub default_image: std::path::PathBuf,
    pub default_size: VmSize,
    /// The largest VM an action may ask for (`--vm-max-*`).
    pub max_size: VmSize,
    /// Host-loopback services (allowed registries) networked VMs may reach
    /// at 127.0.0.1:PORT: port and the Unix socket that leads there.
    pub forwards: Vec<(u16, std::path::PathBuf)>,
    /// `--registry-mirror` and `--insecure-registry` for dockerd in the VMs.
    pub docker_mirrors: Vec<String>,
    pub insecure_registries: Vec<String>,
    /// Bounds of the pool of paused VMs.
    pub pool_max_vms: usize,
    pub pool_max_memory_mib: u64,
    /// Where evicted and shutdown-time pooled VMs are saved, and how many
    /// snapshots are kept (oldest deleted first). None: not saved.
    pub snapshot_dir: Option<std::path::PathBuf>,
    pub snapshot_max: usize,
    /// Where clean snapshots are kept (fresh VMs are clones of them), and
    /// the disk bytes they may take. None: fresh VMs boot cold
    /// (`--vm-clean-snapshots off`).
    pub clean_dir: Option<std::path::PathBuf>,
    pub clean_max_bytes: u64,
    /// How long dockerd may take to start ([`crate::DOCKERD_TIMEOUT`] in
    /// production).
    pub dockerd_timeout: Duration,
}

pub struct VmRunner {
    pub(crate) vmm: Arc<dyn Vmm>,
    images: Option<Arc<dyn ImageSource>>,
    pub(crate) config: VmRunnerConfig,
    /// The pool, saved VMs, and parking VMs into them.
    pub(crate) parking: Arc<Parking>,
    pub(crate) clean: Option<Arc<CleanStore>>,
    /// Images by content, for runner keys.
    pub(crate) content_ids: ContentIds,
    /// One lock per clean-snapshot key: the first action of a configuration
    /// makes its snapshot, the others wait for it. (One small entry per VM
    /// configuration ever seen.)
    pub(crate) makers: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serves `config.forwards` for as long as the runner lives.
    _forwarder: Option<crate::forward::Forwarder>,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The agent enforces the action's timeout; the host kills the VM if it
/// has not answered this long after that.
const TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// How long the agent may take to pack the outputs (emulated disks are slow).
const PACK_TIMEOUT: Duration = Duration::from_secs(120);
/// The output disk is the workspace's size plus this: everything packed
/// comes from the workspace, and tar's headers take less than ext4's blocks.
pub(crate) const OUT_SLACK: u64 = 16 << 20;

/// How the command went in the VM.
struct Ran {
    outcome: RunOutcome,
    /// The guest unmounted the workspace (nothing still uses it).
    released: bool,
    /// The agent packed the logs (and, unless timed out, the outputs).
    packed: bool,
}

/// The action's error for a VM's. A timeout says that the VM was killed:
/// every path that turns one into the action's error kills the VM (see
/// `run`), so it is never pooled, saved or snapshotted.
pub(crate) fn vm_error(e: VmError) -> ExecError {
    let code = match e {
        VmError::Boot { .. }
        | VmError::Agent(_)
        | VmError::Version(..)
        | VmError::Timeout { .. } => Code::Unavailable,
        VmError::Io { .. } | VmError::Setup(_) => Code::Internal,
    };
    let killed = if matches!(e, VmError::Timeout { .. }) {
        "; the VM was killed"
    } else {
        ""
    };
    ExecError::Coded {
        code,
        message: format!("microVM: {e}{killed}"),
    }
}

/// An action's inputs, to be built into its workspace disk: where they are
/// and about how many bytes they take (measured once per action).
#[derive(Clone, Copy)]
pub(crate) struct Inputs<'a> {
    pub dir: &'a Path,
    pub bytes: u64,
}

impl<'a> Inputs<'a> {
    /// Walks `dir` off the async threads.
    pub async fn measure(dir: &'a Path) -> Result<Inputs<'a>, ExecError> {
        let owned = dir.to_path_buf();
        let bytes = tokio::task::spawn_blocking(move || dir_size(&owned))
            .await
            .map_err(|e| ExecError::Internal(format!("measuring the inputs: {e}")))?;
        Ok(Inputs { dir, bytes })
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => 4096 + dir_size(&e.path()),
            Ok(m) => m.len() + 4096,
            Err(_) => 0,
        })
        .sum()
}

/// The runner key: the scheduler's affinity key (instance name and the whole
/// platform), a dot, then a hash of the VM configuration (QEMU version,
/// kernel, initramfs and so agent version, image content, size, forwarded
/// ports). A recycled or saved VM is only handed to an action with an equal
/// key.
fn runner_key(
    spec: &RunSpec,
    vmm: &dyn Vmm,
    image_id: &str,
    size: VmSize,
    forwards: &[(u16, std::path::PathBuf)],
) -> String {
    let mut h = Sha256::new();
    h.update(vmm.identity().as_bytes());
    h.update([0]);
    h.update(image_id.as_bytes());
    for (port, _) in forwards {
        h.update(format!("\0fwd:{port}").as_bytes());
    }
    h.update(format!("\0{}/{}/{}", size.vcpus, size.memory_mib, size.disk_bytes).as_bytes());
    format!(
        "{}.{}",
        affinity_key(&spec.tenant, &spec.instance_name, &spec.platform),
        hex::encode(h.finalize())
    )
}

/// The affinity part of a runner key.
pub(crate) fn affinity_of(runner_key: &str) -> String {
    runner_key
        .split_once('.')
        .map_or(runner_key, |(a, _)| a)
        .to_string()
}

impl VmRunner {
    /// `cas`: where runner snapshots are shared with other executors (with
    /// clean snapshots on); None shares none.
    pub fn new(
        vmm: Arc<dyn Vmm>,
        images: Option<Arc<dyn ImageSource>>,
        config: VmRunnerConfig,
        cas: Option<LocalCas>,
    ) -> Self {
        let snapshots = config.snapshot_dir.as_ref().and_then(|dir| {
            SnapshotStore::open(dir, config.snapshot_max)
                .map_err(|e| tracing::warn!(error = %e, "VM snapshots disabled"))
                .ok()
        });
        let clean = config.clean_dir.as_ref().and_then(|dir| {
            CleanStore::open(dir, config.clean_max_bytes)
                .map(Arc::new)
                .map_err(
                    |e| tracing::warn!(error = %e, "clean snapshots disabled; fresh VMs boot cold"),
                )
                .ok()
        });
        let pool = Pool::new(config.pool_max_vms, config.pool_max_memory_mib);
        VmRunner {
            parking: Arc::new(Parking::new(
                pool,
                snapshots,
                clean.clone(),
                cas.filter(|_| clean.is_some())
                    .map(|c| Arc::new(Sharing::new(c))),
            )),
            clean,
            content_ids: ContentIds::default(),
            makers: Default::default(),
            vmm,
            images,
            config,
            _forwarder: None,
        }
    }

    /// Keeps the forwarder behind `config.forwards` alive with the runner.
    pub fn with_forwarder(mut self, forwarder: crate::forward::Forwarder) -> Self {
        self._forwarder = Some(forwarder);
        self
    }

    /// Affinity keys of the VMs this runner holds paused or saved, one per
    /// VM.
    pub fn warm_keys(&self) -> Vec<String> {
        self.parking.keys().iter().map(|k| affinity_of(k)).collect()
    }

    /// Boots; a boot that fails (QEMU died, or the guest hung — rare under
    /// emulation) is retried once from a fresh run directory.
    pub(crate) async fn boot_with_retry(&self, mut spec: VmSpec) -> Result<QemuVm, VmError> {
        match self.vmm.boot(&spec).await {
            Ok(vm) => Ok(vm),
            Err(first @ VmError::Boot { .. }) => {
                tracing::warn!(error = %first, "microVM boot failed; retrying once");
                spec.run_dir = spec.run_dir.with_file_name("run-retry");
                self.vmm.boot(&spec).await
            }
            Err(e) => Err(e),
        }
    }

    /// The spec of a VM booting the image `root`, whose scratch, workspace
    /// and output disks, sockets and (when `saveable`) memory file live in
    /// `dir`. A saved VM is restored with the same spec plus `incoming`.
    pub(crate) fn vm_spec(
        &self,
        dir: &Path,
        root: &Path,
        vcpus: u32,
        memory_mib: u64,
        network: bool,
        saveable: bool,
    ) -> VmSpec {
        let disk = |path: &Path, serial: &str, read_only| DiskSpec {
            path: path.to_path_buf(),
            serial: serial.into(),
            read_only,
            format: DiskFormat::Raw,
        };
        VmSpec {
            vcpus,
            memory_mib,
            disks: vec![
                disk(root, ROOT_SERIAL, true),
                disk(&dir.join(SCRATCH_FILE), SCRATCH_SERIAL, false),
                disk(&dir.join(WORK_FILE), WORK_SERIAL, false),
                disk(&dir.join(OUT_FILE), OUT_SERIAL, false),
            ],
            network,
            forwards: if network {
                self.config.forwards.clone()
            } else {
                vec![]
            },
            run_dir: dir.join("run"),
            memory_file: saveable.then(|| dir.join(MEMORY_FILE)),
            memory_private: false,
            incoming: None,
        }
    }

    /// Runs the command (after the `pending` requests, which go out with
    /// it), then has the agent pack the logs and (unless it timed out) the
    /// outputs, then unmount the workspace.
    async fn run_in(
        &self,
        vm: &mut QemuVm,
        spec: &RunSpec,
        image: &ResolvedImage,
        pending: Vec<Request>,
        cancel: CancellationToken,
    ) -> Result<Ran, ExecError> {
        let agent = vm.agent();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut env = spec.environment.clone();
        for kv in &image.env {
            if let Some((k, v)) = kv.split_once('=') {
                if !env.iter().any(|(n, _)| n == k) {
                    env.push((k.to_string(), v.to_string()));
                }
            }
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        let cwd = if spec.working_directory.is_empty() {
            "/work/root".to_string()
        } else {
            format!("/work/root/{}", spec.working_directory)
        };
        let req = Request::Exec(ExecRequest {
            args: spec.arguments.clone(),
            env,
            cwd,
            user: spec
                .platform
                .get("dockeruser")
                .filter(|u| !u.is_empty())
                .map(String::from),
            stdout_path: "/work/stdout".into(),
            stderr_path: "/work/stderr".into(),
            clock_unix_nanos: Some(now.as_nanos() as u64),
            timeout_millis: Some(spec.timeout.as_millis().min(u64::MAX as u128) as u64),
        });
        let timed_out = || RunOutcome::timed_out(137);
        // What a warm or cloned VM needs first (a reseed, the mount of its
        // fresh workspace) goes out with the command; each answer is a
        // control call's, and the action's timeout counts from the last.
        let sent = async {
            let mut batch: Vec<&Request> = pending.iter().collect();
            batch.push(&req);
            agent.send(&batch).await?;
            for first in &pending {
                agent.answer(first, agent.control()).await?;
            }
            Ok(())
        };
        tokio::select! {
            r = sent => r.map_err(vm_error)?,
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        }
        let exited = tokio::select! {
            r = agent.answer(&req, spec.timeout.saturating_add(TIMEOUT_GRACE)) => match r {
                // The agent did not enforce the timeout: the VM goes, with
                // no logs.
                Err(VmError::Timeout { .. }) => return Ok(Ran {
                    outcome: timed_out(),
                    released: false,
                    packed: false,
                }),
                r => r.map_err(vm_error)?,
            },
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        };
        let Response::Exited(status) = exited else {
            return Err(vm_error(VmError::Agent(format!(
                "unexpected answer to exec: {exited:?}"
            ))));
        };
        let outcome = if status.timed_out {
            timed_out()
        } else {
            RunOutcome::exited(status.exit_code)
        };
        let pack = Request::PackOutputs {
            root: "/work/root".into(),
            paths: if outcome.timed_out {
                vec![]
            } else {
                spec.output_paths.clone()
            },
            stdout: "/work/stdout".into(),
            stderr: "/work/stderr".into(),
            serial: OUT_SERIAL.into(),
        };
        let packed = tokio::select! {
            r = agent.call_within(&pack, PACK_TIMEOUT) => r,
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        };
        match packed {
            Ok(Response::Packed { .. }) => {}
            Ok(other) => {
                return Err(vm_error(VmError::Agent(format!(
                    "unexpected answer to packing the outputs: {other:?}"
                ))))
            }
            Err(VmError::Agent(msg)) if msg.contains("do not fit the output disk") => {
                return Err(ExecError::Coded {
                    code: Code::ResourceExhausted,
                    message: format!("microVM: {msg}"),
                })
            }
            Err(e) => return Err(vm_error(e)),
        }
        if outcome.timed_out {
            // Not recycled: the workspace can stay mounted.
            return Ok(Ran {
                outcome,
                released: false,
                packed: true,
            });
        }
        // Unmount the workspace so that a recycled VM gets a fresh one. If
        // something the action left running still uses it, or the agent
        // does not answer, the VM is not recycled (but killed): the outputs
        // are packed and synced, so that costs the VM, not the action.
        let unmount = Request::Unmount {
            path: "/work".into(),
        };
        let released = match agent.call(&unmount).await {
            Ok(_) => true,
            Err(e @ VmError::Timeout { .. }) => {
                tracing::warn!(error = %e, "the VM will be killed, not recycled");
                false
            }
            Err(e) => {
                tracing::info!(error = %e, "workspace still in use after the action; the VM will not be recycled");
                false
            }
        };
        Ok(Ran {
            outcome,
            released,
            packed: true,
        })
    }
}

#[async_trait]
impl Runner for VmRunner {
    fn isolation_type(&self) -> &'static str {
        "firecracker"
    }

    async fn shutdown(&self) {
        self.parking.save_all().await;
    }

    fn warm_keys(&self) -> Vec<String> {
        VmRunner::warm_keys(self)
    }

    fn take_published(&self) -> Vec<SharedSnapshot> {
        self.parking
            .share
            .as_ref()
            .map(|s| s.take_published())
            .unwrap_or_default()
    }

    async fn run(
        &self,
        spec: &RunSpec,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, ExecError> {
        let started = std::time::Instant::now();
        let size = images::size(
            &spec.platform,
            self.config.default_size,
            self.config.max_size,
        )?;
        let image =
            images::resolve(spec, &self.config.default_image, self.images.as_deref()).await?;
        let recycle = spec.platform.flag("recycle-runner");
        let dockerd = spec.platform.flag("init-dockerd");
        // Docker needs to reach registries, so it implies networking unless
        // the action says otherwise.
        let network = match spec.platform.get("network") {
            Some(v) => v == "external",
            None => dockerd,
        };
        let ws_src = spec
            .input_root
            .parent()
            .ok_or_else(|| ExecError::Internal("input root has no parent".into()))?;
        let inputs = Inputs::measure(ws_src).await?;
        // By content: shared snapshots restore only over the same bytes.
        let image_id = if recycle {
            self.content_ids.of(&image.path).await.map_err(vm_error)?
        } else {
            String::new()
        };
        let key = runner_key(
            spec,
            self.vmm.as_ref(),
            &image_id,
            size,
            &self.config.forwards,
        );
        let warm = if recycle {
            self.warm(&key, inputs).await
        } else {
            None
        };
        let want = Wanted {
            image: &image,
            size,
            network,
            dockerd,
            saveable: recycle,
        };
        let (mut lease, kind) = match warm {
            Some(w) => w,
            None => tokio::select! {
                l = self.fresh(&want, recycle.then_some((key.as_str(), spec.shared_snapshot.as_ref())), inputs, &cancel) => l?,
                _ = cancel.cancelled() => return Err(ExecError::Cancelled),
            },
        };
        if dockerd && !lease.dockerd_up {
            if let Err(e) = self.start_dockerd(&mut lease.vm, &image, &cancel).await {
                lease.vm.kill().await;
                return Err(e);
            }
            lease.dockerd_up = true;
        }
        let start = RunnerStart {
            kind,
            ready: started.elapsed(),
        };
        tracing::debug!(
            ready_ms = start.ready.as_millis() as u64,
            kind = kind.as_str(),
            "microVM ready for the command"
        );
        let pending = std::mem::take(&mut lease.pending);
        let ran = match self
            .run_in(&mut lease.vm, spec, &image, pending, cancel)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                lease.vm.kill().await;
                return Err(e);
            }
        };
        // The output disk is read only while the guest cannot run: paused
        // (for recycling) or killed.
        let mut reusable =
            recycle && ran.released && !ran.outcome.timed_out && ran.outcome.exit_code == 0;
        if reusable {
            if let Err(e) = lease.vm.set_running(false).await {
                tracing::warn!(error = %e, "could not pause the VM; not recycling it");
                reusable = false;
            }
        }
        if !reusable {
            lease.vm.kill().await;
        }
        let collected = outputs::collect(&lease, spec, ran.packed).await;
        if reusable && collected.is_ok() {
            self.parking.park(key, lease).await;
        } else {
            lease.vm.kill().await;
            if recycle {
                // Its state may be what made it fail: no clone starts from
                // the snapshot of its line any more.
                if let Some(clean) = &self.clean {
                    clean.discard_key(&runner_snapshot_key(&key));
                }
                if let Some(share) = &self.parking.share {
                    share.withdraw(&key, &affinity_of(&key));
                }
            }
        }
        collected?;
        Ok(RunOutcome {
            start: Some(start),
            ..ran.outcome
        })
    }
}
