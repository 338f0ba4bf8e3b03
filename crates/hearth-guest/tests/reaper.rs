//! The agent's reaper and `exec::run`, driven as an ordinary process. This is
//! its own test binary because the reaper waits for every child of the
//! process; the tests here run in parallel on purpose, to keep it busy.
//!
//! The process makes itself a child subreaper, so that orphans come back to
//! it as they would to PID 1 inside the VM.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use hearth_guest::protocol::{ExecRequest, ExitStatus};
use hearth_guest::{exec, reap};

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(
            ret,
            0,
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
        reap::start().expect("starting the reaper");
    });
}

/// The current uid:gid: a user spec that works without root, and that makes
/// std fork and exec itself (rather than posix_spawn), the path on which it
/// waits for a child whose exec failed.
fn me() -> String {
    // SAFETY: getuid and getgid cannot fail.
    unsafe { format!("{}:{}", libc::getuid(), libc::getgid()) }
}

fn request(dir: &Path, args: &[&str], user: Option<String>) -> ExecRequest {
    // exec::run gives /work (the VM's workspace) to the user when cwd is
    // beneath it; on the host that would be someone else's directory.
    assert!(
        !dir.starts_with("/work"),
        "test directory {dir:?} is under /work"
    );
    ExecRequest {
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: dir.display().to_string(),
        user,
        stdout_path: dir.join("stdout").display().to_string(),
        stderr_path: dir.join("stderr").display().to_string(),
        clock_unix_nanos: None,
        timeout_millis: None,
    }
}

fn run(req: &ExecRequest) -> ExitStatus {
    exec::run(req).unwrap_or_else(|e| panic!("running {:?}: {e}", req.args))
}

/// Runs `true` over and over on another thread until dropped, so that the
/// reaper always has children to collect.
struct Busy {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start() -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let dir = tempfile::tempdir().expect("tempdir");
            let req = request(dir.path(), &["true"], None);
            while !flag.load(Ordering::Relaxed) {
                assert_eq!(run(&req).exit_code, 0);
            }
        });
        Busy {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let ok = t.join().is_ok();
            if !std::thread::panicking() {
                assert!(ok, "the busy thread panicked");
            }
        }
    }
}

#[test]
fn command_not_found_as_a_user_is_exit_127_every_time() {
    setup();
    let _busy = Busy::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let req = request(dir.path(), &["hearth-no-such-command"], Some(me()));
    for i in 0..200 {
        let status = run(&req);
        assert_eq!(status.exit_code, 127, "attempt {i}: {status:?}");
        let stderr = std::fs::read_to_string(&req.stderr_path).expect("reading stderr");
        assert!(
            stderr.contains("cannot run \"hearth-no-such-command\""),
            "attempt {i}: stderr {stderr:?}"
        );
    }
}

#[test]
fn many_short_commands_each_get_their_own_status() {
    setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = request(dir.path(), &["true"], None);
    let fail = request(dir.path(), &["false"], None);
    for i in 0..500 {
        let (req, want) = if i % 7 == 3 { (&fail, 1) } else { (&ok, 0) };
        assert_eq!(run(req).exit_code, want, "command {i}: {:?}", req.args);
    }
    // A spread of codes, as a user too (std's fork and exec path).
    for code in 0..40 {
        let script = format!("exit {code}");
        let req = request(dir.path(), &["sh", "-c", &script], Some(me()));
        assert_eq!(run(&req).exit_code, code);
    }
}

#[test]
fn an_orphan_neither_delays_its_parent_nor_disturbs_the_next_command() {
    setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("orphan.pid");
    let script = format!(
        "(sleep 1; exit 3) & echo $! > {}; exit 5",
        pidfile.display()
    );
    let started = Instant::now();
    let status = run(&request(dir.path(), &["sh", "-c", &script], None));
    assert_eq!(status.exit_code, 5);
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "waited {:?}, as if for the orphan",
        started.elapsed()
    );
    let orphan: i32 = std::fs::read_to_string(&pidfile)
        .expect("reading the orphan's pid")
        .trim()
        .parse()
        .expect("the orphan's pid");
    // The orphan exits (3) while this runs; it must not be taken for it.
    let next = run(&request(
        dir.path(),
        &["sh", "-c", "sleep 1.5; exit 7"],
        None,
    ));
    assert_eq!(next.exit_code, 7);
    // Collected, not left a zombie: its /proc entry goes once it is reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{orphan}")).exists() {
        assert!(
            Instant::now() < deadline,
            "orphan {orphan} was never reaped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_timeout_kills_the_process_group() {
    setup();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut req = request(dir.path(), &["sh", "-c", "sleep 30 & sleep 30"], None);
    req.timeout_millis = Some(200);
    let started = Instant::now();
    let status = run(&req);
    assert!(status.timed_out, "{status:?}");
    assert_eq!(status.signal, Some(libc::SIGKILL));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn try_exit_answers_until_the_handle_is_dropped() {
    setup();
    let child = reap::spawn(Command::new("sh").args(["-c", "exit 4"])).expect("spawning sh");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_exit() {
            break s;
        }
        assert!(Instant::now() < deadline, "sh never exited");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.exit_code, 4);
    // Asking again gives the same answer, as dockerd's supervision expects.
    assert_eq!(child.try_exit(), Some(status));
}
