//! `hearth-sandbox UID GID [VISIBLE…]`, started by the executor (as root)
//! with a Unix stream socket as stdin: a long-lived sandbox for host
//! actions. It makes a PID namespace whose PID 1 builds a root of its own
//! (the VISIBLE host paths read-only, private `/proc`, `/dev` and `/tmp`)
//! and then runs the actions the executor sends, one at a time, as UID:GID.
//! See `init.rs` for what each action gets, and `hearth_sandbox::wire` for
//! the frames.
//!
//! The first process only waits for PID 1 (a PID namespace's first child
//! is its PID 1). Both die with the executor: by `PR_SET_PDEATHSIG`, and PID 1
//! also when the socket closes.

mod init;
mod root;

use std::ffi::OsString;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sched::{unshare, CloneFlags};
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

fn die(message: &str) -> ! {
    eprintln!("hearth-sandbox: {message}");
    std::process::exit(126)
}

fn id(arg: Option<&OsString>, what: &str) -> u32 {
    arg.and_then(|a| a.to_str())
        .and_then(|s| s.parse().ok())
        .filter(|&n| n != 0)
        .unwrap_or_else(|| {
            die(&format!(
                "usage: hearth-sandbox UID GID [VISIBLE…] ({what} must be a non-root id)"
            ))
        })
}

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let who = init::Identity {
        uid: id(args.get(1), "UID"),
        gid: id(args.get(2), "GID"),
    };
    let visible: Vec<PathBuf> = args.iter().skip(3).map(PathBuf::from).collect();
    if !nix::unistd::geteuid().is_root() {
        die("the sandbox must be started as root");
    }
    if let Err(e) = set_pdeathsig(Signal::SIGKILL) {
        die(&format!("PR_SET_PDEATHSIG: {e}"));
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
        die(&format!("unsharing the PID namespace: {e}"));
    }
    // SAFETY: single-threaded here; the child continues with plain code.
    match unsafe { fork() } {
        Err(e) => die(&format!("fork: {e}")),
        Ok(ForkResult::Parent { child }) => {
            // The socket is PID 1's alone: when PID 1 goes, the executor
            // reads end of file.
            // SAFETY: fd 0 is ours and not used again in this process.
            drop(unsafe { std::fs::File::from_raw_fd(0) });
            let code = match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => code,
                Ok(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
                _ => 126,
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Child) => {
            if let Err(e) = set_pdeathsig(Signal::SIGKILL) {
                die(&format!("PR_SET_PDEATHSIG: {e}"));
            }
            // SAFETY: fd 0 is the executor's socket, handed to us at spawn.
            let mut sock = unsafe { UnixStream::from_raw_fd(0) };
            if let Err(e) = init::serve(&mut sock, &visible, &who) {
                die(&e);
            }
        }
    }
}
