//! Helpers for the end-to-end tests with real Bazel clients: running
//! `tests/e2e/bazel.sh`, `hearth` processes, reading Bazel's output.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const HEARTH: &str = env!("CARGO_BIN_EXE_hearth");
pub const BAZEL_TIMEOUT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------
// Serialising the tests
// ---------------------------------------------------------------------------

pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    // A failed test poisons the mutex; the next one may still run.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Paths and prerequisites
// ---------------------------------------------------------------------------

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

pub fn bazel_sh() -> PathBuf {
    repo_root().join("tests/e2e/bazel.sh")
}

/// Panics (never skips) when the Bazel client for `version` is not installed.
pub fn require_bazel(version: &str) {
    let (var, default) = match version {
        "2.1" => ("HEARTH_BAZEL21", "/opt/hearth-deps/bazel21/bazel"),
        "4.2" => ("HEARTH_BAZEL42", "/usr/bin/bazel-4"),
        v => panic!("unknown Bazel version {v}"),
    };
    let bin = std::env::var(var).unwrap_or_else(|_| default.to_string());
    assert!(
        Path::new(&bin).is_file(),
        "Bazel {version} client {bin} is missing: run scripts/install-bazel.sh (as root) \
         before `cargo test -p hearth --test bazel_e2e`"
    );
    assert!(bazel_sh().is_file(), "{} is missing", bazel_sh().display());
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

pub struct Output {
    pub status: ExitStatus,
    /// stdout and stderr interleaved, as written.
    pub text: String,
}

/// Runs `cmd` to completion with stdout and stderr going to one file, killing it
/// (and panicking) after `timeout`.
pub fn run(mut cmd: Command, log: &Path, timeout: Duration) -> Output {
    let file = File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup log file"))
        .stderr(file);
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{desc} did not finish within {timeout:?}; output so far:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Output { status, text }
}

pub fn bazel_command(version: &str, root: &Path, command: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(bazel_sh());
    cmd.arg(version).arg(root).arg(command).args(args);
    cmd
}

/// Runs `bazel.sh VERSION ROOT COMMAND ARGS...`; the log goes next to the output root.
pub fn bazel(version: &str, root: &Path, command: &str, args: &[String], log_name: &str) -> Output {
    let log = root.with_file_name(format!("{log_name}.log"));
    let out = run(
        bazel_command(version, root, command, args),
        &log,
        BAZEL_TIMEOUT,
    );
    eprintln!(
        "---- bazel {version} {command} ({log_name}): {}\n{}",
        out.status, out.text
    );
    out
}

/// The flags that make Bazel execute every spawn remotely on `port`.
pub fn remote_flags(port: u16) -> Vec<String> {
    vec![
        format!("--remote_executor=grpc://127.0.0.1:{port}"),
        "--spawn_strategy=remote".into(),
        "--remote_local_fallback=false".into(),
        "--remote_default_exec_properties=OSFamily=Linux".into(),
        "--remote_timeout=60".into(),
    ]
}

/// Shuts the Bazel server of one output root down when dropped.
pub struct BazelServer {
    pub version: &'static str,
    pub root: PathBuf,
}

impl Drop for BazelServer {
    fn drop(&mut self) {
        if !self.root.exists() {
            return;
        }
        let log = self.root.with_file_name("shutdown.log");
        let cmd = bazel_command(self.version, &self.root, "shutdown", &[]);
        let out = run(cmd, &log, Duration::from_secs(120));
        if !out.status.success() {
            eprintln!(
                "bazel {} shutdown failed: {}\n{}",
                self.version, out.status, out.text
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Hearth processes
// ---------------------------------------------------------------------------

/// A `hearth` child process, killed (SIGKILL) when dropped. Its stderr goes to a
/// log file that is printed when the test is failing.
pub struct Hearth {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Hearth {
    /// Starts `hearth ARGS...` without waiting for anything.
    pub fn spawn(name: &str, args: &[&str], dir: &Path) -> Hearth {
        let log = dir.join(format!("{name}.log"));
        let err = File::create(&log).expect("hearth log file");
        let child = Command::new(HEARTH)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {HEARTH} {args:?}: {e}"));
        Hearth {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Starts `hearth ARGS...` (`up` or `server`) and returns it with the port from
    /// its `hearth listening on 127.0.0.1:PORT` line.
    pub fn spawn_listening(name: &str, args: &[&str], dir: &Path) -> (Hearth, u16) {
        let mut h = Hearth::spawn(name, args, dir);
        let stdout = h.child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Keeps reading so the pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Receiver gone: keep draining.
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.trim().strip_prefix("hearth listening on ") {
                        let port = addr
                            .rsplit(':')
                            .next()
                            .and_then(|p| p.parse().ok())
                            .unwrap_or_else(|| panic!("no port in {line:?}"));
                        return (h, port);
                    }
                }
                Err(_) => {
                    let status = h.child.try_wait().ok().flatten();
                    panic!(
                        "{name}: no `hearth listening on` line within 30 s (exit: {status:?}); stderr:\n{}",
                        std::fs::read_to_string(&h.log).unwrap_or_default()
                    );
                }
            }
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the killed process");
    }

    /// A graceful stop (SIGTERM), waiting up to a minute for the exit.
    pub fn terminate(&mut self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within 60 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("---- {} stderr (last {} lines):", self.name, tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// `hearth up` on a free port with its data in `dir/data` and `extra` flags
/// (at least `--vm MODE`). With microVMs on, waits until the executor
/// offers them.
pub fn hearth_up(dir: &Path, extra: &[&str]) -> (Hearth, u16) {
    let data = dir.join("data");
    let mut args = vec![
        "up",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let (h, port) = Hearth::spawn_listening("hearth-up", &args, dir);
    if !extra.windows(2).any(|w| w == ["--vm", "off"]) {
        poll(
            "the executor to offer firecracker",
            Duration::from_secs(120),
            || hearth_status(port).contains("firecracker").then_some(()),
        );
    }
    (h, port)
}

/// Output of `hearth status --server grpc://127.0.0.1:PORT`.
pub fn hearth_status(port: u16) -> String {
    let out = Command::new(HEARTH)
        .args(["status", "--server", &format!("grpc://127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .output()
        .expect("running hearth status");
    assert!(
        out.status.success(),
        "hearth status failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 status")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionCounts {
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub cache_hits: u64,
}

/// Parses `actions    Q queued, R running, C completed, H cache hits`.
pub fn status_actions(status: &str) -> ActionCounts {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("actions"))
        .unwrap_or_else(|| panic!("no `actions` line in status:\n{status}"));
    let nums: Vec<u64> = line
        .split(',')
        .map(|part| {
            part.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("bad `actions` line {line:?}"))
        })
        .collect();
    assert_eq!(nums.len(), 4, "bad `actions` line {line:?}");
    ActionCounts {
        queued: nums[0],
        running: nums[1],
        completed: nums[2],
        cache_hits: nums[3],
    }
}

/// Parses the executor lines `  ID   R/C busy  isolation=...` into (id, running, capacity).
pub fn status_executors(status: &str) -> Vec<(String, u32, u32)> {
    status
        .lines()
        .filter(|l| l.starts_with("  "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let id = words.next()?;
            let (running, capacity) = words.next()?.split_once('/')?;
            if words.next()? != "busy" {
                return None;
            }
            Some((
                id.to_string(),
                running.parse().ok()?,
                capacity.parse().ok()?,
            ))
        })
        .collect()
}

pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Reading Bazel's output
// ---------------------------------------------------------------------------

/// Parses Bazel's `INFO: N processes: A remote, B internal.` line (2.1 and 4.2;
/// also `1 process:` and `remote cache hit`) into strategy -> count.
pub fn process_counts(text: &str) -> BTreeMap<String, u64> {
    let line = text
        .lines()
        .filter(|l| l.starts_with("INFO: ") && (l.contains(" processes") || l.contains(" process")))
        .find(|l| {
            l["INFO: ".len()..]
                .split_whitespace()
                .next()
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
        .unwrap_or_else(|| panic!("no `INFO: N processes` line in Bazel output:\n{text}"));
    let (head, rest) = match line.split_once(": ").map(|(_, r)| r.split_once(": ")) {
        Some(Some((head, rest))) => (head, rest),
        // `INFO: 0 processes.`
        _ => return BTreeMap::new(),
    };
    let total: u64 = head.split_whitespace().next().unwrap().parse().unwrap();
    let mut counts = BTreeMap::new();
    for part in rest.trim().trim_end_matches('.').split(", ") {
        let (n, kind) = part
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad part {part:?} of {line:?}"));
        let n: u64 = n
            .parse()
            .unwrap_or_else(|_| panic!("bad count in {part:?} of {line:?}"));
        *counts.entry(kind.trim().to_string()).or_default() += n;
    }
    assert_eq!(
        counts.values().sum::<u64>(),
        total,
        "counts do not add up in {line:?}"
    );
    counts
}

/// Asserts that every process Bazel ran was either remote (`allowed`) or internal,
/// never a local strategy, and returns the `want` count.
pub fn assert_only(counts: &BTreeMap<String, u64>, allowed: &str, text: &str) -> u64 {
    for kind in counts.keys() {
        assert!(
            kind == allowed || kind == "internal",
            "Bazel ran processes with strategy {kind:?} (counts {counts:?}); expected only \
             {allowed:?} and internal. Output:\n{text}"
        );
    }
    counts.get(allowed).copied().unwrap_or(0)
}

/// Asserts `//:NAME ... PASSED` (with `(cached)` when `cached`) is in the summary;
/// NAME may also be `pkg:target`.
pub fn assert_test_passed(text: &str, name: &str, cached: bool) {
    let label = if name.contains(':') {
        format!("//{name}")
    } else {
        format!("//:{name}")
    };
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .unwrap_or_else(|| panic!("no result line for {label} in:\n{text}"));
    assert!(
        line.contains("PASSED"),
        "{label} did not pass: {line:?}\n{text}"
    );
    assert_eq!(
        line.contains("(cached)"),
        cached,
        "{label}: expected cached={cached}: {line:?}\n{text}"
    );
}

pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {}:\n{}",
        out.status,
        out.text
    );
}

pub fn flags_with(flags: &[String], more: &[&str]) -> Vec<String> {
    flags
        .iter()
        .cloned()
        .chain(more.iter().map(|s| s.to_string()))
        .collect()
}

/// Finds `REL` (e.g. `slow/slow.txt`) under `ROOT/<output base>/execroot/hearth_e2e/bazel-out/<config>/bin`.
pub fn find_output(root: &Path, rel: &str) -> Option<PathBuf> {
    for base in std::fs::read_dir(root).ok()?.flatten() {
        let out = base.path().join("execroot/hearth_e2e/bazel-out");
        let Ok(configs) = std::fs::read_dir(&out) else {
            continue;
        };
        for config in configs.flatten() {
            let f = config.path().join("bin").join(rel);
            if f.is_file() {
                return Some(f);
            }
        }
    }
    None
}
