//! What operators see, against the real binary: `/metrics` moves with the
//! work done (and a client making up method names cannot grow its label
//! set), `grpc.health.v1.Health` follows startup and shutdown, and
//! `--log-format json` writes one JSON object per line.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use common::web::{free_port, get, sample, sum};
use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn scrape(addr: &str) -> String {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let a = get(&addr, "/metrics", &[]);
        assert_eq!(a.status, 200, "{}", a.body);
        assert!(
            a.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "Prometheus text format"
        );
        a.body
    })
    .await
    .expect("scrape thread")
}

#[tokio::test]
async fn metrics_move_with_the_work_done() {
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let h = up(&["--metrics-listen", &metrics_addr, "--host-sandbox", "off"]);
    let c = channel(&h).await;
    let before = scrape(&metrics_addr).await;
    assert_eq!(
        sample(&before, "hearth_executions_total"),
        None,
        "nothing ran yet"
    );
    for script in ["echo one", "echo two", "exit 3"] {
        let action = make_action(&c, &ActionSpec::new(script)).await;
        execute(&c, action, false).await.expect("Execute");
    }
    // A cache hit, and a miss through GetActionResult.
    let cached = make_action(&c, &ActionSpec::new("echo one")).await;
    let (_, r) = execute(&c, cached, false).await.expect("Execute");
    assert!(r.cached_result);
    let unknown = make_action(&c, &ActionSpec::new("never run")).await;
    let miss = hearth_proto::reapi::action_cache_client::ActionCacheClient::new(c.clone())
        .get_action_result(hearth_proto::reapi::GetActionResultRequest {
            action_digest: Some(unknown.to_proto()),
            ..Default::default()
        })
        .await;
    assert_eq!(miss.unwrap_err().code(), tonic::Code::NotFound);
    // A made-up method: UNIMPLEMENTED, counted under "unknown".
    let mut raw = tonic::client::Grpc::new(c.clone());
    raw.ready().await.expect("ready");
    let made_up: Result<tonic::Response<()>, _> = raw
        .unary(
            tonic::Request::new(()),
            "/build.bazel.remote.execution.v2.Execution/Exfiltrate"
                .parse()
                .expect("path"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert_eq!(made_up.unwrap_err().code(), tonic::Code::Unimplemented);

    let m = scrape(&metrics_addr).await;
    let execute_ok = sum(
        &m,
        "hearth_grpc_requests_total",
        &[r#"method="Execute""#, r#"code="OK""#],
    );
    assert_eq!(execute_ok, 4.0, "four Execute calls answered OK:\n{m}");
    assert_eq!(
        sum(
            &m,
            "hearth_grpc_requests_total",
            &[r#"method="GetActionResult""#, r#"code="NOT_FOUND""#]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "hearth_grpc_requests_total",
            &[r#"service="unknown""#, r#"method="unknown""#]
        ),
        1.0,
        "the made-up method is counted, but not by its name"
    );
    assert!(
        !m.contains("Exfiltrate"),
        "a client's path never becomes a label"
    );
    assert!(
        sum(
            &m,
            "hearth_grpc_request_duration_seconds_count",
            &[r#"method="BatchUpdateBlobs""#]
        ) >= 1.0
    );
    assert_eq!(
        sum(
            &m,
            "hearth_executions_total",
            &[r#"isolation="none""#, r#"outcome="ok""#]
        ),
        2.0
    );
    assert_eq!(
        sum(&m, "hearth_executions_total", &[r#"outcome="failed""#]),
        1.0
    );
    for stage in [
        "queued",
        "input_fetch",
        "execution",
        "output_upload",
        "worker",
    ] {
        let n = sum(
            &m,
            "hearth_execution_stage_seconds_count",
            &[&format!(r#"stage="{stage}""#), r#"isolation="none""#],
        );
        assert_eq!(n, 3.0, "stage {stage} timed for each run:\n{m}");
    }
    assert_eq!(sum(&m, "hearth_queue_wait_seconds_count", &[]), 3.0);
    assert_eq!(
        sum(
            &m,
            "hearth_action_cache_lookups_total",
            &[r#"result="hit""#]
        ),
        1.0
    );
    // Three Execute lookups missed, and the GetActionResult.
    assert_eq!(
        sum(
            &m,
            "hearth_action_cache_lookups_total",
            &[r#"result="miss""#]
        ),
        4.0
    );
    assert_eq!(
        sum(&m, "hearth_action_cache_writes_total", &[]),
        2.0,
        "failures are not cached"
    );
    assert_eq!(sample(&m, "hearth_executors_connected"), Some(1.0));
    assert_eq!(sample(&m, "hearth_queue_length"), Some(0.0));
    assert_eq!(
        sample(&m, r#"hearth_executor_slots{state="busy"}"#),
        Some(0.0)
    );
    assert!(sample(&m, r#"hearth_executor_slots{state="free"}"#).unwrap_or(0.0) >= 1.0);
    let cas_bytes = sample(&m, "hearth_cas_bytes").expect("hearth_cas_bytes");
    let cas_before = sample(&before, "hearth_cas_bytes").unwrap_or(0.0);
    assert!(
        cas_bytes > cas_before,
        "the CAS grew: {cas_before} → {cas_bytes}"
    );
    assert!(sample(&m, "hearth_cas_blobs").unwrap_or(0.0) >= 6.0);
    assert!(sample(&m, "hearth_cas_limit_bytes").unwrap_or(0.0) > 0.0);
    assert_eq!(sample(&m, "hearth_action_cache_entries"), Some(2.0));
}

#[tokio::test]
async fn health_follows_startup_and_shutdown() {
    // `hearth server`: serving once its storage is open.
    let s = server(&[]);
    let mut health = HealthClient::new(channel(&s).await);
    let check = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Check")
        .into_inner();
    assert_eq!(check.status, ServingStatus::Serving as i32);

    // `hearth up`: serving once its executor joined; not serving as soon as
    // a graceful shutdown starts, while calls in flight still finish.
    let mut h = up(&[]);
    let mut health = HealthClient::new(channel(&h).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("Check")
            .into_inner()
            .status;
        if st == ServingStatus::Serving as i32 {
            break;
        }
        assert_eq!(st, ServingStatus::NotServing as i32);
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch")
        .into_inner();
    let first = watch.message().await.expect("Watch").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let pid = h.child.id().to_string();
    let sent = Proc::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a status within 5 s of SIGTERM")
        .expect("Watch")
        .expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let exited = h.child.wait().expect("waiting for hearth");
    assert!(exited.success(), "{exited}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut child = Proc::new(bin())
        .args(["server", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .env("HEARTH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting hearth");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    while let Some(Ok(line)) = lines.next() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        let serving = v["message"] == "serving";
        seen.push(v);
        if serving {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let serving = seen
        .iter()
        .find(|v| v["message"] == "serving")
        .expect("the serving line");
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "fields are flattened into the object: {serving}"
    );
}
