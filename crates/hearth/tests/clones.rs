//! Fresh VMs cloned from clean snapshots (issue 11): a clone starts from a
//! VM saved before any action ran, shares no random state with its
//! siblings, has the host's time, and keeps nothing of the actions before
//! it; `--vm-clean-snapshots off` boots every fresh VM.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::vm::*;
use common::*;

fn accel() -> String {
    std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into())
}

/// Prints what must differ between clones and what an earlier action
/// would have left behind, then leaves some of that behind itself.
const PROBE: &str = "echo uuid=$(cat /proc/sys/kernel/random/uuid); \
     echo rand=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
     echo now=$(date +%s); \
     dmesg | grep -q 'reseeded from the host' && echo reseeded; \
     for f in /tmp/left /root/left /.hearth/scratch/left; do test -e $f && echo STALE:$f; done; \
     for p in /proc/[0-9]*; do [ \"$(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\" = 'sleep 4242 ' ] && echo STALE:process; done; \
     for f in /tmp/left /root/left /.hearth/scratch/left; do echo x > $f; done; \
     (cd / && exec sleep 4242 >/dev/null 2>&1) &";

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in:\n{text}"))
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn fresh_vms_are_clones_that_share_nothing() {
    let h = up(&["--vm", &accel()]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let mut seen = vec![];
    for _ in 0..3 {
        let r = run_vm_script(&c, PROBE, &[FC]).await;
        assert_eq!(r.code, 0, "{}", r.text);
        assert_eq!(r.kind(), "clone", "a fresh VM is a clone: {}", r.text);
        assert!(
            !r.text.contains("STALE"),
            "a fresh VM holds nothing of an earlier action:\n{}",
            r.text
        );
        assert!(
            r.text.contains("reseeded"),
            "the agent reseeded the clone's random numbers:\n{}",
            r.text
        );
        let now: i64 = field(&r.text, "now").parse().unwrap();
        assert!(
            (now - host_now()).abs() < 30,
            "the clone's clock is the host's, not the snapshot's: {now}"
        );
        seen.push((
            field(&r.text, "uuid").to_string(),
            field(&r.text, "rand").to_string(),
        ));
        eprintln!(
            "clone ready in {:?} ms, round trip {:?}",
            r.start.as_ref().map(|s| s.ready_millis),
            r.took
        );
    }
    for (i, a) in seen.iter().enumerate() {
        for b in &seen[i + 1..] {
            assert_ne!(a.0, b.0, "two clones made the same uuid");
            assert_ne!(a.1, b.1, "two clones read the same /dev/urandom");
        }
    }
}

#[tokio::test]
async fn with_clean_snapshots_off_fresh_vms_boot_cold() {
    let h = up(&["--vm", &accel(), "--vm-clean-snapshots", "off"]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let r = run_vm_script(&c, PROBE, &[FC]).await;
    assert_eq!(r.code, 0, "{}", r.text);
    assert_eq!(r.kind(), "cold");
    assert!(
        !h.dir.path().join("data/executor/vm-clean").exists()
            || std::fs::read_dir(h.dir.path().join("data/executor/vm-clean"))
                .unwrap()
                .next()
                .is_none(),
        "no clean snapshot is made"
    );
}

/// Docker in a clone: dockerd is up from the snapshot (not started again),
/// its random ids differ between clones, and what one action created is
/// gone in the next fresh VM.
#[tokio::test]
async fn dockerd_clones_differ_and_keep_nothing() {
    let h = up(&["--vm", &accel()]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let docker = [FC, ("init-dockerd", "true")];
    let script = "docker network ls --format '{{.Name}}' | grep -qx left && echo STALE; \
                  echo net=$(docker network create left); \
                  echo pid=$(cat /var/run/docker.pid)";
    let mut ids = vec![];
    for i in 0..3 {
        let r = run_vm_script(&c, script, &docker).await;
        assert_eq!(r.code, 0, "{}", r.text);
        assert_eq!(r.kind(), "clone", "run {i}: {}", r.text);
        assert!(!r.text.contains("STALE"), "run {i}: {}", r.text);
        let net = field(&r.text, "net").to_string();
        assert_eq!(net.len(), 64, "a network id: {}", r.text);
        ids.push(net);
        eprintln!(
            "dockerd clone {i} ready in {:?} ms, round trip {:?}",
            r.start.as_ref().map(|s| s.ready_millis),
            r.took
        );
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each clone's dockerd made its own id");
}
