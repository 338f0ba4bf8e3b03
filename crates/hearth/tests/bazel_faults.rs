//! Real Bazel through faults (see bazel_e2e.rs for how the Bazel tests
//! run): an executor killed with SIGKILL in the middle of an action and
//! started again, and a build interrupted with Ctrl-C, whose slot must be
//! free for the next build at once.

mod bazel_support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bazel_support::*;

/// `hearth server` + one executor (capacity 1); while `//slow:slow` runs,
/// the executor is killed with SIGKILL and started again under its id. Its
/// Hello holds nothing, so the server re-queues the action at once (not
/// after the two-minute grace period) and it runs once more; the build
/// succeeds. `--remote_retries=0` keeps Bazel from papering over a failed
/// Execute: the retry has to be Hearth's.
#[test]
fn executor_killed_mid_action_and_restarted_build_still_succeeds() {
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
            data.to_str().expect("utf-8 path"),
            "--executor-grace-secs",
            "120",
        ],
        tmp.path(),
    );
    let url = format!("grpc://127.0.0.1:{port}");
    let work = tmp.path().join("exec-a");
    let executor_args = [
        "executor",
        "--server",
        &url,
        "--work-dir",
        work.to_str().expect("utf-8 path"),
        "--capacity",
        "1",
        "--executor-id",
        "exec-a",
        "--vm",
        "off",
    ];
    let mut executor = Hearth::spawn("exec-a", &executor_args, tmp.path());
    poll("the executor to connect", Duration::from_secs(30), || {
        (status_executors(&hearth_status(port)).len() == 1).then_some(())
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
    poll(
        "the executor to show 1/1 busy",
        Duration::from_secs(90),
        || {
            assert!(
                !build.is_finished(),
                "the build finished before the executor was seen busy"
            );
            status_executors(&hearth_status(port))
                .into_iter()
                .any(|(_, running, capacity)| (running, capacity) == (1, 1))
                .then_some(())
        },
    );
    executor.kill9();
    let killed_at = Instant::now();
    poll("the server to notice", Duration::from_secs(15), || {
        hearth_status(port)
            .contains("waiting for it to reconnect")
            .then_some(())
    });
    let _executor = Hearth::spawn("exec-a-again", &executor_args, tmp.path());

    let out = build.join().expect("build thread");
    let took = killed_at.elapsed();
    eprintln!("build finished {took:?} after the kill");
    assert_success(&out, "`bazel build //slow:slow` with its executor killed");
    assert!(
        took < Duration::from_secs(100),
        "the restart re-queued the action, not the grace period: {took:?}"
    );
    let counts = process_counts(&out.text);
    let remote = assert_only(&counts, "remote", &out.text);
    assert_eq!(
        remote, 1,
        "one remote process (counts {counts:?}):\n{}",
        out.text
    );
    let output = find_output(&root, "slow/slow.txt")
        .unwrap_or_else(|| panic!("no slow/slow.txt under {}", root.display()));
    assert_eq!(
        std::fs::read_to_string(&output).expect("reading slow.txt"),
        "slow-done\n"
    );
    let status = hearth_status(port);
    assert!(
        status.contains("retries    1 re-queued"),
        "ran once more, no more:\n{status}"
    );
    assert_eq!(
        status_executors(&status),
        vec![("exec-a".to_string(), 0, 1)],
        "{status}"
    );
    let actions = status_actions(&status);
    assert_eq!((actions.queued, actions.running), (0, 0), "{status}");
    drop(server);
}

/// `hearth up --capacity 1`; `bazel build //slow:forever` (ten minutes of
/// sleep) is interrupted with SIGINT, as Ctrl-C does. The abandoned action
/// is cancelled on the executor, its slot freed within seconds, and the
/// next build runs at once instead of queueing behind it.
#[test]
fn an_interrupted_build_frees_its_slot_for_the_next_build() {
    require_bazel("4.2");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let (hearth, port) = hearth_up(tmp.path(), &["--vm", "off", "--capacity", "1"]);
    let root = tmp.path().join("bazel-4.2");
    let _bazel_server = BazelServer {
        version: "4.2",
        root: root.clone(),
    };
    let flags = remote_flags(port);
    let log = tmp.path().join("forever.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut forever = bazel_command(
        "4.2",
        &root,
        "build",
        &flags_with(&flags, &["//slow:forever"]),
    )
    .stdin(Stdio::null())
    .stdout(log_file.try_clone().expect("dup log"))
    .stderr(log_file)
    .spawn()
    .expect("starting bazel");
    poll("//slow:forever to run", Duration::from_secs(120), || {
        assert!(
            forever.try_wait().expect("try_wait").is_none(),
            "bazel ended early:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        (status_actions(&hearth_status(port)).running == 1).then_some(())
    });
    let sent = std::process::Command::new("kill")
        .args(["-INT", &forever.id().to_string()])
        .status()
        .expect("running kill");
    assert!(sent.success());
    let interrupted = Instant::now();
    let exit = poll("bazel to stop", Duration::from_secs(60), || {
        forever.try_wait().expect("try_wait")
    });
    assert!(!exit.success(), "an interrupted build fails");
    let status = poll("the slot to be free", Duration::from_secs(20), || {
        let status = hearth_status(port);
        let a = status_actions(&status);
        let execs = status_executors(&status);
        ((a.queued, a.running) == (0, 0) && execs.iter().all(|e| e.1 == 0)).then_some(status)
    });
    eprintln!(
        "slot free {:?} after the interrupt:\n{status}",
        interrupted.elapsed()
    );

    let started = Instant::now();
    let next = bazel(
        "4.2",
        &root,
        "build",
        &flags_with(&flags, &["--noremote_accept_cached", "//slow:slow"]),
        "next",
    );
    assert_success(&next, "the build after the interrupted one");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "it did not wait behind the abandoned action: {:?}",
        started.elapsed()
    );
    assert_eq!(
        assert_only(&process_counts(&next.text), "remote", &next.text),
        1
    );
    drop(hearth);
}
