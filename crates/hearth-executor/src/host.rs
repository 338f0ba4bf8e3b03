//! `workload-isolation-type=none`: the command runs on the executor host.
//!
//! With a [`Sandbox`] (the default) it runs through bubblewrap as PID 1's
//! child in a PID namespace of its own, so that when it exits, times out or
//! is cancelled, or when the executor dies, every process it started ends
//! with it (`setsid` and double forks included: the kernel kills the whole
//! namespace when its PID 1 goes; `--die-with-parent` takes bubblewrap and
//! that PID 1 down when the executor dies). It sees a mount namespace with only
//! `/usr`, `/bin`, `/lib*` and `/etc` of the host (read-only), a private
//! `/proc`, `/dev` and `/tmp`, and its own input root; the server's data
//! directory, the executor's work directory and other actions' workspaces
//! do not exist there. It runs as an unprivileged user that owns only the
//! workspace's directories, never the input files (the store's, read-only).
//!
//! Without one (`--host-sandbox off`) it runs as the executor's user in its
//! own process group, which is killed whole on timeout, on cancellation and
//! after the command exits.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::error::{ExecError, ExecResult, IoContext};
use crate::runner::{RunOutcome, RunSpec, Runner};

/// Host directories visible (read-only) inside the sandbox, when they exist.
/// A symlink (a merged-/usr `/bin`) is recreated as the same symlink.
const VISIBLE: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// Where a sandboxed action finds its input root: one fixed path, as in a
/// microVM, whatever the executor's work directory is (so outputs that
/// embed the working directory are the same on every executor).
pub const SANDBOX_ROOT: &str = "/work/root";
const SANDBOX_PARENT: &str = "/work";

/// How host actions are confined.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// util-linux `setpriv`, which drops to `uid`/`gid` inside the sandbox.
    pub setpriv: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// More host directories to show read-only (the operator's toolchains).
    pub extra_visible: Vec<PathBuf>,
    /// The static `hearth-runas`, used instead of `setpriv` when given (it
    /// is shown read-only in the sandbox at [`RUNAS_PATH`]).
    pub runas: Option<PathBuf>,
}

/// Where the sandbox sees `hearth-runas`.
const RUNAS_PATH: &str = "/.hearth-runas";

impl Sandbox {
    /// A sandbox that runs actions as `user`, with the tools found on PATH.
    /// Fails, saying what is missing, if it cannot work on this host.
    pub fn for_user(user: &str, extra_visible: Vec<PathBuf>) -> Result<Sandbox, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err(
                "the host sandbox runs actions as another user, which needs root; \
                 run the executor as root, or pass --host-sandbox off (actions then run \
                 as the executor's user and can change the store)"
                    .into(),
            );
        }
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| format!("looking up --run-as user {user:?}: {e}"))?
            .ok_or_else(|| {
                format!(
                    "--run-as user {user:?} does not exist (scripts/install.sh creates \
                     hearth-action: useradd --system --no-create-home hearth-action)"
                )
            })?;
        if u.uid.is_root() {
            return Err(format!(
                "--run-as user {user:?} is root; it must be unprivileged"
            ));
        }
        let find = |name: &str| -> Result<PathBuf, String> {
            ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.exists())
                .ok_or_else(|| {
                    format!("{name} not found: the host sandbox needs it (apt install bubblewrap util-linux)")
                })
        };
        Ok(Sandbox {
            bwrap: find("bwrap")?,
            setpriv: find("setpriv")?,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            extra_visible,
            runas: None,
        })
    }

    /// The bubblewrap command line that runs the action.
    fn command(&self, spec: &RunSpec, tmp: &Path) -> Command {
        let mut cmd = Command::new(&self.bwrap);
        // PID (every process ends with the command) and IPC (no SysV
        // objects shared with the host) namespaces; UTS and cgroup ones
        // would only rename things an unprivileged user cannot change, and
        // every namespace costs time to make and to tear down.
        cmd.args([
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--new-session",
        ]);
        for dir in VISIBLE
            .iter()
            .map(PathBuf::from)
            .chain(self.extra_visible.iter().cloned())
        {
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(&dir) {
                        cmd.arg("--symlink").arg(target).arg(&dir);
                    }
                }
                Ok(m) if m.is_dir() => {
                    cmd.arg("--ro-bind").arg(&dir).arg(&dir);
                }
                _ => {}
            }
        }
        cmd.args(["--proc", "/proc", "--dev", "/dev"]);
        cmd.arg("--bind").arg(tmp).arg("/tmp");
        // bwrap makes missing parents 0700 (root's); the action must be able
        // to walk up to its root.
        cmd.args(["--perms", "0755", "--dir", SANDBOX_PARENT]);
        cmd.arg("--bind").arg(&spec.input_root).arg(SANDBOX_ROOT);
        if let Some(runas) = &self.runas {
            cmd.arg("--ro-bind").arg(runas).arg(RUNAS_PATH);
        }
        cmd.arg("--chdir")
            .arg(Path::new(SANDBOX_ROOT).join(&spec.working_directory));
        cmd.arg("--");
        match &self.runas {
            Some(_) => {
                cmd.arg(RUNAS_PATH)
                    .arg(self.uid.to_string())
                    .arg(self.gid.to_string());
            }
            None => {
                cmd.arg(&self.setpriv)
                    .arg(format!("--reuid={}", self.uid))
                    .arg(format!("--regid={}", self.gid))
                    .args(["--clear-groups", "--no-new-privs", "--"]);
            }
        }
        cmd.args(&spec.arguments);
        cmd
    }
}

#[derive(Debug, Default)]
pub struct HostRunner {
    sandbox: Option<Sandbox>,
}

impl HostRunner {
    /// Actions run in `sandbox`; None: unconfined, as the executor's user.
    pub fn new(sandbox: Option<Sandbox>) -> Self {
        HostRunner { sandbox }
    }
}

/// Resolves argv[0] the way REAPI says: a relative path with a slash is
/// relative to the working directory; a bare name is looked up on PATH.
fn program(arg0: &str, workdir: &Path) -> PathBuf {
    if arg0.contains('/') && !arg0.starts_with('/') {
        workdir.join(arg0)
    } else {
        arg0.into()
    }
}

fn kill_group(pid: u32) {
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

#[async_trait]
impl Runner for HostRunner {
    fn isolation_type(&self) -> &'static str {
        "none"
    }

    async fn run(&self, spec: &RunSpec, cancel: CancellationToken) -> ExecResult<RunOutcome> {
        let workdir = spec.input_root.join(&spec.working_directory);
        let arg0 = spec
            .arguments
            .first()
            .ok_or_else(|| ExecError::InvalidInput("Command.arguments is empty".into()))?;
        let stdout = std::fs::File::create(&spec.stdout_path)
            .ctx(|| format!("creating {}", spec.stdout_path.display()))?;
        let stderr = std::fs::File::create(&spec.stderr_path)
            .ctx(|| format!("creating {}", spec.stderr_path.display()))?;
        let mut cmd = match &self.sandbox {
            Some(sandbox) => {
                // The action's /tmp: beside its input root, so it goes with
                // the workspace and counts against the disk, not memory.
                let tmp = spec
                    .input_root
                    .parent()
                    .unwrap_or(&spec.input_root)
                    .join("tmp");
                std::fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
                std::os::unix::fs::chown(&tmp, Some(sandbox.uid), Some(sandbox.gid))
                    .ctx(|| format!("chown {}", tmp.display()))?;
                sandbox.command(spec, &tmp)
            }
            None => {
                let mut cmd = Command::new(program(arg0, &workdir));
                cmd.args(&spec.arguments[1..]).current_dir(&workdir);
                cmd
            }
        };
        cmd.env_clear()
            .envs(spec.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        // No pre_exec hook: without one std spawns with posix_spawn (vfork)
        // instead of fork, which costs milliseconds in a process this size.
        // The sandbox does not need one: bubblewrap's --die-with-parent
        // kills it, and so its PID namespace, when the executor dies.
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                // Like a shell: a command that can't be started exits 127 with a message.
                let msg = format!(
                    "hearth: cannot run {arg0:?} in {}: {e}\n",
                    spec.working_directory
                );
                std::fs::write(&spec.stderr_path, msg).ctx(|| "writing stderr".into())?;
                return Ok(RunOutcome {
                    exit_code: 127,
                    timed_out: false,
                });
            }
        };
        let pid = child.id().unwrap_or(0);
        let outcome = tokio::select! {
            status = child.wait() => {
                let status = status.ctx(|| format!("waiting for {arg0}"))?;
                let exit_code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                RunOutcome { exit_code, timed_out: false }
            }
            _ = tokio::time::sleep(spec.timeout) => {
                kill_group(pid);
                let _ = child.wait().await;
                RunOutcome { exit_code: 128 + 9, timed_out: true }
            }
            _ = cancel.cancelled() => {
                kill_group(pid);
                let _ = child.wait().await;
                return Err(ExecError::Cancelled);
            }
        };
        kill_group(pid);
        Ok(outcome)
    }
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
