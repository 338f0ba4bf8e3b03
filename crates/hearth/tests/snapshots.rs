//! Recycled VMs saved to disk (`recycle-runner=true`): a VM the full pool
//! evicts, and every pooled VM at a graceful executor shutdown, is saved and
//! restored for the next action with its key, by a restarted executor too.
//! A snapshot that fails to restore is deleted and the action boots fresh.

mod common;

use std::path::Path;

use common::vm::*;
use common::*;

fn accel() -> String {
    std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into())
}

fn snapshots(data: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(data.join("data/executor/vm-snapshots")) {
        Ok(list) => list.flatten().map(|e| e.path()).collect(),
        Err(_) => vec![],
    }
}

/// The runner snapshots (clones' starting points) among the clean ones.
fn runner_snapshots(data: &Path) -> Vec<std::path::PathBuf> {
    let dir = data.join("data/executor/vm-clean");
    let Ok(list) = std::fs::read_dir(dir) else {
        return vec![];
    };
    list.flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("meta.json"))
                .is_ok_and(|m| m.contains("\"key\": \"runner:"))
        })
        .collect()
}

fn leave_state() -> String {
    format!("echo kept > /tmp/state; {LEAVE_BACKGROUND_PROCESS}")
}
const FIND_STATE: &str =
    "cat /tmp/state 2>/dev/null || echo fresh; kill -0 $(cat /tmp/bg 2>/dev/null) 2>/dev/null && echo bg-alive; true";

#[tokio::test]
async fn a_vm_evicted_from_the_pool_is_saved_and_restored() {
    let h = up(&["--vm", &accel(), "--vm-pool-size", "1"]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let key = |k| [FC, ("recycle-runner", "true"), ("runner-recycling-key", k)];
    let (code, out, _) = run_script(&c, &leave_state(), &key("a")).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        snapshots(h.dir.path()).is_empty(),
        "a pooled VM is not saved"
    );
    // The pool holds one VM: parking b's evicts a's, which is saved.
    let (code, out, cold) = run_script(&c, FIND_STATE, &key("b")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fresh"), "key b got a's VM: {out}");
    // Parking b's VM (which evicts a's) ends after b's result is back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while snapshots(h.dir.path()).len() != 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(snapshots(h.dir.path()).len(), 1, "the evicted VM is saved");

    let (code, out, restored) = run_script(&c, FIND_STATE, &key("a")).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kept") && out.contains("bg-alive"),
        "files and processes of the saved VM are back: {out}"
    );
    eprintln!("trivial action: cold {cold:?}, restored from disk {restored:?}");
    assert!(restored < cold, "restored {restored:?} vs cold {cold:?}");
}

async fn scrape(addr: &str) -> String {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || common::web::get(&addr, "/metrics", &[]).body)
        .await
        .expect("scrape thread")
}

#[tokio::test]
async fn pooled_vms_are_saved_at_shutdown_and_restored_after_a_restart() {
    // A networked VM: after the restore it must still reach the allowed
    // registry (a new QEMU, network namespace and slirp4netns).
    let registry = loopback_service("registry-ok\n");
    let allowed = format!("127.0.0.1:{registry}");
    let flags = ["--vm", &accel(), "--insecure-registry", &allowed];
    let mut h = up(&flags);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let warm = [FC, ("recycle-runner", "true"), ("network", "external")];
    let (code, out, _) = run_script(&c, &leave_state(), &warm).await;
    assert_eq!(code, 0, "{out}");
    let dir = h.stop();
    assert_eq!(snapshots(dir.path()).len(), 1, "the pooled VM is saved");

    // The restart's /metrics: the saved VM, then its restore.
    let metrics = format!("127.0.0.1:{}", common::web::free_port());
    let with_metrics: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["--metrics-listen", metrics.as_str()])
        .collect();
    let mut h = up_in(dir, &with_metrics);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let m = scrape(&metrics).await;
    assert_eq!(
        common::web::sample(&m, "hearth_vm_saved_snapshots"),
        Some(1.0),
        "{m}"
    );
    let bytes = common::web::sample(&m, "hearth_vm_saved_snapshot_bytes").unwrap_or(0.0);
    assert!(bytes > 1e6, "the saved VM's files are counted: {bytes}");
    let reach = format!(
        "{FIND_STATE}; echo \"registry=$(timeout 10 bash -c 'head -c 11 < /dev/tcp/127.0.0.1/{registry}')\""
    );
    let (code, out, _) = run_script(&c, &reach, &warm).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kept") && out.contains("bg-alive"),
        "the restarted executor restored the VM: {out}"
    );
    assert!(
        out.contains("registry=registry-ok"),
        "the restored VM's network works: {out}"
    );
    assert!(
        snapshots(h.dir.path()).is_empty(),
        "a snapshot is used once"
    );
    let m = scrape(&metrics).await;
    assert_eq!(
        common::web::sample(&m, "hearth_vm_saved_snapshots"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        common::web::sample(&m, r#"hearth_vm_starts_total{kind="restore"}"#),
        Some(1.0),
        "{m}"
    );

    // A snapshot that cannot be restored (its device state is damaged) is
    // deleted, and the action runs in a fresh VM.
    let dir = h.stop();
    let saved = snapshots(dir.path());
    assert_eq!(saved.len(), 1, "saved again at the second shutdown");
    std::fs::write(saved[0].join("state"), b"not a QEMU migration stream").unwrap();
    // And the runner snapshot clones of the key would start from.
    for snap in runner_snapshots(dir.path()) {
        std::fs::write(snap.join("state"), b"not a QEMU migration stream").unwrap();
    }
    let h = up_in(dir, &flags);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let (code, out, _) = run_script(&c, FIND_STATE, &warm).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fresh"), "{out}");
    assert!(
        snapshots(h.dir.path()).is_empty(),
        "the damaged snapshot is deleted"
    );
}
