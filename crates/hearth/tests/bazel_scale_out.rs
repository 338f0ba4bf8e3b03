//! Real Bazel 4.2 against two Hearth replicas that share a bucket (SeaweedFS)
//! and Redis, each with an executor: what one replica built, the other
//! serves from cache after `bazel clean`, and they run the actions again
//! from the shared blobs and queue; a replica killed mid-build loses nothing.

mod bazel_support;

use std::path::Path;

use bazel_support::*;
use hearth_testkit::{Redis, SeaweedFs};

fn shared_flags(s3: &SeaweedFs, redis: &Redis) -> Vec<String> {
    let mut flags = vec![
        "--cas-store".into(),
        "s3://hearth/bazel".into(),
        "--state".into(),
        redis.url.clone(),
    ];
    flags.extend(s3.hearth_flags());
    flags
}

fn replica(dir: &Path, name: &str, command: &str, shared: &[String]) -> (Hearth, u16) {
    let data = dir.join(format!("{name}-data"));
    let mut args = vec![
        command,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ];
    if command == "up" {
        args.extend(["--vm", "off"]);
    }
    args.extend(shared.iter().map(String::as_str));
    Hearth::spawn_listening(name, &args, dir)
}

/// `hearth executor` (host runner) named `id`, with the replicas on
/// `ports` as its server list, once it has joined the first.
fn executor(dir: &Path, id: &str, ports: &[u16], capacity: u32) -> Hearth {
    let work = dir.join(id);
    let capacity = capacity.to_string();
    let servers: Vec<String> = ports
        .iter()
        .flat_map(|p| ["--server".to_string(), format!("grpc://127.0.0.1:{p}")])
        .collect();
    let mut args = vec!["executor", "--executor-id", id, "--vm", "off"];
    args.extend(["--capacity", &capacity]);
    args.extend(["--work-dir", work.to_str().expect("utf-8 path")]);
    args.extend(servers.iter().map(String::as_str));
    let executor = Hearth::spawn(id, &args, dir);
    poll(
        &format!("{id} to join its first replica"),
        std::time::Duration::from_secs(30),
        || hearth_status(ports[0]).contains(id).then_some(()),
    );
    executor
}

#[test]
fn bazel_4_2_builds_on_replica_a_and_replica_b_serves_the_rebuild_from_cache() {
    require_bazel("4.2");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let s3 = SeaweedFs::start();
    let redis = Redis::start();
    let shared = shared_flags(&s3, &redis);
    let (_a, port_a) = replica(tmp.path(), "replica-a", "up", &shared);
    let (_b, port_b) = replica(tmp.path(), "replica-b", "server", &shared);
    let _executor_b = executor(tmp.path(), "executor-b", &[port_b], 2);
    let root = tmp.path().join("bazel-4.2");
    let _bazel_server = BazelServer {
        version: "4.2",
        root: root.clone(),
    };

    // 1. Through replica A: everything runs on A's executor.
    let first = bazel(
        "4.2",
        &root,
        "test",
        &flags_with(&remote_flags(port_a), &["//..."]),
        "through-a",
    );
    assert_success(&first, "`bazel test //...` through replica A");
    let remote = assert_only(&process_counts(&first.text), "remote", &first.text);
    assert!(
        remote >= 8,
        "only {remote} remote processes:\n{}",
        first.text
    );

    // 2. After `clean`, through replica B (an empty disk): all cache hits.
    assert_success(&bazel("4.2", &root, "clean", &[], "clean"), "bazel clean");
    let second = bazel(
        "4.2",
        &root,
        "test",
        &flags_with(&remote_flags(port_b), &["//..."]),
        "through-b",
    );
    assert_success(&second, "`bazel test //...` through replica B after clean");
    let hits = assert_only(
        &process_counts(&second.text),
        "remote cache hit",
        &second.text,
    );
    assert_eq!(
        hits, remote,
        "every action a cache hit on B:\n{}",
        second.text
    );
    assert_test_passed(&second.text, "data_test", true);
    assert_test_passed(&second.text, "hello_test", true);
    let status_b = status_actions(&hearth_status(port_b));
    assert_eq!(status_b.completed, 0, "B executed nothing");

    // 3. B runs them again on its own executor from the shared blobs.
    assert_success(&bazel("4.2", &root, "clean", &[], "clean-2"), "bazel clean");
    let third = bazel(
        "4.2",
        &root,
        "test",
        &flags_with(
            &remote_flags(port_b),
            &["--noremote_accept_cached", "//..."],
        ),
        "executed-on-b",
    );
    assert_success(&third, "`bazel test //...` executed through replica B");
    let ran = assert_only(&process_counts(&third.text), "remote", &third.text);
    assert_eq!(ran, remote, "{}", third.text);
    // With the queue shared, whichever replica's executor was free ran
    // each: together they ran them all again.
    let (status_a, status_b) = (
        status_actions(&hearth_status(port_a)),
        status_actions(&hearth_status(port_b)),
    );
    assert!(
        status_a.completed + status_b.completed >= 2 * remote,
        "the replicas ran them: A {status_a:?}, B {status_b:?}"
    );
}

/// Bazel builds through replica A; the only executor is connected to
/// replica B (with A next on its list). B is killed with SIGKILL while the
/// action runs: the executor moves to A, which adopts the running action
/// from the shared state, and the build succeeds with one remote run.
#[test]
fn bazel_4_2_build_survives_kill_9_of_the_replica_running_its_action() {
    require_bazel("4.2");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let s3 = SeaweedFs::start();
    let redis = Redis::start();
    let shared = shared_flags(&s3, &redis);
    let (a, port_a) = replica(tmp.path(), "replica-a", "server", &shared);
    let (mut b, port_b) = replica(tmp.path(), "replica-b", "server", &shared);
    let _executor = executor(tmp.path(), "roamer", &[port_b, port_a], 1);
    let root = tmp.path().join("bazel-4.2");
    let _bazel_server = BazelServer {
        version: "4.2",
        root: root.clone(),
    };
    let args = flags_with(
        &remote_flags(port_a),
        &[
            "--noremote_accept_cached",
            "--remote_retries=0",
            "//slow:slow",
        ],
    );
    let build = {
        let root = root.clone();
        std::thread::spawn(move || bazel("4.2", &root, "build", &args, "slow-through-a"))
    };
    // Running on B's executor, and recorded in Redis as running there (a
    // replica that dies before that write leaves work only the queue can
    // give back, to be run again).
    let mut redis_conn = redis::Client::open(redis.url.as_str())
        .and_then(|c| c.get_connection())
        .expect("a connection to Redis");
    poll(
        "the action to run on replica B's executor",
        std::time::Duration::from_secs(90),
        || {
            assert!(!build.is_finished(), "the build finished before B ran it");
            let running = status_executors(&hearth_status(port_b))
                .into_iter()
                .any(|(_, running, _)| running == 1);
            let recorded: Vec<String> = redis::cmd("KEYS")
                .arg("hearth:runner:*")
                .query(&mut redis_conn)
                .expect("KEYS");
            (running && !recorded.is_empty()).then_some(())
        },
    );
    b.kill9();
    let out = build.join().expect("build thread");
    assert_success(&out, "`bazel build //slow:slow` with replica B killed");
    let remote = assert_only(&process_counts(&out.text), "remote", &out.text);
    assert_eq!(remote, 1, "{}", out.text);
    let output = find_output(&root, "slow/slow.txt")
        .unwrap_or_else(|| panic!("no slow/slow.txt under {}", root.display()));
    assert_eq!(
        std::fs::read_to_string(&output).expect("reading slow.txt"),
        "slow-done\n"
    );
    let status_a = hearth_status(port_a);
    assert!(
        status_executors(&status_a)
            .iter()
            .any(|(id, _, _)| id == "roamer"),
        "the executor moved to A:\n{status_a}"
    );
    assert_eq!(status_actions(&status_a).completed, 1, "{status_a}");
    let log = std::fs::read_to_string(&a.log).expect("replica A's log");
    assert!(
        log.contains("adopted an action running on an executor that moved here"),
        "A kept the running action rather than running it again:\n{log}"
    );
}
