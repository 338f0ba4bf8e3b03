//! The host sandbox as the executor drives it: a pool of long-lived
//! `hearth-sandbox` processes (crate `hearth-sandbox`), each the parent of a
//! PID 1 in mount and PID namespaces of its own that runs one action at a
//! time. An action borrows an idle sandbox (or starts one, ~3 ms), sends it
//! the workspace's paths, arguments, environment and output descriptors,
//! and waits for the exit code, which comes only once every process the
//! action started is gone. On timeout or cancellation it says KILL and
//! waits for the answer the same way; a sandbox that breaks the protocol or
//! does not answer a KILL in time is killed whole and not reused.
//!
//! Written here rather than run through bubblewrap per action: bubblewrap
//! makes and tears down its namespaces and mounts on every call (~2.7 ms of
//! a ~5.5 ms no-op action, docs/benchmarks.md); here that happens once per
//! sandbox and an action costs two bind mounts.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_sandbox::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::error::{ExecError, ExecResult};
use crate::runner::RunOutcome;

/// Host directories visible (read-only) inside the sandbox, when they exist.
/// A symlink (a merged-/usr `/bin`) is recreated as the same symlink.
const VISIBLE: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// Where a sandboxed action finds its input root: one fixed path, as in a
/// microVM, whatever the executor's work directory is (so outputs that
/// embed the working directory are the same on every executor).
pub const SANDBOX_ROOT: &str = "/work/root";

/// How long a sandbox may take to start, and to answer a KILL.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How host actions are confined: who they run as, what they see, and the
/// idle sandboxes kept for the next action. Clones share the pool.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub uid: u32,
    pub gid: u32,
    binary: PathBuf,
    visible: Vec<PathBuf>,
    idle: Arc<Mutex<Vec<Cell>>>,
}

impl Sandbox {
    /// A sandbox that runs actions as `user` through the `hearth-sandbox`
    /// binary, showing `extra_visible` host paths read-only besides the
    /// system's. Fails, saying what is missing, if it cannot work here.
    pub fn for_user(
        user: &str,
        extra_visible: Vec<PathBuf>,
        binary: PathBuf,
    ) -> Result<Sandbox, String> {
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
        if u.uid.is_root() || u.gid.as_raw() == 0 {
            return Err(format!(
                "--run-as user {user:?} is root or in group root; it must be unprivileged"
            ));
        }
        let mut visible: Vec<PathBuf> = VISIBLE.iter().map(PathBuf::from).collect();
        for p in extra_visible {
            // The sandbox resolves these in a root of its own: no symlinks.
            visible.push(
                std::fs::canonicalize(&p)
                    .map_err(|e| format!("--sandbox-visible {}: {e}", p.display()))?,
            );
        }
        Ok(Sandbox {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            binary,
            visible,
            idle: Arc::default(),
        })
    }

    /// Starts one sandbox and keeps it idle: proves the sandbox works on
    /// this host (the error says why not) before any action needs it.
    pub async fn check(&self) -> Result<(), String> {
        let cell = Cell::start(self).await.map_err(|e| e.to_string())?;
        self.put_back(cell);
        Ok(())
    }

    /// An idle sandbox that is still alive (its PID 1 may have been
    /// killed while it waited, e.g. by the OOM killer).
    fn take(&self) -> Option<Cell> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut cell) = idle.pop() {
            if matches!(cell.child.try_wait(), Ok(None)) {
                return Some(cell);
            }
        }
        None
    }

    /// Hands `run` to an idle sandbox, or to a new one if there is none or
    /// the idle one turns out to be dead when written to.
    async fn send_run(&self, run: &wire::Run, fds: &[OwnedFd; 2]) -> ExecResult<Cell> {
        let frame = wire::frame(wire::RUN, &run.encode());
        if let Some(mut cell) = self.take() {
            if cell.send(&frame, fds).await.is_ok() {
                return Ok(cell);
            }
        }
        let mut cell = Cell::start(self).await?;
        cell.send(&frame, fds).await?;
        Ok(cell)
    }

    fn put_back(&self, cell: Cell) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cell);
    }

    /// Runs one action: `root` is its input root, `tmp` its `/tmp`, `cwd`
    /// its working directory relative to the root.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run(
        &self,
        root: &Path,
        tmp: &Path,
        cwd: &str,
        arguments: &[String],
        environment: &[(String, String)],
        stdout: std::fs::File,
        stderr: std::fs::File,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> ExecResult<RunOutcome> {
        let canonical = |p: &Path| {
            std::fs::canonicalize(p)
                .map_err(|e| ExecError::io(format!("resolving {}", p.display()), e))
        };
        let run = wire::Run {
            root: canonical(root)?.as_os_str().as_bytes().to_vec(),
            tmp: canonical(tmp)?.as_os_str().as_bytes().to_vec(),
            cwd: cwd.as_bytes().to_vec(),
            argv: arguments.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: environment
                .iter()
                .map(|(k, v)| format!("{k}={v}").into_bytes())
                .collect(),
        };
        let fds: [OwnedFd; 2] = [stdout.into(), stderr.into()];
        let mut cell = self.send_run(&run, &fds).await?;
        drop(fds);
        let ended = cell.wait(timeout, cancel).await;
        match ended {
            Ok(Ended::Done(outcome)) => {
                self.put_back(cell);
                Ok(outcome)
            }
            Ok(Ended::Cancelled) => {
                self.put_back(cell);
                Err(ExecError::Cancelled)
            }
            // `cell` is dropped, which kills it.
            Err(e) => Err(e),
        }
    }
}

enum Ended {
    Done(RunOutcome),
    Cancelled,
}

/// One sandbox process and the socket to its PID 1.
#[derive(Debug)]
struct Cell {
    child: Child,
    sock: UnixStream,
    /// Bytes read from the socket and not yet taken as a frame.
    buf: Vec<u8>,
}

fn broken(what: impl std::fmt::Display) -> ExecError {
    ExecError::Internal(format!("the host sandbox: {what}"))
}

impl Cell {
    async fn start(sandbox: &Sandbox) -> ExecResult<Cell> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| ExecError::io("making the sandbox's socket", e))?;
        ours.set_nonblocking(true)
            .map_err(|e| ExecError::io("making the sandbox's socket", e))?;
        let mut cmd = Command::new(&sandbox.binary);
        cmd.arg(sandbox.uid.to_string())
            .arg(sandbox.gid.to_string())
            .args(&sandbox.visible)
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| ExecError::io(format!("starting {}", sandbox.binary.display()), e))?;
        let sock =
            UnixStream::from_std(ours).map_err(|e| ExecError::io("the sandbox's socket", e))?;
        let mut cell = Cell {
            child,
            sock,
            buf: Vec::new(),
        };
        let first = tokio::time::timeout(START_TIMEOUT, cell.frame())
            .await
            .map_err(|_| broken(format!("not ready after {START_TIMEOUT:?}")))??;
        match first {
            (wire::READY, _) => Ok(cell),
            (wire::FAILED, why) => Err(broken(format!(
                "setting up failed: {}",
                String::from_utf8_lossy(&why)
            ))),
            (kind, _) => Err(broken(format!("frame {kind:#x} instead of ready"))),
        }
    }

    /// The next frame. Cancel-safe: bytes read stay in `buf`.
    async fn frame(&mut self) -> ExecResult<(u8, Vec<u8>)> {
        loop {
            if let Some(whole) = wire::split(&self.buf).map_err(broken)? {
                let (kind, payload, len) = (whole.kind, whole.payload.to_vec(), whole.len);
                self.buf.drain(..len);
                return Ok((kind, payload));
            }
            let n = self
                .sock
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| broken(format!("reading: {e}")))?;
            if n == 0 {
                let status = self.child.try_wait().ok().flatten();
                return Err(broken(match status {
                    Some(s) => format!("it exited ({s})"),
                    None => "it closed its socket".into(),
                }));
            }
        }
    }

    /// Sends a frame with descriptors attached to its first bytes.
    async fn send(&mut self, bytes: &[u8], fds: &[OwnedFd]) -> ExecResult<()> {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        if !raw.is_empty() {
            sent = loop {
                self.sock
                    .writable()
                    .await
                    .map_err(|e| broken(format!("writing: {e}")))?;
                let fd = self.sock.as_raw_fd();
                let r = self.sock.try_io(Interest::WRITABLE, || {
                    nix::sys::socket::sendmsg::<()>(
                        fd,
                        &[std::io::IoSlice::new(bytes)],
                        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
                        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(std::io::Error::from)
                });
                match r {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(broken(format!("writing: {e}"))),
                }
            };
        }
        self.sock
            .write_all(&bytes[sent..])
            .await
            .map_err(|e| broken(format!("writing: {e}")))
    }

    /// Waits for the action sent to end, saying KILL on timeout or
    /// cancellation.
    async fn wait(&mut self, timeout: Duration, cancel: CancellationToken) -> ExecResult<Ended> {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        // Why we said KILL, if we did.
        let mut killing: Option<Ended> = None;
        let mut exit_code = None;
        let kill_deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(kill_deadline);
        loop {
            tokio::select! {
                frame = self.frame() => match frame? {
                    (wire::EXITED, code) => {
                        exit_code = Some(wire::exit_code(&code).map_err(broken)?);
                        if killing.is_none() {
                            break;
                        }
                    }
                    (wire::KILLED, _) if killing.is_some() => break,
                    (kind, _) => return Err(broken(format!("unexpected frame {kind:#x}"))),
                },
                _ = &mut deadline, if killing.is_none() => {
                    killing = Some(Ended::Done(RunOutcome::timed_out(128 + 9)));
                    self.send(&wire::frame(wire::KILL, &[]), &[]).await?;
                    kill_deadline.as_mut().reset(tokio::time::Instant::now() + KILL_TIMEOUT);
                }
                _ = cancel.cancelled(), if killing.is_none() => {
                    killing = Some(Ended::Cancelled);
                    self.send(&wire::frame(wire::KILL, &[]), &[]).await?;
                    kill_deadline.as_mut().reset(tokio::time::Instant::now() + KILL_TIMEOUT);
                }
                _ = &mut kill_deadline => {
                    return Err(broken(format!("no answer to KILL after {KILL_TIMEOUT:?}")));
                }
            }
        }
        Ok(match killing {
            Some(ended) => ended,
            None => Ended::Done(RunOutcome::exited(exit_code.unwrap_or(128 + 9))),
        })
    }
}

#[cfg(test)]
#[path = "sandbox_tests.rs"]
mod tests;
