//! `workload-isolation-type=none`: the command runs on the executor host.
//!
//! With a [`Sandbox`] (the default) it runs in one of the executor's
//! long-lived sandboxes (`sandbox.rs`): as an unprivileged user that owns
//! only the workspace's directories, never the input files (the store's,
//! read-only), in a mount namespace with only `/usr`, `/bin`, `/lib*` and
//! `/etc` of the host (read-only), a private `/proc`, `/dev` and `/tmp`, and
//! its own input root at [`SANDBOX_ROOT`] (the server's data directory, the
//! executor's work directory and other actions' workspaces do not exist
//! there), and in a PID namespace whose PID 1 kills and reaps every process
//! the action started before it reports the exit code (`setsid` and double
//! forks included), and dies with the executor.
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
pub use crate::sandbox::{Sandbox, SANDBOX_ROOT};

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
        if let Some(sandbox) = &self.sandbox {
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
            return sandbox
                .run(
                    &spec.input_root,
                    &tmp,
                    &spec.working_directory,
                    &spec.arguments,
                    &spec.environment,
                    stdout,
                    stderr,
                    spec.timeout,
                    cancel,
                )
                .await;
        }
        let mut cmd = Command::new(program(arg0, &workdir));
        cmd.args(&spec.arguments[1..]).current_dir(&workdir);
        cmd.env_clear()
            .envs(spec.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        // No pre_exec hook: without one std spawns with posix_spawn (vfork)
        // instead of fork, which costs milliseconds in a process this size.
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                // Like a shell: a command that can't be started exits 127 with a message.
                let msg = format!(
                    "hearth: cannot run {arg0:?} in {}: {e}\n",
                    spec.working_directory
                );
                std::fs::write(&spec.stderr_path, msg).ctx(|| "writing stderr".into())?;
                return Ok(RunOutcome::exited(127));
            }
        };
        let pid = child.id().unwrap_or(0);
        let outcome = tokio::select! {
            status = child.wait() => {
                let status = status.ctx(|| format!("waiting for {arg0}"))?;
                let exit_code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                RunOutcome::exited(exit_code)
            }
            _ = tokio::time::sleep(spec.timeout) => {
                kill_group(pid);
                let _ = child.wait().await;
                RunOutcome::timed_out(128 + 9)
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
