//! The QEMU `microvm` backend: a minimal machine (virtio-mmio devices found
//! through ACPI), disks as virtio-blk with serial numbers, the agent on a
//! virtio-serial port, QMP for control.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use hearth_guest::protocol::{Response, PORT_NAME};
use tokio::process::{Child, Command};

use crate::deadline::{bounded, SAVE_TIMEOUT};
use crate::qmp::Qmp;
use crate::sockdir::{self, SocketDir};
use crate::{Accel, AgentClient, BootFiles, DiskFormat, VmError, VmSpec, Vmm};

pub struct QemuVmm {
    pub qemu: PathBuf,
    pub boot: BootFiles,
    pub accel: Accel,
    /// Passed as `tsc_early_khz` under TCG.
    pub tsc_khz: Option<u64>,
    pub boot_timeout: Duration,
    /// The bound of each later control call to the agent and of each QMP
    /// exchange ([`crate::deadline::CONTROL_TIMEOUT`] in production).
    pub control_timeout: Duration,
    /// The `hearth` binary, whose `forward-unix` subcommand QEMU runs for
    /// each guest connection to a forwarded service.
    pub forward_exe: PathBuf,
    /// What `qemu --version` printed: a saved VM restores only into the
    /// same QEMU.
    pub version: String,
    /// The kernel's hash ([`crate::hash_file`]): runner keys name it by
    /// content, to agree across hosts.
    pub kernel_id: String,
}

/// A file's path, size and modification time: enough to tell a replaced
/// kernel or image apart without hashing gigabytes.
pub fn file_identity(path: &Path) -> String {
    let meta = std::fs::metadata(path);
    let (len, mtime) = meta
        .map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            (m.len(), mtime)
        })
        .unwrap_or((0, 0));
    format!("{}:{len}:{mtime}", path.display())
}

/// Guest RAM in a shared memory file is not copied by migration: the file
/// already holds it.
fn ignore_shared() -> serde_json::Value {
    serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
}

/// `qemu --version`'s first line.
pub async fn qemu_version(qemu: &Path) -> Result<String, VmError> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .map_err(|e| VmError::io(format!("running {} --version", qemu.display()), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// The agent's virtio-serial port and QMP: sockets QEMU binds in the VM's
/// run directory, named through [`SocketDir`] so that their paths fit
/// `sun_path` whatever the directory's.
const AGENT_SOCK: &str = "agent.sock";
pub(crate) const QMP_SOCK: &str = "qmp.sock";

/// Loads a VM saved by [`QemuVm::save`] into a QEMU started with
/// `-incoming defer`, then resumes it (it was paused when saved, and stays
/// paused after loading).
async fn wake_restored(run: &SocketDir, state: &Path, control: Duration) -> Result<(), VmError> {
    let mut qmp = loop {
        match Qmp::connect(run, QMP_SOCK, control).await {
            Ok(q) => break q,
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    qmp.execute("migrate-set-capabilities", ignore_shared())
        .await?;
    qmp.execute(
        "migrate-incoming",
        serde_json::json!({"uri": format!("exec:cat {}", shell_quote(state))}),
    )
    .await?;
    loop {
        let status = qmp.execute("query-status", serde_json::json!({})).await?;
        match status.get("status").and_then(|s| s.as_str()) {
            Some("inmigrate") | Some("restore-vm") => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            _ => break,
        }
    }
    qmp.execute("cont", serde_json::json!({})).await?;
    Ok(())
}

/// A running VM. Killed (with its QEMU process) when dropped.
pub struct QemuVm {
    child: Child,
    agent: AgentClient,
    /// The guest's hello (`Pong` for a restored VM, whose hello went to
    /// the host that booted it).
    pub hello: Response,
    /// The run directory (sockets, logs), held open for its sockets.
    run: SocketDir,
    /// Gives a networked VM's namespace its outbound connectivity.
    slirp: Option<Child>,
    /// The bound of each QMP exchange.
    control: Duration,
}

impl QemuVmm {
    /// QEMU's arguments; the sockets are named in `run`, whose descriptor
    /// QEMU inherits.
    fn args(&self, spec: &VmSpec, run: &SocketDir) -> Vec<String> {
        let mut append = vec!["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        if self.accel == Accel::Tcg {
            if let Some(khz) = self.tsc_khz {
                append.push(format!("tsc_early_khz={khz}"));
            }
        }
        if spec.network {
            append.push("hearth.net=1".into());
        }
        if !spec.forwards.is_empty() {
            let ports: Vec<String> = spec.forwards.iter().map(|(p, _)| p.to_string()).collect();
            append.push(format!("hearth.fwd={}", ports.join(",")));
        }
        let mut a: Vec<String> = vec!["-M".into()];
        match &spec.memory_file {
            Some(file) => a.extend([
                "microvm,memory-backend=mem".into(),
                "-object".into(),
                format!(
                    "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                    spec.memory_mib,
                    file.display(),
                    if spec.memory_private { "off" } else { "on" }
                ),
            ]),
            None => a.push("microvm".into()),
        }
        a.extend(self.accel.qemu_args().iter().map(|s| s.to_string()));
        a.extend([
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.boot.kernel.display().to_string(),
            "-initrd".into(),
            self.boot.initramfs.display().to_string(),
            "-append".into(),
            append.join(" "),
            "-serial".into(),
            format!("file:{}", run.real("console.log").display()),
        ]);
        for (i, d) in spec.disks.iter().enumerate() {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            let format = match d.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            a.push("-drive".into());
            a.push(format!(
                "id=disk{i},file={},format={format},if=none,cache=unsafe{ro}",
                d.path.display()
            ));
            a.push("-device".into());
            a.push(format!(
                "virtio-blk-device,drive=disk{i},serial={}",
                d.serial
            ));
        }
        if spec.network {
            let mut netdev = "user,id=net0".to_string();
            for (port, sock) in &spec.forwards {
                netdev.push_str(&format!(
                    ",guestfwd=tcp:10.0.2.100:{port}-cmd:{} forward-unix {}",
                    self.forward_exe.display(),
                    sock.display()
                ));
            }
            a.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                "virtio-net-device,netdev=net0".into(),
            ]);
        }
        a.extend([
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                run.short(AGENT_SOCK).display()
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={PORT_NAME}"),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", run.short(QMP_SOCK).display()),
        ]);
        if spec.incoming.is_some() {
            // The source's migration capabilities must be set first (QMP).
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a
    }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

/// The last lines of a console log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[async_trait]
impl Vmm for QemuVmm {
    async fn boot(&self, spec: &VmSpec) -> Result<QemuVm, VmError> {
        let run = SocketDir::create_private(&spec.run_dir)
            .map_err(|e| VmError::io(format!("creating {}", spec.run_dir.display()), e))?;
        let log = std::fs::File::create(spec.run_dir.join("qemu.log"))
            .map_err(|e| VmError::io("creating qemu.log", e))?;
        let log2 = log.try_clone().map_err(|e| VmError::io("qemu.log", e))?;
        // A networked VM gets a private network namespace: there, QEMU's
        // host alias 10.0.2.2 and 127.0.0.1 reach nothing of the executor
        // host; slirp4netns gives the namespace outbound connectivity with
        // the host's loopback closed.
        let mut cmd = if spec.network {
            // Loopback must be up in the namespace: libslirp's guestfwd
            // builds its socket pairs over it.
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
            ])
            .arg(&self.qemu);
            c
        } else {
            Command::new(&self.qemu)
        };
        // If the executor dies, its VMs die with it. QEMU (through unshare
        // and sh, which keep it) gets the run directory's descriptor.
        let run_fd = run.raw_fd();
        // SAFETY: prctl and fcntl are async-signal-safe; nothing else runs
        // before exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                sockdir::inherit(run_fd)
            });
        }
        let mut child = cmd
            .args(self.args(spec, &run))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| VmError::io(format!("starting {}", self.qemu.display()), e))?;
        let slirp = if spec.network {
            let pid = child
                .id()
                .ok_or_else(|| VmError::Setup("QEMU exited at once".into()))?;
            let slirp_log = std::fs::File::create(spec.run_dir.join("slirp4netns.log"))
                .map_err(|e| VmError::io("creating slirp4netns.log", e))?;
            Some(
                Command::new("slirp4netns")
                    .args([
                        "--configure",
                        "--mtu=65520",
                        "--disable-host-loopback",
                        "--cidr=10.0.3.0/24",
                    ])
                    .arg(pid.to_string())
                    .arg("tap0")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(slirp_log)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| {
                        VmError::io("starting slirp4netns (networking for network=external)", e)
                    })?,
            )
        } else {
            None
        };
        let console = spec.run_dir.join("console.log");
        let control = self.control_timeout;
        let ready = async {
            match &spec.incoming {
                None => AgentClient::connect(&run, AGENT_SOCK, self.boot_timeout, control).await,
                Some(state) => {
                    bounded(
                        || "QEMU did not finish the restore".into(),
                        self.boot_timeout,
                        wake_restored(&run, state, control),
                    )
                    .await?;
                    let agent =
                        AgentClient::attach(&run, AGENT_SOCK, self.boot_timeout, control).await?;
                    Ok((agent, Response::Pong))
                }
            }
        };
        let connected = tokio::select! {
            r = ready => r,
            status = child.wait() => {
                let qemu_log = tail(&spec.run_dir.join("qemu.log"), 20);
                return Err(VmError::Boot {
                    reason: format!("QEMU exited ({}) before the agent answered: {}",
                        status.map(|s| s.to_string()).unwrap_or_default(), qemu_log.trim()),
                    console: tail(&console, 30),
                });
            }
        };
        match connected {
            Ok((agent, hello)) => Ok(QemuVm {
                child,
                agent,
                hello,
                run,
                slirp,
                control,
            }),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let qemu_log = tail(&spec.run_dir.join("qemu.log"), 20);
                let reason = if qemu_log.trim().is_empty() {
                    e.to_string()
                } else {
                    format!("{e}; QEMU said: {}", qemu_log.trim())
                };
                Err(VmError::Boot {
                    reason,
                    console: tail(&console, 30),
                })
            }
        }
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn identity(&self) -> String {
        // The initramfs is named by its content hash (agent and modules).
        let initramfs = self.boot.initramfs.file_name().unwrap_or_default();
        format!(
            "{} {} {} {} {}",
            self.version,
            self.kernel_id,
            initramfs.to_string_lossy(),
            self.accel,
            self.tsc_khz.unwrap_or(0)
        )
    }
}

impl QemuVm {
    /// A VM whose "QEMU" is `child`, with its QMP socket in `run`: for
    /// tests that play QEMU and the agent.
    #[cfg(test)]
    pub(crate) fn fake(child: Child, agent: AgentClient, run: SocketDir) -> Self {
        QemuVm {
            control: agent.control(),
            child,
            agent,
            hello: Response::Pong,
            run,
            slirp: None,
        }
    }

    pub fn agent(&mut self) -> &mut AgentClient {
        &mut self.agent
    }

    /// Stops the VM now (no guest shutdown) and waits for QEMU to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        if let Some(s) = &mut self.slirp {
            let _ = s.start_kill();
            let _ = s.wait().await;
        }
    }

    pub fn console_tail(&self) -> String {
        tail(&self.run.real("console.log"), 30)
    }

    /// Saves a paused VM's device state to `state` (within
    /// [`SAVE_TIMEOUT`]) and stops it, saved or not. The VM must
    /// have been booted with a shared `memory_file`: its RAM is already in
    /// that file, so only device state is written (tens of KB). Restore
    /// with the same spec plus `incoming`, the disks and memory file as they
    /// are now.
    pub async fn save(&mut self, state: &Path) -> Result<(), VmError> {
        let saved = bounded(
            || "QEMU did not finish saving the VM".into(),
            SAVE_TIMEOUT,
            self.migrate_to(state),
        )
        .await;
        self.kill().await;
        saved
    }

    /// Writes a paused VM's device state to `state` (within
    /// [`SAVE_TIMEOUT`]), its RAM being in its shared memory file, and
    /// leaves it stopped with its disks flushed and released, so that its
    /// files can be copied for a snapshot. `set_running(true)` takes the
    /// disks back and resumes it.
    pub async fn checkpoint(&mut self, state: &Path) -> Result<(), VmError> {
        bounded(
            || "QEMU did not finish checkpointing the VM".into(),
            SAVE_TIMEOUT,
            self.migrate_to(state),
        )
        .await
    }

    async fn migrate_to(&mut self, state: &Path) -> Result<(), VmError> {
        let mut qmp = Qmp::connect(&self.run, QMP_SOCK, self.control).await?;
        qmp.execute("stop", serde_json::json!({})).await?;
        qmp.execute("migrate-set-capabilities", ignore_shared())
            .await?;
        qmp.execute(
            "migrate-set-parameters",
            serde_json::json!({"max-bandwidth": 1u64 << 40}),
        )
        .await?;
        qmp.execute(
            "migrate",
            serde_json::json!({"uri": format!("exec:cat > {}", shell_quote(state))}),
        )
        .await?;
        loop {
            let info = qmp.execute("query-migrate", serde_json::json!({})).await?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    let why = info
                        .get("error-desc")
                        .and_then(|d| d.as_str())
                        .unwrap_or("");
                    return Err(VmError::Setup(format!(
                        "saving the VM: migration {s}: {why}"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// Pauses or resumes the vCPUs through QMP, within the control bound.
    pub async fn set_running(&mut self, running: bool) -> Result<(), VmError> {
        let mut qmp = Qmp::connect(&self.run, QMP_SOCK, self.control).await?;
        qmp.execute(if running { "cont" } else { "stop" }, serde_json::json!({}))
            .await?;
        Ok(())
    }
}

/// Kills QEMU processes left over from an earlier executor whose VMs lived
/// under `dir` (e.g. after the executor was killed), by their command line.
pub fn kill_stale(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
            tracing::warn!(pid, "killing a VM left over from an earlier executor");
            // SAFETY: plain kill(2) on a pid we just read.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
#[path = "qemu_tests.rs"]
mod tests;
