//! Helpers for tests that run actions in microVMs.

use std::time::{Duration, Instant};

use super::*;

pub const FC: (&str, &str) = ("workload-isolation-type", "firecracker");

/// Shell that leaves `sleep` running in the background out of the
/// workspace (cwd /, output to /dev/null) with its pid in /tmp/bg, and
/// waits until it has exec'd: until then the forked shell still holds the
/// workspace, and the VM would not be recycled.
pub const LEAVE_BACKGROUND_PROCESS: &str =
    "(cd / && exec sleep 900 >/dev/null 2>&1) & echo $! > /tmp/bg; \
     until [ \"$(cat /proc/$!/comm 2>/dev/null)\" = sleep ]; do sleep 0.01; done";

/// `hearth up` with microVMs forced on (software emulation unless KVM works).
pub fn up_vm() -> Hearth {
    let accel = std::env::var("HEARTH_TEST_VM").unwrap_or_else(|_| "auto".into());
    up(&["--vm", &accel])
}

pub async fn wait_for_vm_executor(c: &Channel) {
    use hearth_proto::worker::{worker_service_client::WorkerServiceClient, StatusRequest};
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = WorkerServiceClient::new(c.clone())
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.executors
            .iter()
            .any(|e| e.isolation_types.iter().any(|t| t == "firecracker"))
        {
            return;
        }
        // Tests start one executor (`hearth up`): if it says it has no
        // VMs, none will come, and its reason is the failure.
        if let Some(e) = s.executors.iter().find(|e| !e.vm_unavailable.is_empty()) {
            panic!(
                "executor {} offers no firecracker: {}",
                e.executor_id, e.vm_unavailable
            );
        }
        assert!(
            Instant::now() < deadline,
            "no executor offered firecracker: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn guest_kernel_release() -> String {
    std::fs::read_to_string("/opt/hearth-deps/kernel/release")
        .expect("guest kernel missing: run scripts/install-vm.sh")
        .trim()
        .to_string()
}

pub fn qemu_pids(dir: &std::path::Path) -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("qemu-system.*{}", dir.display())])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub async fn run_script(
    c: &Channel,
    script: &str,
    platform: &[(&str, &str)],
) -> (i32, String, Duration) {
    let r = run_vm_script(c, script, platform).await;
    (r.code, r.text, r.took)
}

/// What a VM action gave back.
pub struct VmRan {
    pub code: i32,
    /// stdout then stderr.
    pub text: String,
    /// The Execute round trip.
    pub took: Duration,
    /// How the runner started (`hearth.worker.v1.RunnerStart`).
    pub start: Option<hearth_proto::worker::RunnerStart>,
}

pub async fn run_vm_script(c: &Channel, script: &str, platform: &[(&str, &str)]) -> VmRan {
    let mut spec = ActionSpec::new(script);
    spec.platform = platform.to_vec();
    // A hang fails the test instead of stalling it.
    spec.timeout_secs = Some(400);
    let action = make_action(c, &spec).await;
    let t = Instant::now();
    let (_, resp) = execute(c, action, true).await.unwrap();
    let took = t.elapsed();
    assert_eq!(
        resp.status.clone().unwrap_or_default().code,
        0,
        "{:?}",
        resp.status
    );
    let r = resp.result.unwrap();
    let out = read_blob(c, r.stdout_digest.as_ref().unwrap()).await;
    let err = read_blob(c, r.stderr_digest.as_ref().unwrap()).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    let start = r.execution_metadata.as_ref().and_then(|m| {
        m.auxiliary_metadata
            .iter()
            .find(|a| a.type_url == hearth_proto::RUNNER_START_TYPE_URL)
            .map(|a| {
                <hearth_proto::worker::RunnerStart as prost::Message>::decode(a.value.as_slice())
                    .expect("RunnerStart decodes")
            })
    });
    VmRan {
        code: r.exit_code,
        text,
        took,
        start,
    }
}

impl VmRan {
    /// The runner start's kind ("" if none was reported).
    pub fn kind(&self) -> &str {
        self.start.as_ref().map_or("", |s| s.kind.as_str())
    }
}

/// Serves `reply` to every connection on a fresh loopback port.
pub fn loopback_service(reply: &'static str) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            use std::io::Write;
            let mut s = s;
            let _ = s.write_all(reply.as_bytes());
        }
    });
    port
}
