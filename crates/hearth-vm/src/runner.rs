//! `workload-isolation-type=firecracker`: one action, one fresh microVM.
//! The input root goes in as an ext4 workspace disk, the command runs through
//! the guest agent, and the outputs come back out of that disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use hearth_executor::{ExecError, RunOutcome, RunSpec, Runner};
use hearth_guest::protocol::{
    ExecRequest, Request, Response, ROOT_SERIAL, SCRATCH_SERIAL, WORK_SERIAL,
};
use hearth_scheduler::platform::{parse_bytes, parse_cpu};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::{disks, DiskSpec, QemuVm, VmError, VmSpec, Vmm};

/// A container image ready to boot: a read-only ext4 disk image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub path: PathBuf,
    /// `NAME=VALUE` entries from the image config (PATH and the like).
    pub env: Vec<String>,
}

/// Where `container-image` references are turned into disk images.
#[async_trait]
pub trait ImageSource: Send + Sync + 'static {
    async fn resolve(
        &self,
        reference: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<ResolvedImage, ExecError>;
}

#[derive(Debug, Clone)]
pub struct VmRunnerConfig {
    /// Per-VM directories (disks, sockets, console logs) go here.
    pub work_dir: PathBuf,
    /// The image used when `container-image` is absent or `none`.
    pub default_image: PathBuf,
    pub default_vcpus: u32,
    pub max_vcpus: u32,
    pub default_memory_mib: u64,
    pub default_disk_bytes: u64,
    /// Host-loopback services (allowed registries) networked VMs may reach
    /// at 127.0.0.1:PORT: port and the Unix socket that leads there.
    pub forwards: Vec<(u16, PathBuf)>,
}

pub struct VmRunner {
    vmm: Arc<dyn Vmm>,
    images: Option<Arc<dyn ImageSource>>,
    config: VmRunnerConfig,
    /// Serves `config.forwards` for as long as the runner lives.
    _forwarder: Option<crate::forward::Forwarder>,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn vm_error(e: VmError) -> ExecError {
    let code = match e {
        VmError::Boot { .. } | VmError::Agent(_) | VmError::Version(..) => Code::Unavailable,
        VmError::Io { .. } | VmError::Setup(_) => Code::Internal,
    };
    ExecError::Coded {
        code,
        message: format!("microVM: {e}"),
    }
}

/// Removes a VM's directory when the action is done, whatever happened.
struct VmDir(PathBuf);

impl Drop for VmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

impl VmRunner {
    pub fn new(
        vmm: Arc<dyn Vmm>,
        images: Option<Arc<dyn ImageSource>>,
        config: VmRunnerConfig,
    ) -> Self {
        VmRunner {
            vmm,
            images,
            config,
            _forwarder: None,
        }
    }

    /// Boots; a boot that fails (QEMU died, or the guest hung — rare under
    /// emulation) is retried once from a fresh run directory.
    async fn boot_with_retry(&self, mut spec: VmSpec) -> Result<QemuVm, VmError> {
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

    /// Keeps the forwarder behind `config.forwards` alive with the runner.
    pub fn with_forwarder(mut self, forwarder: crate::forward::Forwarder) -> Self {
        self._forwarder = Some(forwarder);
        self
    }

    async fn image(&self, spec: &RunSpec) -> Result<ResolvedImage, ExecError> {
        let p = &spec.platform;
        let reference = match p.get("container-image") {
            None | Some("") | Some("none") => {
                return Ok(ResolvedImage {
                    path: self.config.default_image.clone(),
                    env: vec![],
                })
            }
            Some(r) => r.strip_prefix("docker://").ok_or_else(|| {
                ExecError::InvalidInput(format!(
                    "container-image={r:?}: expected docker://REFERENCE or none"
                ))
            })?,
        };
        let images = self.images.as_ref().ok_or_else(|| ExecError::Coded {
            code: Code::FailedPrecondition,
            message: format!("container-image={reference:?}: this executor cannot pull images"),
        })?;
        let creds = match (
            p.get("container-registry-username"),
            p.get("container-registry-password"),
        ) {
            (Some(u), Some(pw)) => Some((u, pw)),
            _ => None,
        };
        images.resolve(reference, creds).await
    }

    fn size(&self, spec: &RunSpec) -> Result<(u32, u64, u64), ExecError> {
        let p = &spec.platform;
        let vcpus = match p.get("estimatedcpu") {
            Some(v) => parse_cpu(v).map_err(ExecError::InvalidInput)?.ceil() as u32,
            None => self.config.default_vcpus,
        }
        .clamp(1, self.config.max_vcpus.max(1));
        let memory_mib = match p.get("estimatedmemory") {
            Some(v) => (parse_bytes(v).map_err(ExecError::InvalidInput)? / (1024 * 1024)).max(256),
            None => self.config.default_memory_mib,
        };
        let disk = match p.get("estimatedfreediskbytes") {
            Some(v) => parse_bytes(v)
                .map_err(ExecError::InvalidInput)?
                .max(64 << 20),
            None => self.config.default_disk_bytes,
        };
        Ok((vcpus, memory_mib, disk))
    }
}

#[async_trait]
impl Runner for VmRunner {
    fn isolation_type(&self) -> &'static str {
        "firecracker"
    }

    async fn run(
        &self,
        spec: &RunSpec,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, ExecError> {
        let started = std::time::Instant::now();
        let image = self.image(spec).await?;
        let (vcpus, memory_mib, disk_bytes) = self.size(spec)?;
        let vm_dir = VmDir(self.config.work_dir.join(uuid::Uuid::new_v4().to_string()));
        std::fs::create_dir_all(&vm_dir.0)
            .map_err(|e| ExecError::io("creating the VM directory", e))?;
        let ws_src = spec
            .input_root
            .parent()
            .ok_or_else(|| ExecError::Internal("input root has no parent".into()))?;
        let scratch = vm_dir.0.join("scratch.img");
        let work = vm_dir.0.join("work.img");
        let work_size = dir_size(ws_src) * 2 + disk_bytes;
        let (a, b) = tokio::join!(
            disks::mkfs(&scratch, disk_bytes, None),
            disks::mkfs(&work, work_size, Some(ws_src))
        );
        a.and(b).map_err(vm_error)?;

        let network = spec.platform.get("network") == Some("external");
        let vm_spec = VmSpec {
            vcpus,
            memory_mib,
            disks: vec![
                DiskSpec {
                    path: image.path.clone(),
                    serial: ROOT_SERIAL.into(),
                    read_only: true,
                },
                DiskSpec {
                    path: scratch,
                    serial: SCRATCH_SERIAL.into(),
                    read_only: false,
                },
                DiskSpec {
                    path: work.clone(),
                    serial: WORK_SERIAL.into(),
                    read_only: false,
                },
            ],
            network,
            forwards: if network {
                self.config.forwards.clone()
            } else {
                vec![]
            },
            run_dir: vm_dir.0.join("run"),
        };
        let booting = std::time::Instant::now();
        let mut vm = tokio::select! {
            vm = self.boot_with_retry(vm_spec) => vm.map_err(vm_error)?,
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        };
        tracing::debug!(
            disks_ms = (booting - started).as_millis() as u64,
            boot_ms = booting.elapsed().as_millis() as u64,
            "microVM up"
        );
        let outcome = self.run_in(&mut vm, spec, &image, cancel).await;
        vm.kill().await;
        let outcome = outcome?;
        // Outputs: the workspace disk's /root replaces the input root.
        if !outcome.timed_out {
            std::fs::remove_dir_all(&spec.input_root)
                .map_err(|e| ExecError::io("clearing the input root", e))?;
            disks::extract_dir(&work, "/root", &spec.input_root)
                .await
                .map_err(vm_error)?;
        }
        for (guest, host) in [
            ("/stdout", &spec.stdout_path),
            ("/stderr", &spec.stderr_path),
        ] {
            if let Err(e) = disks::extract_file(&work, guest, host).await {
                tracing::warn!(error = %e, "could not copy {guest} out of the VM");
            }
            if !host.exists() {
                std::fs::write(host, b"")
                    .map_err(|e| ExecError::io("creating stdout/stderr", e))?;
            }
        }
        Ok(outcome)
    }
}

impl VmRunner {
    async fn run_in(
        &self,
        vm: &mut QemuVm,
        spec: &RunSpec,
        image: &ResolvedImage,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, ExecError> {
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
        });
        let exited = tokio::select! {
            r = agent.call(&req) => r.map_err(vm_error)?,
            _ = tokio::time::sleep(spec.timeout) => return Ok(RunOutcome { exit_code: 137, timed_out: true }),
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        };
        let Response::Exited(status) = exited else {
            return Err(vm_error(VmError::Agent(format!(
                "unexpected answer to exec: {exited:?}"
            ))));
        };
        // Flush the workspace so the host reads a consistent filesystem.
        tokio::time::timeout(
            Duration::from_secs(30),
            agent.call(&Request::Unmount {
                path: "/work".into(),
            }),
        )
        .await
        .map_err(|_| vm_error(VmError::Agent("unmounting the workspace timed out".into())))?
        .map_err(vm_error)?;
        Ok(RunOutcome {
            exit_code: status.exit_code,
            timed_out: false,
        })
    }
}
