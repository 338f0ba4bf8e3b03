//! Host-side deadlines on a wedged VM, through a real `hearth up` with one
//! slot (`--capacity 1`) and short bounds: a wedged QEMU or guest agent is
//! detected within its deadline, its VM is killed, and the slot serves the
//! next action.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::vm::*;
use common::*;

fn accel() -> String {
    std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into())
}

/// Fails the test instead of hanging it (as a wedged VM did before the
/// deadlines).
async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .expect("hung: no deadline freed the slot")
}

fn vms(h: &Hearth) -> std::path::PathBuf {
    h.dir.path().join("data/executor/vms")
}

/// The pid of the one QEMU running under `vms`.
fn only_qemu(vms: &Path) -> u32 {
    let pids = qemu_pids(vms);
    let pids: Vec<u32> = pids.lines().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "QEMUs: {pids:?}");
    pids[0]
}

/// A recycled VM whose QEMU is stopped behind Hearth's back (SIGSTOP, so
/// QMP `cont` gets no answer) is killed when the next action tries to
/// resume it, and that action, whose command has not started, runs in a
/// fresh VM instead.
#[tokio::test]
async fn a_wedged_pooled_vm_is_killed_and_the_action_boots_a_fresh_one() {
    let h = up(&[
        "--vm",
        &accel(),
        "--capacity",
        "1",
        "--vm-control-timeout-secs",
        "3",
    ]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let warm = [FC, ("recycle-runner", "true")];
    let (code, out, cold) = run_script(&c, "echo kept > /tmp/state", &warm).await;
    assert_eq!(code, 0, "{out}");
    let pooled = only_qemu(&vms(&h));
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pooled.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());

    let (code, out, took) = within(
        Duration::from_secs(300),
        run_script(&c, "cat /tmp/state 2>/dev/null || echo fresh", &warm),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fresh"), "ran in the wedged VM: {out}");
    assert!(
        !Path::new(&format!("/proc/{pooled}")).exists(),
        "the wedged QEMU was not killed"
    );
    eprintln!("cold {cold:?}; past a wedged pooled VM (3 s bound) then cold {took:?}");
}

/// The attack: the first action leaves a process squatting on dockerd's
/// socket, answering one byte a second, forever. Before the agent's probe
/// had an overall bound this wedged the next action's `StartDockerd` in the
/// guest until the host's deadline (UNAVAILABLE after 65 s). Now the probe
/// gives up on the squatter within 2 s, dockerd takes its socket back, and
/// the next action runs.
#[tokio::test]
async fn a_process_squatting_on_the_docker_socket_cannot_wedge_the_next_action() {
    let h = up(&[
        "--vm",
        &accel(),
        "--capacity",
        "1",
        "--vm-control-timeout-secs",
        "5",
        // Room for a real dockerd start in the first action on a busy
        // host (~20 s of the first action's 30 s here).
        "--vm-dockerd-timeout-secs",
        "60",
    ]);
    let c = channel(&h).await;
    wait_for_vm_executor(&c).await;
    let docker = [FC, ("init-dockerd", "true"), ("recycle-runner", "true")];
    let dribble = r#"
        pid=$(cat /var/run/docker.pid) && kill $pid && while kill -0 $pid 2>/dev/null; do sleep 0.1; done
        rm -f /var/run/docker.sock
        (cd / && exec perl -MIO::Socket::UNIX -e '
            my $s = IO::Socket::UNIX->new(Local => "/var/run/docker.sock", Listen => 5) or die $!;
            $SIG{CHLD} = "IGNORE";
            while (1) {
                my $c = $s->accept or next;
                next if fork;
                $c->autoflush(1);
                while (print $c "H") { sleep 1 }
                exit;
            }' </dev/null >/dev/null 2>&1) &
        until [ -S /var/run/docker.sock ]; do sleep 0.05; done
        echo dribbling"#;
    let (code, out, first) = run_script(&c, dribble, &docker).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dribbling"), "{out}");
    let pooled = only_qemu(&vms(&h));

    let t = Instant::now();
    let (code, out, _) = within(
        Duration::from_secs(300),
        run_script(&c, "echo next", &docker),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("next"), "{out}");
    assert!(
        took < Duration::from_secs(65),
        "held until the host deadline: {took:?}"
    );
    assert_eq!(
        qemu_pids(&vms(&h)),
        pooled.to_string(),
        "the same VM served it, recycled again"
    );
    eprintln!("boot and dockerd {first:?}; past the squatter {took:?}");
}
