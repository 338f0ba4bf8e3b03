//! `workload-isolation-type=none`: the command runs on the executor host in
//! its own process group, which is killed whole on timeout, on cancellation
//! and after the command exits (so no stray background process outlives it).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::error::{ExecError, ExecResult, IoContext};
use crate::runner::{RunOutcome, RunSpec, Runner};

#[derive(Debug, Default)]
pub struct HostRunner;

/// Resolves argv[0] the way REAPI says: a relative path with a slash is
/// relative to the working directory; a bare name is looked up on PATH.
fn program(arg0: &str, workdir: &Path) -> std::path::PathBuf {
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
        let mut cmd = Command::new(program(arg0, &workdir));
        cmd.args(&spec.arguments[1..])
            .env_clear()
            .envs(spec.environment.iter().map(|(k, v)| (k, v)))
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
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
mod tests {
    use super::*;
    use hearth_scheduler::Platform;
    use std::time::{Duration, Instant};

    fn spec(dir: &Path, args: &[&str], timeout: Duration) -> RunSpec {
        RunSpec {
            instance_name: String::new(),
            input_root: dir.to_path_buf(),
            working_directory: String::new(),
            arguments: args.iter().map(|s| s.to_string()).collect(),
            environment: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("X".into(), "42".into()),
            ],
            timeout,
            stdout_path: dir.join("stdout"),
            stderr_path: dir.join("stderr"),
            platform: Platform::default(),
        }
    }

    #[tokio::test]
    async fn runs_with_env_and_captures_output() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(
            dir.path(),
            &["sh", "-c", "echo out $X; echo err >&2; exit 3"],
            Duration::from_secs(10),
        );
        let out = HostRunner.run(&s, CancellationToken::new()).await.unwrap();
        assert_eq!(
            out,
            RunOutcome {
                exit_code: 3,
                timed_out: false
            }
        );
        assert_eq!(std::fs::read_to_string(&s.stdout_path).unwrap(), "out 42\n");
        assert_eq!(std::fs::read_to_string(&s.stderr_path).unwrap(), "err\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survivor");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let s = spec(
            dir.path(),
            &["sh", "-c", &script],
            Duration::from_millis(300),
        );
        let t = Instant::now();
        let out = HostRunner.run(&s, CancellationToken::new()).await.unwrap();
        assert!(out.timed_out);
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !marker.exists(),
            "the background child was killed with its group"
        );
    }

    #[tokio::test]
    async fn missing_program_exits_127_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path(), &["./no-such-tool"], Duration::from_secs(5));
        let out = HostRunner.run(&s, CancellationToken::new()).await.unwrap();
        assert_eq!(out.exit_code, 127);
        assert!(std::fs::read_to_string(&s.stderr_path)
            .unwrap()
            .contains("no-such-tool"));
    }
}
