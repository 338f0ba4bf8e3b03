//! Separate `hearth executor` processes for the integration tests, and
//! polling the server's status.

use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use hearth_proto::worker::{
    worker_service_client::WorkerServiceClient, StatusRequest, StatusResponse,
};

use super::{bin, Channel, Hearth};

/// A `hearth executor` process, killed when dropped.
pub struct Executor(pub Child);

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hearth executor` (host runner, capacity 1) with `id`, connected to `h`.
pub fn executor(h: &Hearth, id: &str) -> Executor {
    executor_at(h, &h.addr, id)
}

/// The same, connected to `addr` (a proxy in front of `h`, say).
pub fn executor_at(h: &Hearth, addr: &str, id: &str) -> Executor {
    executor_with(h, addr, id, &["--capacity", "1", "--vm", "off"])
}

/// `hearth executor` with `id`, connected to `addr`, with `args` (its
/// capacity, runners, registries).
pub fn executor_with(h: &Hearth, addr: &str, id: &str, args: &[&str]) -> Executor {
    spawn_executor(h, addr, id, args, Stdio::inherit())
}

/// As `executor_with`, its log (warnings and errors) written to `log`.
pub fn executor_logging(
    h: &Hearth,
    addr: &str,
    id: &str,
    args: &[&str],
    log: &std::path::Path,
) -> Executor {
    let file = std::fs::File::create(log).expect("creating the executor's log");
    spawn_executor(h, addr, id, args, Stdio::from(file))
}

fn spawn_executor(h: &Hearth, addr: &str, id: &str, args: &[&str], stderr: Stdio) -> Executor {
    let work = h.dir.path().join(format!("exec-{id}"));
    let child = Proc::new(bin())
        .args([
            "executor",
            "--server",
            &addr.replace("http://", "grpc://"),
            "--executor-id",
            id,
        ])
        .args(args)
        .arg("--work-dir")
        .arg(&work)
        // HEARTH_TEST_EXECUTOR_LOG (a HEARTH_LOG filter) to see what the
        // executors do while a test runs.
        .env(
            "HEARTH_LOG",
            std::env::var("HEARTH_TEST_EXECUTOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starting executor");
    Executor(child)
}

pub async fn status(c: &Channel) -> StatusResponse {
    WorkerServiceClient::new(c.clone())
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls `hearth status` until `cond` holds (20 s at most).
pub async fn wait_for(
    c: &Channel,
    what: &str,
    cond: impl Fn(&StatusResponse) -> bool,
) -> StatusResponse {
    wait_for_within(c, what, 20, cond).await
}

/// Polls `hearth status` until `cond` holds (`secs` at most).
pub async fn wait_for_within(
    c: &Channel,
    what: &str,
    secs: u64,
    cond: impl Fn(&StatusResponse) -> bool,
) -> StatusResponse {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(c).await;
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the executor `id` offers microVMs.
pub async fn wait_for_vm_on(c: &Channel, id: &str) {
    wait_for_within(c, &format!("{id} to offer firecracker"), 180, |s| {
        s.executors
            .iter()
            .any(|e| e.executor_id == id && e.isolation_types.iter().any(|t| t == "firecracker"))
    })
    .await;
}
