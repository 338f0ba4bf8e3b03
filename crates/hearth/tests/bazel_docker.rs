//! The seed scenario end to end with real Bazel: `docker_test` (a `docker run`
//! inside a microVM with `init-dockerd` and `recycle-runner`) from the BUILD
//! file in `tests/e2e/docker-workspace`, verbatim with `test.`-prefixed
//! properties under Bazel 4.2 and unprefixed under Bazel 2.1. A second run
//! must reuse the VM (files left by run 1, the same dockerd, the image not
//! pulled again); the long-running-server pattern (`db_test`) must find its
//! database container again; and after a graceful restart of `hearth up` the
//! VM must come back from its on-disk snapshot.
//!
//! Images come from a local `docker-registry` (Debian package) that is also
//! dockerd's mirror: a busybox stand-in for `library/ubuntu:20.04`, and a
//! database stand-in built here (busybox `httpd` serving /data).

mod bazel_support;

use std::path::Path;
use std::time::{Duration, Instant};

use bazel_support::*;

/// `/usr/local/bin/db-server` of the database image.
const DB_SERVER: &[u8] = b"#!/bin/sh\nmkdir -p /data\nexec httpd -f -p 8080 -h /data\n";

struct Setup {
    registry: hearth_testkit::Registry,
    db_image: String,
}

fn setup() -> Setup {
    let registry = hearth_testkit::Registry::start("");
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        hearth_testkit::push_busybox_image(&registry.host, "library/ubuntu", "20.04", &[]).await;
        hearth_testkit::push_busybox_image(
            &registry.host,
            "team/db",
            "1",
            &[("usr/local/bin/db-server", DB_SERVER, 0o755)],
        )
        .await;
    });
    let db_image = format!("{}/team/db:1", registry.host);
    Setup { registry, db_image }
}

/// `hearth up` with microVMs, the registry allowed and used as dockerd's
/// mirror, on the data dir `dir/data`.
fn up_with_registry(dir: &Path, registry: &str) -> (Hearth, u16) {
    let mirror = format!("http://{registry}");
    hearth_up(
        dir,
        &[
            "--vm",
            "tcg",
            "--insecure-registry",
            registry,
            "--docker-mirror",
            &mirror,
        ],
    )
}

/// The value of the first `KEY: VALUE` line in Bazel's output (the test logs,
/// printed with `--test_output=all`).
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}: ");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no `{key}:` line in:\n{text}"))
        .trim()
}

struct Client {
    version: &'static str,
    root: std::path::PathBuf,
}

impl Client {
    /// `bazel test TARGET` remotely on `port`, with `RUN_ID` (a fresh action
    /// each time) and `DB_IMAGE` in the test environment. Returns the output
    /// and the wall time.
    fn test(&self, port: u16, target: &str, run: u32, db_image: &str) -> (String, Duration) {
        let run_env = format!("--test_env=RUN_ID={run}");
        let db_env = format!("--test_env=DB_IMAGE={db_image}");
        let args = flags_with(
            &remote_flags(port),
            &[
                "--remote_timeout=600",
                "--test_output=all",
                &run_env,
                &db_env,
                target,
            ],
        );
        let t = Instant::now();
        let out = bazel(
            self.version,
            &self.root,
            "test",
            &args,
            &format!("run{run}"),
        );
        let took = t.elapsed();
        assert_success(
            &out,
            &format!("bazel {} test {target} (run {run})", self.version),
        );
        assert_only(&process_counts(&out.text), "remote", &out.text);
        assert_test_passed(&out.text, &target.replace("//:", ""), false);
        if target.contains("docker_test") {
            assert!(
                out.text.lines().any(|l| l.trim() == "PASS"),
                "no PASS from the container:\n{}",
                out.text
            );
        }
        (out.text, took)
    }
}

fn seed_scenario(version: &'static str, suffix: &str, full: bool) {
    require_bazel(version);
    let _serial = serial();
    std::env::set_var(
        "HEARTH_E2E_WORKSPACE",
        repo_root().join("tests/e2e/docker-workspace"),
    );
    let s = setup();
    let tmp = tempfile::tempdir().expect("temp dir");
    let (mut hearth, port) = up_with_registry(tmp.path(), &s.registry.host);
    let client = Client {
        version,
        root: tmp.path().join(format!("bazel-{version}")),
    };
    let _bazel_server = BazelServer {
        version,
        root: client.root.clone(),
    };
    let docker_test = format!("//:docker_test{suffix}");
    let db_test = format!("//:db_test{suffix}");

    // Run 1: a fresh VM, dockerd started, the image pulled through the mirror.
    let (out, fresh) = client.test(port, &docker_test, 1, &s.db_image);
    assert_eq!(field(&out, "image-before"), "absent", "{out}");
    assert_eq!(field(&out, "runs-before"), "0", "{out}");
    let dockerd = field(&out, "dockerd-started").to_string();

    // Run 2: the same VM, woken from the pool.
    let (out, recycled) = client.test(port, &docker_test, 2, &s.db_image);
    assert_eq!(
        field(&out, "runs-before"),
        "1",
        "run 2 must see run 1's files: {out}"
    );
    assert_eq!(
        field(&out, "image-before"),
        "present",
        "image pulled again: {out}"
    );
    assert_eq!(
        field(&out, "dockerd-started"),
        dockerd,
        "dockerd restarted: {out}"
    );
    eprintln!("seed docker_test (Bazel {version}): fresh {fresh:?}, recycled {recycled:?}");
    assert!(recycled < fresh, "recycled {recycled:?} vs fresh {fresh:?}");
    if !full {
        return;
    }

    // The long-running server: started by run 3, found and reset by run 4.
    let (out, _) = client.test(port, &db_test, 3, &s.db_image);
    assert_eq!(field(&out, "db"), "started", "{out}");
    assert_eq!(field(&out, "db answered"), "row-3", "{out}");
    let (out, _) = client.test(port, &db_test, 4, &s.db_image);
    assert_eq!(field(&out, "db"), "reused", "{out}");
    assert_eq!(field(&out, "db answered"), "row-4", "{out}");

    // A graceful restart saves the pooled VM to disk; the next run restores it,
    // database container and all.
    hearth.terminate();
    drop(hearth);
    let (_hearth, port) = up_with_registry(tmp.path(), &s.registry.host);
    let (out, restored) = client.test(port, &docker_test, 5, &s.db_image);
    assert_eq!(
        field(&out, "runs-before"),
        "2",
        "not restored after the restart: {out}"
    );
    assert_eq!(field(&out, "dockerd-started"), dockerd, "{out}");
    assert_eq!(field(&out, "image-before"), "present", "{out}");
    let (out, _) = client.test(port, &db_test, 6, &s.db_image);
    assert_eq!(
        field(&out, "db"),
        "reused",
        "the database did not survive: {out}"
    );
    assert_eq!(field(&out, "db answered"), "row-6", "{out}");
    eprintln!("seed docker_test (Bazel {version}): restored after a restart {restored:?}");
}

#[test]
fn seed_docker_test_bazel_4_2_fresh_recycled_server_pattern_and_restore() {
    seed_scenario("4.2", "", true);
}

#[test]
fn seed_docker_test_bazel_2_1_unprefixed_fresh_and_recycled() {
    seed_scenario("2.1", "_unprefixed", false);
}

/// The seed's `docker_test` (Bazel 4.2) on a second executor: run 1 warms
/// the key on `hearth executor` e1, which shares the runner's snapshot
/// through the CAS; e1 is killed, and run 2 on e2, which never ran the key,
/// starts from that snapshot: run 1's files, the same dockerd, the image
/// already pulled.
#[test]
fn seed_docker_test_bazel_4_2_on_a_second_executor_starts_warm() {
    let version = "4.2";
    require_bazel(version);
    let _serial = serial();
    std::env::set_var(
        "HEARTH_E2E_WORKSPACE",
        repo_root().join("tests/e2e/docker-workspace"),
    );
    let s = setup();
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let (_server, port) = Hearth::spawn_listening(
        "hearth-server",
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
        tmp.path(),
    );
    let mirror = format!("http://{}", s.registry.host);
    let server = format!("grpc://127.0.0.1:{port}");
    let executor = |id: &str| {
        let work = tmp.path().join(format!("exec-{id}"));
        let args = [
            "executor",
            "--server",
            &server,
            "--executor-id",
            id,
            "--capacity",
            "1",
            "--vm",
            "tcg",
            "--insecure-registry",
            &s.registry.host,
            "--docker-mirror",
            &mirror,
            "--work-dir",
            work.to_str().expect("utf-8 path"),
        ];
        let h = Hearth::spawn(&format!("exec-{id}"), &args, tmp.path());
        poll(
            &format!("{id} to offer firecracker"),
            Duration::from_secs(180),
            || {
                let status = hearth_status(port);
                status
                    .lines()
                    .any(|l| l.contains(id) && l.contains("firecracker"))
                    .then_some(())
            },
        );
        h
    };
    let client = Client {
        version,
        root: tmp.path().join(format!("bazel-{version}")),
    };
    let _bazel_server = BazelServer {
        version,
        root: client.root.clone(),
    };

    let mut e1 = executor("e1");
    let (out, fresh) = client.test(port, "//:docker_test", 1, &s.db_image);
    assert_eq!(field(&out, "runs-before"), "0", "{out}");
    let dockerd = field(&out, "dockerd-started").to_string();
    poll(
        "e1 to share the warm runner",
        Duration::from_secs(300),
        || {
            hearth_status(port)
                .contains("shared     1 warm runner")
                .then_some(())
        },
    );
    let _e2 = executor("e2");
    e1.kill9();
    let (out, second) = client.test(port, "//:docker_test", 2, &s.db_image);
    assert_eq!(
        field(&out, "runs-before"),
        "1",
        "e2 must start from run 1's VM: {out}"
    );
    assert_eq!(field(&out, "image-before"), "present", "{out}");
    assert_eq!(field(&out, "dockerd-started"), dockerd, "{out}");
    eprintln!("seed docker_test (Bazel 4.2): fresh on e1 {fresh:?}, warm on e2 {second:?}");
}
