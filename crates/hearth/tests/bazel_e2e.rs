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

mod bazel_support;

use bazel_support::*;

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// `hearth up`; `bazel test //...` executes every spawn remotely; after `clean` the
/// same run is served entirely from Hearth's action cache.
fn remote_build_and_cache(version: &'static str) {
    require_bazel(version);
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let (hearth, port) = hearth_up(tmp.path(), &["--vm", "off"]);
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

#[test]
fn bazel_4_2_remote_build_and_cache() {
    remote_build_and_cache("4.2");
}

#[test]
fn bazel_2_1_remote_build_and_cache() {
    remote_build_and_cache("2.1");
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
    let (hearth, port) = hearth_up(tmp.path(), &["--vm", "tcg"]);
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
