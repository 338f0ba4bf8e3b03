//! Several replicas on one Redis (`--state`) and one bucket: the queue, the
//! operations and the leases of running work are shared, so an action runs
//! on whichever replica's executor is free, is watched from any replica, and
//! survives the death of the replica that ran it.

mod common;

use std::time::Duration;

use common::remote::{executor_with, status, wait_for, wait_for_within};
use common::*;
use hearth_proto::longrunning::{operations_client::OperationsClient, GetOperationRequest};
use hearth_proto::reapi::{ExecuteRequest, WaitExecutionRequest};
use hearth_testkit::{Redis, SeaweedFs};

/// Two replicas sharing `redis` and a bucket on `s3`, each with a
/// metrics listener (the addresses are returned too).
fn replicas(s3: &SeaweedFs, redis: &Redis) -> ((Hearth, String), (Hearth, String)) {
    let replica = || {
        let metrics = format!("127.0.0.1:{}", common::web::free_port());
        let mut flags = vec![
            "--state".to_string(),
            redis.url.clone(),
            "--cas-store".into(),
            "s3://hearth/fleet".into(),
            "--metrics-listen".into(),
            metrics.clone(),
        ];
        flags.extend(s3.hearth_flags());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        (server(&flags), metrics)
    };
    (replica(), replica())
}

/// Waits (up to 10 s) until the sum of `metric` on the replica whose
/// metrics are at `at` is `value`.
async fn metric_reaches(at: &str, metric: &str, value: f64) {
    let mut seen = 0.0;
    for _ in 0..50 {
        let page = common::web::get(at, "/metrics", &[]).body;
        seen = common::web::sum(&page, metric, &[]);
        if seen == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{metric} at {at} is {seen}, not {value}");
}

/// Starts Execute and returns its first message and the rest of the
/// stream.
async fn start(
    c: &Channel,
    action: hearth_storage::Digest,
) -> (
    hearth_proto::longrunning::Operation,
    tonic::Streaming<hearth_proto::longrunning::Operation>,
) {
    let mut stream = exec(c)
        .execute(ExecuteRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .expect("Execute")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("the stream")
        .expect("a first message");
    (first, stream)
}

/// Follows the stream to the end (at most 90 s).
async fn finish(
    stream: tonic::Streaming<hearth_proto::longrunning::Operation>,
) -> hearth_proto::reapi::ExecuteResponse {
    tokio::time::timeout(Duration::from_secs(90), follow(stream))
        .await
        .expect("the operation completed within 90 s")
}

async fn follow(
    mut stream: tonic::Streaming<hearth_proto::longrunning::Operation>,
) -> hearth_proto::reapi::ExecuteResponse {
    loop {
        let op = stream
            .message()
            .await
            .expect("the stream")
            .expect("the stream ended before the operation was done");
        if op.done {
            return response_of(&op);
        }
    }
}

#[tokio::test]
async fn an_action_sent_to_one_replica_runs_on_another_replicas_executor_and_is_watched_from_either(
) {
    let (s3, redis) = (SeaweedFs::start(), Redis::start());
    let ((a, _), (b, b_metrics)) = replicas(&s3, &redis);
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    let _executor = executor_with(&b, &b.addr, "on-b", &["--capacity", "2", "--vm", "off"]);
    wait_for(&cb, "the executor on replica B", |s| {
        s.executors.iter().any(|e| e.executor_id == "on-b")
    })
    .await;

    let action = make_action(
        &ca,
        &ActionSpec {
            outputs: vec!["out"],
            ..ActionSpec::new("sleep 2; echo ran > out")
        },
    )
    .await;
    // Sent through A, which has no executor at all.
    let (first, through_a) = start(&ca, action).await;
    let name = first.name;
    // The same request through B joins it instead of running it twice.
    let (joined, through_b) = start(&cb, action).await;
    assert_eq!(
        joined.name, name,
        "an identical request on another replica joins the one in flight"
    );
    // And B follows it by name.
    let waited = exec(&cb)
        .wait_execution(WaitExecutionRequest { name: name.clone() })
        .await
        .expect("WaitExecution on replica B")
        .into_inner();

    let resp = finish(through_a).await;
    let result = resp.result.clone().expect("a result");
    assert_eq!(result.exit_code, 0, "{result:?}");
    assert_eq!(
        result
            .execution_metadata
            .as_ref()
            .map(|m| m.worker.as_str()),
        Some("on-b"),
        "it ran on replica B's executor"
    );
    let out = result.output_files[0].digest.clone().expect("digest");
    assert_eq!(read_blob(&ca, &out).await, "ran\n");
    for other in [finish(through_b).await, finish(waited).await] {
        assert_eq!(
            other.result, resp.result,
            "every watcher sees the one result"
        );
    }
    let op = OperationsClient::new(ca.clone())
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .expect("GetOperation on replica A")
        .into_inner();
    assert!(op.done);
    assert!(
        status(&ca).await.executors.is_empty(),
        "A never had an executor"
    );
    // B's operator sees it took one action from the shared queue, of two
    // replicas, and holds nothing now.
    metric_reaches(&b_metrics, "hearth_fleet_claimed_total", 1.0).await;
    metric_reaches(&b_metrics, "hearth_fleet_replicas", 2.0).await;
    metric_reaches(&b_metrics, "hearth_fleet_held", 0.0).await;

    let unknown = OperationsClient::new(cb.clone())
        .get_operation(GetOperationRequest {
            name: "operations/none-such".into(),
        })
        .await
        .expect_err("an unknown operation");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn a_replica_killed_mid_action_loses_nothing_its_executor_moves_and_the_action_is_adopted() {
    let (s3, redis) = (SeaweedFs::start(), Redis::start());
    let ((a, a_metrics), (mut b, _)) = replicas(&s3, &redis);
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    let a_url = a.addr.replace("http://", "grpc://");
    let _executor = executor_with(
        &b,
        &b.addr,
        "roamer",
        &["--capacity", "1", "--vm", "off", "--server", &a_url],
    );
    wait_for(&cb, "the executor on replica B", |s| {
        s.executors.iter().any(|e| e.executor_id == "roamer")
    })
    .await;
    let action = make_action(
        &ca,
        &ActionSpec {
            outputs: vec!["out"],
            ..ActionSpec::new("sleep 6; echo survived > out")
        },
    )
    .await;
    let (mut op, mut through_a) = start(&ca, action).await;
    // Executing, as the client on A sees it: B has recorded in Redis which
    // executor runs it (the same write). A replica that dies before that
    // write leaves work only the queue can give back, to be run again.
    let executing = hearth_proto::reapi::execution_stage::Value::Executing as i32;
    while stage_of(&op) != executing {
        assert!(!op.done, "it completed before B was killed");
        op = through_a
            .message()
            .await
            .expect("the stream")
            .expect("the operation before it completed");
    }

    // The replica running it dies; the client, on A, keeps waiting.
    b.child.kill().expect("kill -9 replica B");
    b.child.wait().expect("reaping replica B");
    wait_for_within(
        &ca,
        "the executor on replica A, still running it",
        30,
        |s| {
            s.executors
                .iter()
                .any(|e| e.executor_id == "roamer" && e.running == 1)
        },
    )
    .await;
    let resp = finish(through_a).await;
    let result = resp.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{result:?}");
    let out = result.output_files[0].digest.clone().expect("digest");
    assert_eq!(read_blob(&ca, &out).await, "survived\n");
    // A took the running action over; it never took it from the queue, as
    // it would have to run it again once B's lease lapsed.
    metric_reaches(&a_metrics, "hearth_fleet_adopted_total", 1.0).await;
    let page = common::web::get(&a_metrics, "/metrics", &[]).body;
    assert_eq!(
        common::web::sum(&page, "hearth_fleet_claimed_total", &[]),
        0.0,
        "the action ran again instead of being adopted"
    );
}
