//! How long the web view's pages take to render with a full history
//! (10,000 executions kept): prints p50 and max over repeated requests.
//!
//!     cargo run --release -p hearth-web --example render

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use hearth_api::Context;
use hearth_proto::reapi::{ActionResult, ExecuteResponse, ExecutedActionMetadata, OutputFile};
use hearth_scheduler::{ExecutionRecord, RecordBase, Scheduler, SchedulerConfig, HISTORY_CAPACITY};
use hearth_storage::{Digest, MemoryActionCache, MemoryStore};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn ts(t: SystemTime) -> Option<hearth_proto::protobuf::Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some(hearth_proto::protobuf::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn record(i: usize) -> ExecutionRecord {
    let now = SystemTime::now();
    let meta = ExecutedActionMetadata {
        queued_timestamp: ts(now - Duration::from_millis(40)),
        worker_start_timestamp: ts(now - Duration::from_millis(38)),
        input_fetch_start_timestamp: ts(now - Duration::from_millis(37)),
        input_fetch_completed_timestamp: ts(now - Duration::from_millis(30)),
        execution_start_timestamp: ts(now - Duration::from_millis(30)),
        execution_completed_timestamp: ts(now - Duration::from_millis(5)),
        output_upload_start_timestamp: ts(now - Duration::from_millis(5)),
        output_upload_completed_timestamp: ts(now),
        ..Default::default()
    };
    let response = ExecuteResponse {
        result: Some(ActionResult {
            exit_code: i.is_multiple_of(7) as i32,
            output_files: (0..5)
                .map(|f| OutputFile {
                    path: format!("bazel-out/k8-fastbuild/bin/lib{i}/f{f}.o"),
                    digest: Some(Digest::of(format!("{i}-{f}").as_bytes()).to_proto()),
                    ..Default::default()
                })
                .collect(),
            execution_metadata: Some(meta),
            ..Default::default()
        }),
        status: Some(Default::default()),
        ..Default::default()
    };
    let base = RecordBase {
        operation_name: format!("operations/{:08x}-0000-4000-8000-{i:012x}", i * 7919),
        tenant: format!("team-{}", i % 5),
        instance_name: String::new(),
        action_digest: Digest::of(&i.to_le_bytes()),
        arguments: vec![
            "/usr/bin/gcc".into(),
            "-c".into(),
            format!("lib{i}/src.c"),
            "-o".into(),
            format!("bazel-out/k8-fastbuild/bin/lib{i}/src.o"),
        ],
        platform: vec![("OSFamily".into(), "Linux".into())],
        isolation: "none".into(),
        executor: Some("executor-1".into()),
        attempts: 1,
        queued_at: now - Duration::from_millis(40),
    };
    ExecutionRecord::new(base, &response)
}

async fn time(app: &axum::Router, path: &str, n: usize) -> (Duration, Duration, usize) {
    let mut took = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let req = http::Request::get(path)
            .body(Body::empty())
            .expect("request");
        let t = Instant::now();
        let resp = app.clone().oneshot(req).await.expect("response");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        bytes = resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len();
        took.push(t.elapsed());
    }
    took.sort();
    (took[n / 2], took[n - 1], bytes)
}

#[tokio::main]
async fn main() {
    let scheduler = Scheduler::new(SchedulerConfig::default());
    let ctx = Context::new(
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryActionCache::new(0)),
        scheduler.clone(),
    );
    let history = scheduler.history();
    for i in 0..HISTORY_CAPACITY {
        history.record(record(i));
    }
    let app = hearth_web::router(ctx, "0.0.0.0:1986".parse().expect("address"));
    let last = format!(
        "/executions/operations/{:08x}-0000-4000-8000-{:012x}",
        7919 * 17,
        17
    );
    println!(
        "| page ({} executions kept) | p50 | max | bytes |",
        history.len()
    );
    println!("|---|---|---|---|");
    for path in [
        "/executions",
        "/executions?status=failed",
        "/executions?tenant=team-3&skip=1900",
        last.as_str(),
        "/executors",
        "/cache",
    ] {
        let (p50, max, bytes) = time(&app, path, 50).await;
        println!(
            "| `{path}` | {:.2} ms | {:.2} ms | {bytes} |",
            p50.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0
        );
    }
}
