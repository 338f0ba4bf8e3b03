//! The attack on shared snapshots: team B runs an action with exactly the
//! properties team A warmed a runner with, on an executor that never ran
//! it. Team A's snapshot is in the CAS and the server's index, but it is
//! scoped to team A: team B gets a fresh VM and none of A's state, while A
//! itself gets its warm runner back on the new executor.

mod common;

use common::remote::*;
use common::vm::*;
use common::*;

#[tokio::test]
async fn a_shared_snapshot_serves_only_the_tenant_that_made_it() {
    let srv = server_with_keys();
    let admin = channel_with_key(&srv, Some("key-admin")).await;
    let team_a = channel_with_key(&srv, Some("key-a")).await;
    let team_b = channel_with_key(&srv, Some("key-b")).await;
    let key_file = srv.dir.path().join("executor.key");
    std::fs::write(&key_file, "key-exec").unwrap();
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into());
    let flags = [
        "--capacity",
        "1",
        "--vm",
        &accel,
        "--api-key-file",
        key_file.to_str().unwrap(),
    ];
    let props = [
        FC,
        ("recycle-runner", "true"),
        ("runner-recycling-key", "same-for-everyone"),
    ];

    let e1 = executor_with(&srv, &srv.addr, "e1", &flags);
    wait_for_vm_on(&admin, "e1").await;
    let r = run_vm_script(&team_a, "echo secret-of-a > /tmp/state", &props).await;
    assert_eq!(r.code, 0, "{}", r.text);
    wait_for_within(&admin, "e1 to share team A's runner", 300, |s| {
        s.shared_snapshots.len() == 1
    })
    .await;

    // e1 goes (its warm VM with it); team B asks for the same runner on e2.
    let e2 = executor_with(&srv, &srv.addr, "e2", &flags);
    wait_for_vm_on(&admin, "e2").await;
    drop(e1);
    let look = "cat /tmp/state 2>/dev/null || echo fresh";
    let r = run_vm_script(&team_b, look, &props).await;
    assert_eq!(r.code, 0, "{}", r.text);
    assert!(
        !r.text.contains("secret-of-a"),
        "team B saw team A's runner:\n{}",
        r.text
    );
    assert!(r.text.contains("fresh"), "{}", r.text);
    assert_ne!(r.kind(), "fetched", "{}", r.text);

    // Team A's own next action on e2 does start from its snapshot: the
    // scoping, not a failed fetch, kept team B out.
    let r = run_vm_script(&team_a, look, &props).await;
    assert_eq!(r.code, 0, "{}", r.text);
    assert!(r.text.contains("secret-of-a"), "{}", r.text);
    assert_eq!(r.kind(), "fetched", "{}", r.text);
    drop(e2);
}
