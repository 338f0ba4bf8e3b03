//! PID 1 of a sandbox: builds the root once, then runs one action at a time
//! for the executor on its socket (stdin). For each action it binds the
//! workspace's input root and `/tmp`, starts the command as the action user
//! in a new session and IPC namespace, reaps whatever is reparented to it
//! while the command runs, and when the command exits (or the executor says
//! [`wire::KILL`]) kills every other process in the namespace and reaps it
//! before answering: nothing an action started outlives it, and nothing it
//! wrote is seen by the next one (its `/tmp` is its workspace's).
//!
//! The namespaces are made once per sandbox, not per action: creating and
//! tearing down a mount and PID namespace costs ~2.5 ms (bubblewrap's cost
//! per action, measured in docs/benchmarks.md), binding two directories a
//! few microseconds.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hearth_sandbox::wire::{self, Run};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{setgroups, setresgid, setresuid, setsid, Gid, Pid, Uid};

use crate::root;

/// Who actions run as.
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

struct Frame {
    kind: u8,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn send(sock: &mut UnixStream, kind: u8, payload: &[u8]) -> Result<(), String> {
    sock.write_all(&wire::frame(kind, payload))
        .map_err(|e| format!("writing to the executor: {e}"))
}

/// The next frame and the descriptors attached to it; None at end of file.
fn receive(sock: &mut UnixStream) -> Result<Option<Frame>, String> {
    let mut head = [0u8; wire::HEADER];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut head)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("reading from the executor: {e}"))?;
        let mut fds = Vec::new();
        for c in msg
            .cmsgs()
            .map_err(|e| format!("reading descriptors: {e}"))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if got == 0 {
        return Ok(None);
    }
    sock.read_exact(&mut head[got..])
        .map_err(|e| format!("reading a frame header: {e}"))?;
    let (kind, len) = wire::header(head)?;
    let mut payload = vec![0; len];
    sock.read_exact(&mut payload)
        .map_err(|e| format!("reading a frame: {e}"))?;
    Ok(Some(Frame { kind, payload, fds }))
}

/// Serves the executor until it closes the socket.
pub fn serve(sock: &mut UnixStream, visible: &[PathBuf], who: &Identity) -> Result<(), String> {
    let host = match root::build(visible) {
        Ok(host) => host,
        Err(e) => {
            let _ = send(sock, wire::FAILED, e.as_bytes());
            return Err(e);
        }
    };
    // SIGCHLD arrives on a descriptor polled beside the socket.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.thread_block()
        .map_err(|e| format!("blocking SIGCHLD: {e}"))?;
    let sigfd = SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("signalfd: {e}"))?;
    send(sock, wire::READY, &[])?;
    while let Some(frame) = receive(sock)? {
        match frame.kind {
            wire::RUN => {
                let run = Run::decode(&frame.payload)?;
                let [stdout, stderr]: [OwnedFd; 2] =
                    frame.fds.try_into().map_err(|fds: Vec<_>| {
                        format!("a run frame with {} descriptors, not 2", fds.len())
                    })?;
                match run_one(sock, &sigfd, &host, who, &run, stdout, stderr)? {
                    Ended::Exited(code) => send(sock, wire::EXITED, &code.to_le_bytes())?,
                    Ended::Killed(code) => {
                        send(sock, wire::EXITED, &code.to_le_bytes())?;
                        send(sock, wire::KILLED, &[])?;
                    }
                    Ended::ExecutorGone => return Ok(()),
                }
            }
            wire::KILL => send(sock, wire::KILLED, &[])?,
            other => return Err(format!("unknown frame kind {other:#x} from the executor")),
        }
    }
    Ok(())
}

enum Ended {
    Exited(i32),
    /// The executor said KILL while the action ran.
    Killed(i32),
    ExecutorGone,
}

fn code(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Kills every process in the namespace but this one, and reaps them all.
fn kill_all() {
    loop {
        // kill(-1) from PID 1 reaches every other process of its namespace;
        // a fork racing it is refused by the kernel, so one pass would do,
        // and the loop costs nothing once none is left.
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        match waitpid(Pid::from_raw(-1), None) {
            Err(Errno::ECHILD) => return,
            Err(Errno::EINTR) | Ok(_) => continue,
            Err(_) => return,
        }
    }
}

/// Binds the host directory `path` (absolute, without symlinks) at `target`.
fn bind(host: &OwnedFd, path: &[u8], target: &str) -> Result<(), String> {
    let rel = Path::new(std::ffi::OsStr::from_bytes(path));
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let fd = openat(
        Some(host.as_raw_fd()),
        rel,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening {}: {e}", rel.display()))?;
    // SAFETY: `openat` just returned it; owned here only.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(
        Some(source.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} at {target}: {e}", rel.display()))
}

fn unbind() {
    for target in [root::TMP, root::WORK_ROOT] {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
}

fn run_one(
    sock: &mut UnixStream,
    sigfd: &SignalFd,
    host: &OwnedFd,
    who: &Identity,
    run: &Run,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Ended, String> {
    let mounted =
        bind(host, &run.root, root::WORK_ROOT).and_then(|()| bind(host, &run.tmp, root::TMP));
    if let Err(e) = mounted {
        unbind();
        return Err(e);
    }
    let ended = supervise(sock, sigfd, who, run, stdout, stderr);
    kill_all();
    unbind();
    ended
}

fn supervise(
    sock: &mut UnixStream,
    sigfd: &SignalFd,
    who: &Identity,
    run: &Run,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Ended, String> {
    let os = |b: &Vec<u8>| std::ffi::OsStr::from_bytes(b).to_owned();
    let cwd = Path::new(root::WORK_ROOT).join(std::ffi::OsStr::from_bytes(&run.cwd));
    let mut cmd = Command::new(os(&run.argv[0]));
    cmd.args(run.argv[1..].iter().map(os))
        .current_dir(&cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(
            stderr.try_clone().map_err(|e| format!("dup: {e}"))?,
        ));
    for pair in &run.env {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (&pair[..], &[][..]),
        };
        cmd.env(
            std::ffi::OsStr::from_bytes(k),
            std::ffi::OsStr::from_bytes(v),
        );
    }
    let (uid, gid) = (Uid::from_raw(who.uid), Gid::from_raw(who.gid));
    // SAFETY: this process is single-threaded, so the forked child may do
    // anything before exec; these are plain system calls.
    unsafe {
        cmd.pre_exec(move || {
            SigSet::empty().thread_set_mask()?;
            setsid()?;
            // No SysV objects shared with the host, or left for the next action.
            unshare(CloneFlags::CLONE_NEWIPC)?;
            setgroups(&[])?;
            setresgid(gid, gid, gid)?;
            setresuid(uid, uid, uid)?;
            nix::sys::prctl::set_no_new_privs()?;
            if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
                return Err(std::io::Error::other("root could be regained"));
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            // Like a shell: a command that cannot be started exits 127
            // (not found) or 126, with a message.
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let msg = format!(
                "hearth: cannot run {:?} in {}: {e}\n",
                String::from_utf8_lossy(&run.argv[0]),
                String::from_utf8_lossy(&run.cwd),
            );
            let _ = std::fs::File::from(stderr).write_all(msg.as_bytes());
            return Ok(Ended::Exited(code));
        }
    };
    drop(stderr);
    let mut killed = false;
    loop {
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let sock_ready = fds[0].any().unwrap_or(false);
        while let Ok(Some(_)) = sigfd.read_signal() {}
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some((pid, code)) = code(status) {
                        if pid == child {
                            return Ok(if killed {
                                Ended::Killed(code)
                            } else {
                                Ended::Exited(code)
                            });
                        }
                    }
                }
            }
        }
        if sock_ready {
            match receive(sock)? {
                None => return Ok(Ended::ExecutorGone),
                Some(f) if f.kind == wire::KILL => {
                    killed = true;
                    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
                }
                Some(f) => {
                    return Err(format!(
                        "frame kind {:#x} from the executor while an action runs",
                        f.kind
                    ))
                }
            }
        }
    }
}
