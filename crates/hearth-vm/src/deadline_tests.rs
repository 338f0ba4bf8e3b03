//! Deadlines against a fake guest agent and a fake QEMU that accept
//! connections but never answer: each wait ends within its bound, and a VM
//! met by an expired deadline is killed, never handed to an action.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_executor::{RunSpec, Runner};
use hearth_guest::protocol::Request;
use hearth_scheduler::Platform;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::pool::{Lease, VmDir};
use crate::qemu::QMP_SOCK;
use crate::qmp::Qmp;
use crate::sockdir::SocketDir;
use crate::{Accel, AgentClient, QemuVm, VmError, VmRunner, VmRunnerConfig, VmSize, VmSpec, Vmm};

const CONTROL: Duration = Duration::from_millis(200);
/// Far below the bounds a wedged call would never reach: a call that ends
/// within this ended because of its deadline.
const SLACK: Duration = Duration::from_secs(5);

/// How the fake QEMU's QMP socket behaves.
#[derive(Clone, Copy)]
enum FakeQmp {
    /// Accepts, never says a word.
    Silent,
    /// Greets and negotiates, then answers nothing.
    GreetsOnly,
}

/// Serves `qmp.sock` in `run` as `how` says, holding every connection open.
fn serve_qmp(run: &SocketDir, how: FakeQmp) {
    let listener = run.bind(QMP_SOCK).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            if let FakeQmp::GreetsOnly = how {
                let _ = s.write_all(b"{\"QMP\": {}}\n{\"return\": {}}\n").await;
            }
            held.push(s);
        }
    });
}

/// `fut`'s output; a panic if it hangs (as it would without deadlines).
async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(SLACK, fut)
        .await
        .expect("hung: no deadline ended the wait")
}

fn wedged(e: &VmError) -> bool {
    matches!(e, VmError::Timeout { .. })
}

#[tokio::test]
async fn an_agent_that_never_answers_times_out_within_the_bound() {
    let (host, _guest) = UnixStream::pair().unwrap();
    let mut agent = AgentClient::new(host, CONTROL);
    let t = Instant::now();
    let e = within(agent.call(&Request::Ping)).await.unwrap_err();
    assert!(wedged(&e), "{e}");
    assert_eq!(
        e.to_string(),
        "the guest agent did not answer Ping within 200ms"
    );
    let req = Request::StartDockerd {
        args: vec![],
        timeout_secs: 1,
    };
    let e = within(agent.call_within(&req, Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the guest agent did not answer StartDockerd within 300ms"
    );
    assert!(t.elapsed() < SLACK, "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_qemu_that_never_answers_qmp_times_out_within_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let silent = SocketDir::create_private(&tmp.path().join("silent")).unwrap();
    serve_qmp(&silent, FakeQmp::Silent);
    let e = within(Qmp::connect(&silent, QMP_SOCK, CONTROL))
        .await
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "QEMU did not greet on QMP within 200ms");

    let mute = SocketDir::create_private(&tmp.path().join("mute")).unwrap();
    serve_qmp(&mute, FakeQmp::GreetsOnly);
    let mut qmp = Qmp::connect(&mute, QMP_SOCK, CONTROL).await.unwrap();
    let e = within(qmp.execute("cont", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "QEMU did not answer QMP cont within 200ms");
    assert!(t.elapsed() < SLACK, "{:?}", t.elapsed());
}

/// Boots "VMs" whose QEMU is a `sleep` and whose agent and QMP accept but
/// never answer; remembers their pids.
struct WedgedVmm {
    pids: Mutex<Vec<u32>>,
    /// The guest ends of the agent channels, held open.
    guests: Mutex<Vec<UnixStream>>,
}

impl WedgedVmm {
    fn new() -> Arc<Self> {
        Arc::new(WedgedVmm {
            pids: Mutex::new(vec![]),
            guests: Mutex::new(vec![]),
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.pids.lock().unwrap().clone()
    }
}

#[async_trait]
impl Vmm for WedgedVmm {
    async fn boot(&self, spec: &VmSpec) -> Result<QemuVm, VmError> {
        let run = SocketDir::create_private(&spec.run_dir).unwrap();
        serve_qmp(&run, FakeQmp::Silent);
        let child = tokio::process::Command::new("sleep")
            .arg("600")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.pids.lock().unwrap().push(child.id().unwrap());
        let (host, guest) = UnixStream::pair().unwrap();
        self.guests.lock().unwrap().push(guest);
        Ok(QemuVm::fake(child, AgentClient::new(host, CONTROL), run))
    }

    fn accel(&self) -> Accel {
        Accel::Tcg
    }

    fn identity(&self) -> String {
        "wedged".into()
    }
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

const SIZE: VmSize = VmSize {
    vcpus: 1,
    memory_mib: 256,
    disk_bytes: 64 << 20,
};

fn runner(vmm: Arc<WedgedVmm>, work: &Path) -> VmRunner {
    let config = VmRunnerConfig {
        work_dir: work.join("vms"),
        default_image: work.join("default.ext4"),
        default_size: SIZE,
        max_size: SIZE,
        forwards: vec![],
        docker_mirrors: vec![],
        insecure_registries: vec![],
        clean_dir: None,
        clean_max_bytes: 0,
        pool_max_vms: 4,
        pool_max_memory_mib: 8192,
        snapshot_dir: None,
        snapshot_max: 0,
        dockerd_timeout: Duration::from_millis(300),
    };
    VmRunner::new(vmm, None, config, None)
}

#[tokio::test]
async fn a_wedged_agent_fails_the_action_unavailable_and_its_vm_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(ws.join("root")).unwrap();
    let vmm = WedgedVmm::new();
    let runner = runner(vmm.clone(), tmp.path());
    let spec = RunSpec {
        input_root: ws.join("root"),
        working_directory: String::new(),
        output_paths: vec![],
        arguments: vec!["true".into()],
        environment: vec![],
        timeout: Duration::from_secs(600),
        stdout_path: ws.join("stdout"),
        stderr_path: ws.join("stderr"),
        platform: Platform::from_pairs([
            ("workload-isolation-type", "firecracker"),
            ("init-dockerd", "true"),
        ]),
        instance_name: String::new(),
        tenant: String::new(),
        shared_snapshot: None,
    };
    let t = Instant::now();
    let e = within(runner.run(&spec, CancellationToken::new()))
        .await
        .unwrap_err();
    assert!(t.elapsed() < SLACK, "{:?}", t.elapsed());
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert_eq!(
        e.to_string(),
        "microVM: the guest agent did not answer StartDockerd within 500ms; the VM was killed"
    );
    let pids = vmm.pids();
    assert_eq!(pids.len(), 1);
    assert!(gone(pids[0]), "the VM's QEMU still runs");
    assert!(runner.warm_keys().is_empty(), "the VM was kept");
}

#[tokio::test]
async fn a_pooled_vm_whose_qemu_is_wedged_is_killed_not_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(ws.join("root")).unwrap();
    let vmm = WedgedVmm::new();
    let runner = runner(vmm.clone(), tmp.path());
    let dir = tmp.path().join("vms/pooled");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = runner.vm_spec(&dir, &tmp.path().join("default.ext4"), 1, 256, false, true);
    let vm = vmm.boot(&spec).await.unwrap();
    let lease = Lease {
        vm,
        dir: VmDir(dir.clone()),
        spec,
        work_image: dir.join("work.img"),
        work_size: 128 << 20,
        out_image: dir.join("out.img"),
        out_size: 1 << 20,
        pending: vec![],
        dockerd_up: false,
    };
    assert!(runner.parking.pool.put("key".into(), lease, 256).is_empty());
    let t = Instant::now();
    assert!(
        within(runner.warm("key", crate::runner::Inputs { dir: &ws, bytes: 0 }))
            .await
            .is_none(),
        "a VM whose QEMU does not answer `cont` was handed out"
    );
    assert!(t.elapsed() < SLACK, "{:?}", t.elapsed());
    assert!(gone(vmm.pids()[0]), "the wedged VM's QEMU still runs");
    assert!(runner.warm_keys().is_empty());
    assert!(!dir.exists(), "the VM's directory is left");
}
