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

/// A burst of three actions with one runner key on a three-slot executor,
/// after one warm-up: the parked VM serves one, clones of the snapshot
/// taken when it was parked serve the others, and all three see the
/// warm-up's file and its background process.
#[tokio::test]
async fn a_burst_of_equal_key_actions_is_served_by_clones_of_the_warm_vm() {
    let h = up(&["--vm", &accel(), "--capacity", "3"]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let key = [
        FC,
        ("recycle-runner", "true"),
        ("runner-recycling-key", "burst"),
    ];
    let warm_up = format!("echo kept > /tmp/state; {LEAVE_BACKGROUND_PROCESS}");
    let r = run_vm_script(&c, &warm_up, &key).await;
    assert_eq!(r.code, 0, "{}", r.text);
    // Distinct actions (a different echo each), so none is deduplicated.
    let probe = |i: usize| {
        format!(
            "echo run {i}; cat /tmp/state 2>/dev/null || echo fresh; \
             kill -0 $(cat /tmp/bg) 2>/dev/null && echo bg-alive; true"
        )
    };
    let (p0, p1, p2) = (probe(0), probe(1), probe(2));
    let (a, b, d) = tokio::join!(
        run_vm_script(&c, &p0, &key),
        run_vm_script(&c, &p1, &key),
        run_vm_script(&c, &p2, &key)
    );
    let mut kinds = vec![];
    for r in [&a, &b, &d] {
        assert_eq!(r.code, 0, "{}", r.text);
        assert!(
            r.text.contains("kept") && r.text.contains("bg-alive"),
            "every action of the burst sees the warm state ({}):\n{}",
            r.kind(),
            r.text
        );
        eprintln!(
            "burst: {} ready in {:?} ms",
            r.kind(),
            r.start.as_ref().map(|s| s.ready_millis)
        );
        kinds.push(r.kind().to_string());
    }
    kinds.sort();
    assert_eq!(
        kinds,
        ["clone", "clone", "resume"],
        "one resumes the parked VM, two are its clones"
    );
    // The clones were parked too: the next three all resume.
    let (p3, p4, p5) = (probe(3), probe(4), probe(5));
    let (a, b, d) = tokio::join!(
        run_vm_script(&c, &p3, &key),
        run_vm_script(&c, &p4, &key),
        run_vm_script(&c, &p5, &key)
    );
    for r in [&a, &b, &d] {
        assert!(r.text.contains("kept"), "{}", r.text);
        assert_eq!(r.kind(), "resume", "{}", r.text);
    }
}
