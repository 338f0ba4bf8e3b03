//! End-to-end tests with real Bazel clients (2.1 and 4.2) against the `hearth`
//! binary, on the workspace in `tests/e2e/workspace` driven by `tests/e2e/bazel.sh`
//! (see tests/e2e/README.md).
//!
//! The Bazel clients must be installed (`scripts/install-bazel.sh`); the tests panic,
//! rather than skip, when they are not.
//!
//! The tests run one at a time (a static mutex): each starts a Bazel server and Hearth
//! processes, and the machine they run on is small. Every test has its own Bazel
//! output root and Hearth data dir in a temp dir; Bazel servers are shut down and
//! Hearth processes killed by guards, also when a test fails.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const HEARTH: &str = env!("CARGO_BIN_EXE_hearth");
const BAZEL_TIMEOUT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------
// Serialising the tests
// ---------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // A failed test poisons the mutex; the next one may still run.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Paths and prerequisites
// ---------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn bazel_sh() -> PathBuf {
    repo_root().join("tests/e2e/bazel.sh")
}

/// Panics (never skips) when the Bazel client for `version` is not installed.
fn require_bazel(version: &str) {
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

struct Output {
    status: ExitStatus,
    /// stdout and stderr interleaved, as written.
    text: String,
}

/// Runs `cmd` to completion with stdout and stderr going to one file, killing it
/// (and panicking) after `timeout`.
fn run(mut cmd: Command, log: &Path, timeout: Duration) -> Output {
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

fn bazel_command(version: &str, root: &Path, command: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(bazel_sh());
    cmd.arg(version).arg(root).arg(command).args(args);
    cmd
}

/// Runs `bazel.sh VERSION ROOT COMMAND ARGS...`; the log goes next to the output root.
fn bazel(version: &str, root: &Path, command: &str, args: &[String], log_name: &str) -> Output {
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
fn remote_flags(port: u16) -> Vec<String> {
    vec![
        format!("--remote_executor=grpc://127.0.0.1:{port}"),
        "--spawn_strategy=remote".into(),
        "--remote_local_fallback=false".into(),
        "--remote_default_exec_properties=OSFamily=Linux".into(),
        "--remote_timeout=60".into(),
    ]
}

/// Shuts the Bazel server of one output root down when dropped.
struct BazelServer {
    version: &'static str,
    root: PathBuf,
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
struct Hearth {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Hearth {
    /// Starts `hearth ARGS...` without waiting for anything.
    fn spawn(name: &str, args: &[&str], dir: &Path) -> Hearth {
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
    fn spawn_listening(name: &str, args: &[&str], dir: &Path) -> (Hearth, u16) {
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

    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the killed process");
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

/// Output of `hearth status --server grpc://127.0.0.1:PORT`.
fn hearth_status(port: u16) -> String {
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
struct ActionCounts {
    queued: u64,
    running: u64,
    completed: u64,
    cache_hits: u64,
}

/// Parses `actions    Q queued, R running, C completed, H cache hits`.
fn status_actions(status: &str) -> ActionCounts {
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
fn status_executors(status: &str) -> Vec<(String, u32, u32)> {
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

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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
fn process_counts(text: &str) -> BTreeMap<String, u64> {
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
fn assert_only(counts: &BTreeMap<String, u64>, allowed: &str, text: &str) -> u64 {
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
fn assert_test_passed(text: &str, name: &str, cached: bool) {
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

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {}:\n{}",
        out.status,
        out.text
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// `hearth up`; `bazel test //...` executes every spawn remotely; after `clean` the
/// same run is served entirely from Hearth's action cache.
fn remote_build_and_cache(version: &'static str) {
    require_bazel(version);
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let (hearth, port) = Hearth::spawn_listening(
        "hearth-up",
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--vm",
            "off",
        ],
        tmp.path(),
    );
    let root = tmp.path().join(format!("bazel-{version}"));
    let _bazel_server = BazelServer {
        version,
        root: root.clone(),
    };
    let flags = remote_flags(port);

    // 1. Everything executes remotely.
    let first = bazel(
        version,
        &root,
        "test",
        &flags_with(&flags, &["//..."]),
        "first",
    );
    assert_success(&first, "first remote `bazel test //...`");
    let counts = process_counts(&first.text);
    let remote = assert_only(&counts, "remote", &first.text);
    assert!(
        remote >= 8,
        "only {remote} remote processes (counts {counts:?}):\n{}",
        first.text
    );
    assert_test_passed(&first.text, "data_test", false);
    assert_test_passed(&first.text, "hello_test", false);
    assert!(
        first
            .text
            .contains("Executed 2 out of 2 tests: 2 tests pass."),
        "test summary missing:\n{}",
        first.text
    );
    let after_first = status_actions(&hearth_status(port));
    assert!(
        after_first.completed >= remote,
        "Bazel ran {remote} remote processes but Hearth completed {after_first:?}"
    );

    // 2. After `clean`, every spawn is a remote cache hit.
    assert_success(&bazel(version, &root, "clean", &[], "clean"), "bazel clean");
    let second = bazel(
        version,
        &root,
        "test",
        &flags_with(&flags, &["//..."]),
        "second",
    );
    assert_success(&second, "second remote `bazel test //...` (after clean)");
    let counts2 = process_counts(&second.text);
    let hits = assert_only(&counts2, "remote cache hit", &second.text);
    assert_eq!(
        hits, remote,
        "after clean, expected all {remote} remote processes to be cache hits (counts {counts2:?}):\n{}",
        second.text
    );
    assert_test_passed(&second.text, "data_test", true);
    assert_test_passed(&second.text, "hello_test", true);
    assert!(
        second
            .text
            .contains("Executed 0 out of 2 tests: 2 tests pass."),
        "test summary missing:\n{}",
        second.text
    );

    // 3. Hearth counted them.
    let status = hearth_status(port);
    let actions = status_actions(&status);
    assert!(
        actions.cache_hits > 0,
        "no cache hits in hearth status:\n{status}"
    );
    assert!(
        actions.cache_hits >= after_first.cache_hits + hits,
        "Bazel reported {hits} remote cache hits, Hearth's counter went {} -> {}:\n{status}",
        after_first.cache_hits,
        actions.cache_hits
    );
    assert_eq!(
        actions.completed, after_first.completed,
        "cache hits must not execute anything:\n{status}"
    );
    assert_eq!(
        (actions.queued, actions.running),
        (0, 0),
        "actions left over:\n{status}"
    );
    drop(hearth);
}

fn flags_with(flags: &[String], more: &[&str]) -> Vec<String> {
    flags
        .iter()
        .cloned()
        .chain(more.iter().map(|s| s.to_string()))
        .collect()
}

#[test]
fn bazel_4_2_remote_build_and_cache() {
    remote_build_and_cache("4.2");
}

#[test]
fn bazel_2_1_remote_build_and_cache() {
    remote_build_and_cache("2.1");
}

/// Finds `REL` (e.g. `slow/slow.txt`) under `ROOT/<output base>/execroot/hearth_e2e/bazel-out/<config>/bin`.
fn find_output(root: &Path, rel: &str) -> Option<PathBuf> {
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

/// `hearth server` + two executors (capacity 1); while `//slow:slow` runs on one of
/// them, that executor is killed with SIGKILL. The server must run the action again
/// on the other one and the build succeed. `--remote_retries=0` keeps Bazel from
/// papering over a failed Execute: the retry has to be Hearth's.
#[test]
fn executor_killed_mid_action_build_still_succeeds() {
    require_bazel("4.2");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let (server, port) = Hearth::spawn_listening(
        "hearth-server",
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let url = format!("grpc://127.0.0.1:{port}");
    let mut executors: BTreeMap<String, Hearth> = BTreeMap::new();
    for id in ["exec-a", "exec-b"] {
        let work = tmp.path().join(id);
        let h = Hearth::spawn(
            id,
            &[
                "executor",
                "--server",
                &url,
                "--work-dir",
                work.to_str().unwrap(),
                "--capacity",
                "1",
                "--executor-id",
                id,
                "--vm",
                "off",
            ],
            tmp.path(),
        );
        executors.insert(id.to_string(), h);
    }
    poll("both executors to connect", Duration::from_secs(30), || {
        let ids: Vec<String> = status_executors(&hearth_status(port))
            .into_iter()
            .map(|e| e.0)
            .collect();
        (ids.contains(&"exec-a".to_string()) && ids.contains(&"exec-b".to_string())).then_some(())
    });

    let root = tmp.path().join("bazel-4.2");
    let _bazel_server = BazelServer {
        version: "4.2",
        root: root.clone(),
    };
    let args = flags_with(
        &remote_flags(port),
        &[
            "--noremote_accept_cached",
            "--remote_retries=0",
            "//slow:slow",
        ],
    );
    let build = {
        let root = root.clone();
        std::thread::spawn(move || bazel("4.2", &root, "build", &args, "slow"))
    };

    // Wait for the action to start on one executor, then kill that executor.
    let victim = poll(
        "an executor to show 1/1 busy",
        Duration::from_secs(90),
        || {
            if build.is_finished() {
                panic!("the build finished before any executor was seen busy");
            }
            status_executors(&hearth_status(port))
                .into_iter()
                .find(|(_, running, capacity)| (*running, *capacity) == (1, 1))
                .map(|(id, _, _)| id)
        },
    );
    let survivor = if victim == "exec-a" {
        "exec-b"
    } else {
        "exec-a"
    };
    eprintln!("killing {victim} while it runs //slow:slow; {survivor} should take over");
    executors
        .get_mut(&victim)
        .expect("victim is one of ours")
        .kill9();
    let killed_at = Instant::now();

    let out = build.join().expect("build thread");
    eprintln!("build finished {:?} after the kill", killed_at.elapsed());
    assert_success(&out, "`bazel build //slow:slow` with its executor killed");
    let counts = process_counts(&out.text);
    let remote = assert_only(&counts, "remote", &out.text);
    assert_eq!(
        remote, 1,
        "expected exactly one remote process (counts {counts:?}):\n{}",
        out.text
    );
    let output = find_output(&root, "slow/slow.txt")
        .unwrap_or_else(|| panic!("no slow/slow.txt under {}", root.display()));
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "slow-done\n",
        "{}",
        output.display()
    );

    // The killed executor is gone from the status, the survivor is idle and there.
    let status = poll(
        "the killed executor to leave the status",
        Duration::from_secs(15),
        || {
            let status = hearth_status(port);
            let execs = status_executors(&status);
            (!execs.iter().any(|e| e.0 == victim)).then_some(status)
        },
    );
    let execs = status_executors(&status);
    assert_eq!(
        execs,
        vec![(survivor.to_string(), 0, 1)],
        "status:\n{status}"
    );
    let actions = status_actions(&status);
    assert_eq!(
        (actions.queued, actions.running),
        (0, 0),
        "actions left over:\n{status}"
    );
    assert!(actions.completed >= 1, "nothing completed:\n{status}");
    drop(executors);
    drop(server);
}

/// `hearth up` with microVMs (software emulation here); `//vm:in_vm_test` and `//vm:shout` are an
/// `sh_test` and a genrule with `exec_properties = {"workload-isolation-type":
/// "firecracker"}`. The test script passes only inside our VM (PID 1 is the
/// agent, the kernel is the guest's); the genrule's output carries the guest
/// kernel release.
fn microvm_build(version: &'static str) {
    require_bazel(version);
    let release = std::fs::read_to_string("/opt/hearth-deps/kernel/release")
        .expect("guest kernel missing: run scripts/install-vm.sh");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let (hearth, port) = Hearth::spawn_listening(
        "hearth-up",
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--vm",
            "tcg",
        ],
        tmp.path(),
    );
    poll(
        "the executor to offer firecracker",
        Duration::from_secs(120),
        || hearth_status(port).contains("firecracker").then_some(()),
    );
    let root = tmp.path().join(format!("bazel-{version}"));
    let _bazel_server = BazelServer {
        version,
        root: root.clone(),
    };
    let out = bazel(
        version,
        &root,
        "test",
        &flags_with(&remote_flags(port), &["//vm:in_vm_test", "//vm:shout"]),
        "vm",
    );
    assert_success(&out, "`bazel test //vm:in_vm_test //vm:shout` in microVMs");
    let counts = process_counts(&out.text);
    assert_only(&counts, "remote", &out.text);
    assert_test_passed(&out.text, "vm:in_vm_test", false);
    let shout = find_output(&root, "vm/shout.txt").expect("vm/shout.txt in the output tree");
    let text = std::fs::read_to_string(shout).unwrap();
    assert!(
        text.starts_with(release.trim()),
        "genrule did not run on the guest kernel: {text}"
    );
    assert!(text.contains("SPOKEN INSIDE A MICROVM"), "{text}");
    drop(hearth);
}

#[test]
fn bazel_4_2_runs_actions_in_microvms() {
    microvm_build("4.2");
}

#[test]
fn bazel_2_1_runs_actions_in_microvms() {
    microvm_build("2.1");
}
