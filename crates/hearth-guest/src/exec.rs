//! Running commands as PID 1: a reaper thread collects every child that
//! exits (our commands and orphans alike) with wait4, and hands the status
//! of the ones we started to whoever waits for them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::protocol::{ExecRequest, ExitStatus};

#[derive(Default)]
struct Exits {
    done: HashMap<i32, ExitStatus>,
}

fn exits() -> &'static (Mutex<Exits>, Condvar) {
    static EXITS: OnceLock<(Mutex<Exits>, Condvar)> = OnceLock::new();
    EXITS.get_or_init(Default::default)
}

/// Starts the reaper. Exits of pids nobody waits for are dropped after a while.
pub fn spawn_reaper() {
    std::thread::spawn(|| loop {
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to locals.
        let pid = unsafe { libc::wait4(-1, &mut status, 0, &mut usage) };
        if pid <= 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        let exit = ExitStatus {
            exit_code: if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            },
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            user_micros: usage.ru_utime.tv_sec as u64 * 1_000_000 + usage.ru_utime.tv_usec as u64,
            system_micros: usage.ru_stime.tv_sec as u64 * 1_000_000 + usage.ru_stime.tv_usec as u64,
            max_rss_kib: usage.ru_maxrss as u64,
            timed_out: false,
        };
        let (lock, cv) = exits();
        let mut e = lock.lock().unwrap_or_else(|p| p.into_inner());
        if e.done.len() > 10_000 {
            e.done.clear();
        }
        e.done.insert(pid, exit);
        cv.notify_all();
    });
}

/// The exit status of `pid` if the reaper has collected it.
pub fn try_exit(pid: i32) -> Option<ExitStatus> {
    let (lock, _) = exits();
    lock.lock()
        .unwrap_or_else(|p| p.into_inner())
        .done
        .remove(&pid)
}

/// Waits for `pid` to exit; past `deadline`, kills its process group (the
/// command and whatever it started that kept the group) and reports a
/// timeout once it is gone.
fn wait_for(pid: i32, deadline: Option<Instant>) -> ExitStatus {
    let (lock, cv) = exits();
    let mut e = lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut timed_out = false;
    loop {
        if let Some(s) = e.done.remove(&pid) {
            return ExitStatus { timed_out, ..s };
        }
        match deadline.filter(|_| !timed_out) {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    // SAFETY: signalling our own child's process group.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                        libc::kill(pid, libc::SIGKILL);
                    }
                    timed_out = true;
                    continue;
                }
                e = cv
                    .wait_timeout(e, d - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            None => e = cv.wait(e).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// Where the workspace disk is mounted.
const WORKSPACE: &str = "/work";

/// `chown -R` without following symlinks.
fn chown_tree(path: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Runs a command to completion.
pub fn run(req: &ExecRequest) -> Result<ExitStatus, String> {
    let program = req.args.first().ok_or("no arguments")?;
    let deadline = req
        .timeout_millis
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let stdout =
        File::create(&req.stdout_path).map_err(|e| format!("creating {}: {e}", req.stdout_path))?;
    let stderr =
        File::create(&req.stderr_path).map_err(|e| format!("creating {}: {e}", req.stderr_path))?;
    let program = if program.contains('/') && !program.starts_with('/') {
        format!("{}/{program}", req.cwd)
    } else {
        program.clone()
    };
    let mut cmd = Command::new(&program);
    cmd.args(&req.args[1..])
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&req.cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    if let Some(spec) = &req.user {
        let (uid, gid) = crate::user::resolve(spec)?;
        // The workspace must be the user's to write outputs into.
        if req.cwd.starts_with(WORKSPACE) {
            chown_tree(std::path::Path::new(WORKSPACE), uid, gid)
                .map_err(|e| format!("giving {WORKSPACE} to {spec}: {e}"))?;
        }
        // std drops supplementary groups when a root parent changes uid.
        cmd.uid(uid).gid(gid);
    }
    match cmd.spawn() {
        Ok(child) => {
            let pid = child.id() as i32;
            // The reaper owns waiting; forget the handle without waiting.
            std::mem::forget(child);
            Ok(wait_for(pid, deadline))
        }
        Err(e) => {
            let msg = format!("hearth-guest: cannot run {program:?} in {}: {e}\n", req.cwd);
            let _ = std::fs::write(&req.stderr_path, msg);
            Ok(ExitStatus {
                exit_code: 127,
                ..Default::default()
            })
        }
    }
}
