//! Reaping children as PID 1: one reaper thread collects every child that
//! exits (the commands we start and the orphans the kernel hands us) with
//! wait4, for its resource usage, and keeps the statuses of the ones we
//! started for whoever holds their [`Child`].
//!
//! The reaper must never take a child that std is waiting for. When exec
//! fails after fork (a missing program, or any command with a uid set,
//! which makes std fork and exec itself instead of using posix_spawn),
//! `Command::spawn` reads the errno from a pipe and then calls waitpid on
//! the failed child itself; had the reaper collected it first, std panics
//! ("wait() should either return Ok or panic"), and PID 1 with it. glibc's
//! posix_spawn waits for a failed child in the same way. So [`spawn`] holds
//! `SPAWN` around `Command::spawn`, and the reaper only peeks at exited
//! children (waitid with WNOWAIT) until it holds `SPAWN` too. While it holds
//! it no spawn is under way, so every zombie is the reaper's to take; a
//! zombie it peeked at that std collected meanwhile is simply gone, and the
//! peek blocks again rather than spinning.
//!
//! Not pidfds: std only offers them unstable, and the orphans the kernel
//! reparents to PID 1 come without one, so a wait for any child would still
//! be needed for them.
//!
//! Only statuses someone can ask for are kept: [`spawn`] registers the pid
//! under `SPAWN`, before the reaper can collect it, and dropping the
//! [`Child`] forgets it. Exits of orphans are dropped as they are collected.
//! The table thus holds one entry per live [`Child`] and needs no eviction.

use std::collections::BTreeMap;
use std::io;
use std::process::Command;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::protocol::ExitStatus;

/// Held around `Command::spawn` and the registration of its pid, and by the
/// reaper while it reaps.
static SPAWN: Mutex<()> = Mutex::new(());
/// Tells a reaper that has no children that [`spawn`] started one.
static SPAWNED: Condvar = Condvar::new();
static EXITS: Mutex<Exits> = Mutex::new(Exits::new());
/// Tells the holders of [`Child`]ren that a status was recorded.
static EXITED: Condvar = Condvar::new();
/// Whether the reaper thread is running.
static STARTED: Mutex<bool> = Mutex::new(false);

/// Locks `m` even if a thread panicked holding it: PID 1 must go on reaping,
/// and every update under these locks is a single insert or remove.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The exit statuses kept for live [`Child`] handles, each under a key of its
/// own rather than its pid: once a child is reaped the kernel may give its
/// pid to another process while the handle still holds the status.
#[derive(Debug, Default)]
struct Exits {
    /// Watched pids not reaped yet (so not reusable), and their keys.
    running: BTreeMap<i32, u64>,
    /// Every watched child by key: None until it is reaped.
    statuses: BTreeMap<u64, Option<ExitStatus>>,
    next_key: u64,
}

impl Exits {
    const fn new() -> Exits {
        Exits {
            running: BTreeMap::new(),
            statuses: BTreeMap::new(),
            next_key: 0,
        }
    }

    /// Starts keeping the exit status of `pid`, which must not have been
    /// reaped yet; returns its key.
    fn watch(&mut self, pid: i32) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        self.running.insert(pid, key);
        self.statuses.insert(key, None);
        key
    }

    /// Records that `pid` was reaped; returns whether someone watches it.
    fn record(&mut self, pid: i32, status: ExitStatus) -> bool {
        match self.running.remove(&pid) {
            Some(key) => {
                self.statuses.insert(key, Some(status));
                true
            }
            None => false,
        }
    }

    fn exit(&self, key: u64) -> Option<&ExitStatus> {
        self.statuses.get(&key).and_then(Option::as_ref)
    }

    /// Stops keeping the status of the child watched as `key`.
    fn unwatch(&mut self, pid: i32, key: u64) {
        self.statuses.remove(&key);
        if self.running.get(&pid) == Some(&key) {
            self.running.remove(&pid);
        }
    }
}

/// A child started by [`spawn`]. Its exit status is kept until this handle is
/// dropped; dropping it neither waits for the child nor kills it.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    key: u64,
}

impl Child {
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// The exit status, if the child has exited and been reaped.
    pub fn try_exit(&self) -> Option<ExitStatus> {
        lock(&EXITS).exit(self.key).cloned()
    }

    /// Waits for the child to exit.
    pub fn wait(&self) -> ExitStatus {
        let mut exits = lock(&EXITS);
        loop {
            if let Some(s) = exits.exit(self.key) {
                return s.clone();
            }
            exits = EXITED.wait(exits).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Waits for the child to exit until `deadline`; None if it still runs.
    pub fn wait_until(&self, deadline: Instant) -> Option<ExitStatus> {
        let mut exits = lock(&EXITS);
        loop {
            if let Some(s) = exits.exit(self.key) {
                return Some(s.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            exits = EXITED
                .wait_timeout(exits, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Sends SIGKILL to the child, and to its process group when `group`,
    /// unless it has been reaped. The reaper reaps and records under the
    /// spawn lock, so while we hold it an unrecorded child is still a zombie
    /// at worst, and its pid cannot be another process's.
    pub fn kill(&self, group: bool) {
        let _no_reaping = lock(&SPAWN);
        if self.try_exit().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own child (and its group), not yet reaped.
        unsafe {
            if group {
                libc::kill(-self.pid, libc::SIGKILL);
            }
            libc::kill(self.pid, libc::SIGKILL);
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        lock(&EXITS).unwatch(self.pid, self.key);
    }
}

/// Starts `cmd`, whose exit the reaper (started here if need be) collects.
/// Every child of the agent must be started this way: see the module notes.
pub fn spawn(cmd: &mut Command) -> io::Result<Child> {
    start()?;
    let _spawning = lock(&SPAWN);
    let child = cmd.spawn()?;
    // Pids are positive and below pid_max (at most 2^22).
    let pid = child.id() as i32;
    let key = lock(&EXITS).watch(pid);
    SPAWNED.notify_all();
    // std's handle neither waits nor kills on drop (it only closes any
    // pipes it holds); the reaper collects the child.
    drop(child);
    Ok(Child { pid, key })
}

/// Starts the reaper thread unless it runs already.
pub fn start() -> io::Result<()> {
    let mut started = lock(&STARTED);
    if !*started {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
            .map_err(|e| io::Error::new(e.kind(), format!("starting the reaper thread: {e}")))?;
        *started = true;
    }
    Ok(())
}

fn reap_forever() {
    loop {
        let result = match peek(0) {
            Ok(true) => reap_exited(),
            Ok(false) => {
                await_child();
                Ok(())
            }
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                // Nothing we can fix from here; don't spin on it.
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {}
        }
    }
}

/// Whether we have children, without reaping any: with `options` 0, blocks
/// until one has exited; with WNOHANG, returns at once.
fn peek(options: libc::c_int) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a local.
    let ret = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | options,
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ECHILD) => Ok(false),
        _ => Err(e),
    }
}

/// With no children, waits until [`spawn`] starts one. Checked under the
/// spawn lock, so that a start cannot slip in between the check and the
/// wait; the timeout is only a safety net.
fn await_child() {
    let spawn = lock(&SPAWN);
    if !matches!(peek(libc::WNOHANG), Ok(false)) {
        return;
    }
    let _ = SPAWNED.wait_timeout(spawn, Duration::from_secs(1));
}

/// Reaps every child that has exited, holding the spawn lock so that no std
/// code is waiting for any of them.
fn reap_exited() -> io::Result<()> {
    let _no_spawn = lock(&SPAWN);
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to locals.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
        if pid > 0 {
            if lock(&EXITS).record(pid, exit_status(status, &usage)) {
                EXITED.notify_all();
            }
            continue;
        }
        if pid == 0 {
            // Children left, none exited: the one we peeked at was a failed
            // exec that std collected.
            return Ok(());
        }
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ECHILD) => Ok(()),
            _ => Err(e),
        };
    }
}

fn exit_status(status: libc::c_int, usage: &libc::rusage) -> ExitStatus {
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    ExitStatus {
        exit_code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        },
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        user_micros: micros(usage.ru_utime),
        system_micros: micros(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
        timed_out: false,
    }
}

#[cfg(test)]
#[path = "reap_tests.rs"]
mod tests;
