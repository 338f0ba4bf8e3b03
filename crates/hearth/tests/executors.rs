//! `hearth server` with separate `hearth executor` processes: remote input
//! fetch and output upload, waiting for executors, queue timeout, and an
//! executor killed in the middle of an action; warm-runner affinity over the
//! executor protocol.

mod common;

use std::process::Command as Proc;
use std::time::{Duration, Instant};

use common::remote::{executor, status, wait_for};
use common::worker::FakeExecutor;
use common::*;
use hearth_proto::worker::StatusResponse;
use hearth_scheduler::{affinity_key, Platform};
use tonic::Code;

#[tokio::test]
async fn remote_executor_fetches_inputs_and_uploads_outputs() {
    let h = server(&[]);
    let c = channel(&h).await;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 97) as u8).collect();
    let mut spec = ActionSpec::new(
        "wc -c < big.bin > out/count && cat small.txt >> out/count && cp big.bin out/copy",
    );
    spec.files = vec![("small.txt", b"small\n"), ("big.bin", &big)];
    spec.outputs = vec!["out/count", "out/copy"];
    // The big input and output stream over ByteStream on the executor side,
    // through files.
    let action = make_action(&c, &spec).await;
    // Queued before any executor exists: it waits rather than failing.
    let pending = tokio::spawn({
        let c = c.clone();
        async move { execute(&c, action, false).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&c).await.queued_actions, 1);
    let _e = executor(&h, "remote-1");
    let (_, resp) = pending.await.unwrap().unwrap();
    let r = resp.result.unwrap();
    assert_eq!(r.exit_code, 0, "{:?}", resp.status);
    assert_eq!(r.execution_metadata.unwrap().worker, "remote-1");
    let out = read_blob(&c, r.output_files[0].digest.as_ref().unwrap()).await;
    assert_eq!(out.as_ref(), b"3000000\nsmall\n");
    let copy = r.output_files[1].digest.clone().unwrap();
    assert_eq!(
        copy,
        hearth_storage::Digest::of(&big).to_proto(),
        "the big output is the input"
    );
    let missing = cas(&c)
        .find_missing_blobs(hearth_proto::reapi::FindMissingBlobsRequest {
            blob_digests: vec![copy],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert!(missing.is_empty(), "the executor uploaded the big output");
}

#[tokio::test]
async fn actions_fail_after_the_queue_timeout_without_executors() {
    let h = server(&["--queue-timeout-secs", "1"]);
    let c = channel(&h).await;
    let action = make_action(&c, &ActionSpec::new("true")).await;
    let (_, resp) = execute(&c, action, false).await.unwrap();
    let status = resp.status.unwrap();
    assert_eq!(status.code, Code::Unavailable as i32);
    assert!(
        status.message.contains("queue timeout"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn killed_executor_mid_action_is_retried_elsewhere() {
    // It never comes back: after the grace period its action runs elsewhere.
    let h = server(&["--executor-grace-secs", "1"]);
    let c = channel(&h).await;
    let e1 = executor(&h, "victim-a");
    let e2 = executor(&h, "victim-b");
    wait_for(&c, "two executors", |s| s.executors.len() == 2).await;
    let mut spec = ActionSpec::new("sleep 2; echo survived > out.txt");
    spec.outputs = vec!["out.txt"];
    let action = make_action(&c, &spec).await;
    let run = tokio::spawn({
        let c = c.clone();
        async move { execute(&c, action, false).await }
    });
    let s = wait_for(&c, "the action to start", |s| {
        s.executors.iter().any(|e| e.running == 1)
    })
    .await;
    let busy = s
        .executors
        .iter()
        .find(|e| e.running == 1)
        .unwrap()
        .executor_id
        .clone();
    let (mut victim, _other) = if busy == "victim-a" {
        (e1, e2)
    } else {
        (e2, e1)
    };
    victim.0.kill().unwrap();
    let _ = victim.0.wait();
    let (_, resp) = run.await.unwrap().unwrap();
    let r = resp.result.unwrap();
    assert_eq!(r.exit_code, 0, "{:?}", resp.status);
    assert_ne!(
        r.execution_metadata.unwrap().worker,
        busy,
        "finished on the survivor"
    );
    assert_eq!(
        read_blob(&c, r.output_files[0].digest.as_ref().unwrap())
            .await
            .as_ref(),
        b"survived\n"
    );
    let s = status(&c).await;
    assert_eq!(s.executors.len(), 1);
}

#[tokio::test]
async fn status_command_prints_a_summary() {
    let h = up(&["--executor-id", "local-exec"]);
    let c = channel(&h).await;
    wait_for(&c, "the local executor", |s| s.executors.len() == 1).await;
    let out = Proc::new(bin())
        .args(["status", "--server", &h.addr.replace("http://", "grpc://")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("executors  1"), "{text}");
    assert!(
        text.contains("local-exec") && text.contains("isolation=none"),
        "{text}"
    );
    assert!(text.contains("0 queued, 0 running"), "{text}");
}

fn status_text(h: &Hearth) -> String {
    let out = Proc::new(bin())
        .args(["status", "--server", &h.addr.replace("http://", "grpc://")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn status_says_why_an_executor_offers_no_microvms() {
    // Turned off.
    let h = up(&["--executor-id", "vm-off"]);
    let c = channel(&h).await;
    wait_for(&c, "the local executor", |s| s.executors.len() == 1).await;
    let text = status_text(&h);
    assert!(
        text.contains("microVMs unavailable: off (--vm off)"),
        "{text}"
    );

    // Asked for, but the setup fails: the executor still joins, without
    // firecracker, and says why, in status and to an action that wants one.
    let tmp = tempfile::tempdir().unwrap();
    let kernel_dir = tmp.path().join("no-kernel-here");
    let h = up(&[
        "--executor-id",
        "no-kernel",
        "--vm",
        "auto",
        "--vm-kernel-dir",
        kernel_dir.to_str().unwrap(),
    ]);
    let c = channel(&h).await;
    let s = wait_for(&c, "the local executor", |s| s.executors.len() == 1).await;
    assert_eq!(s.executors[0].isolation_types, ["none"]);
    let want = format!("no guest kernel in {}", kernel_dir.display());
    assert!(
        s.executors[0].vm_unavailable.contains(&want),
        "{:?}",
        s.executors[0]
    );
    let text = status_text(&h);
    let line = text
        .lines()
        .find(|l| l.contains("microVMs unavailable"))
        .unwrap_or_else(|| panic!("no reason shown: {text}"));
    assert!(line.contains(&want), "{text}");

    let mut spec = ActionSpec::new("true");
    spec.platform = vec![("workload-isolation-type", "firecracker")];
    let action = make_action(&c, &spec).await;
    let err = execute(&c, action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&want),
        "the error says why no executor has VMs: {err:?}"
    );
}

fn warm_runners(s: &StatusResponse, id: &str) -> Option<u32> {
    s.executors
        .iter()
        .find(|e| e.executor_id == id)
        .map(|e| e.warm_runners)
}

#[tokio::test]
async fn recycled_action_goes_to_the_executor_reporting_its_warm_key() {
    let h = server(&[]);
    let c = channel(&h).await;
    let pairs = [("recycle-runner", "true")];
    let key = affinity_key("", "", &Platform::from_pairs(pairs));
    let _cold = FakeExecutor::connect(&c, "cold", vec![]).await;
    let mut warm = FakeExecutor::connect(&c, "warm", vec![key.clone()]).await;
    let s = wait_for(&c, "two executors", |s| s.executors.len() == 2).await;
    assert_eq!(warm_runners(&s, "warm"), Some(1));
    assert_eq!(warm_runners(&s, "cold"), Some(0));

    let mut spec = ActionSpec::new("true");
    spec.platform = pairs.to_vec();
    spec.do_not_cache = true;
    let action = make_action(&c, &spec).await;
    let run = tokio::spawn({
        let c = c.clone();
        async move { execute(&c, action, true).await }
    });
    let op = tokio::time::timeout(Duration::from_secs(20), warm.assignment())
        .await
        .expect("the warm executor gets the action");
    let s = status(&c).await;
    assert_eq!(warm_runners(&s, "warm"), Some(0), "its runner is taken");
    warm.finish(op, vec![key.clone(), key]);
    let (_, resp) = run.await.unwrap().unwrap();
    assert_eq!(resp.status.unwrap_or_default().code, 0);
    let s = wait_for(&c, "the new warm report", |s| {
        warm_runners(s, "warm") == Some(2)
    })
    .await;
    assert_eq!(s.running_actions, 0);
}

/// Cancelling a running action frees its slot as soon as the executor has
/// killed it, and the queued action behind it starts at once (it used to
/// wait for an unrelated event or the queue timeout).
#[tokio::test]
async fn cancelling_a_running_action_starts_the_next_at_once() {
    use hearth_proto::longrunning::{operations_client::OperationsClient, CancelOperationRequest};
    let h = up(&["--capacity", "1"]);
    let c = channel(&h).await;
    let mut long = ActionSpec::new("sleep 120");
    long.do_not_cache = true;
    let long = make_action(&c, &long).await;
    let mut stream = exec(&c)
        .execute(hearth_proto::reapi::ExecuteRequest {
            action_digest: Some(long.to_proto()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let name = loop {
        let op = stream.message().await.unwrap().expect("an update");
        if stage_of(&op) == hearth_proto::reapi::execution_stage::Value::Executing as i32 {
            break op.name;
        }
    };
    let next = make_action(&c, &ActionSpec::new("echo next")).await;
    let c2 = c.clone();
    let run = tokio::spawn(async move { execute(&c2, next, true).await.unwrap().1 });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!run.is_finished(), "one slot: the second action waits");
    OperationsClient::new(c.clone())
        .cancel_operation(CancelOperationRequest { name })
        .await
        .unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the queued action ran after the cancel")
        .unwrap();
    assert_eq!(response.result.unwrap().exit_code, 0);
    eprintln!("next action done {:?} after the cancel", started.elapsed());
}

/// An input an executor could not fetch comes back to the client as REAPI
/// says: FAILED_PRECONDITION with a PreconditionFailure naming the blob, so
/// Bazel re-uploads it and retries.
#[tokio::test]
async fn inputs_an_executor_misses_come_back_as_precondition_failures() {
    use hearth_proto::worker::Finished;
    use prost::Message;
    let h = server(&[]);
    let c = channel(&h).await;
    let mut e = FakeExecutor::connect(&c, "e1", vec![]).await;
    let action = make_action(&c, &ActionSpec::new("true")).await;
    let c2 = c.clone();
    let run = tokio::spawn(async move { execute(&c2, action, true).await.unwrap().1 });
    let op = e.assignment().await;
    let gone = hearth_storage::Digest::of(b"evicted input");
    e.send(Finished {
        operation_name: op,
        status_code: Code::FailedPrecondition as i32,
        status_message: "1 input blob(s) missing from the CAS".into(),
        missing_blobs: vec![hearth_proto::worker::Digest {
            hash: gone.hash_hex(),
            size_bytes: gone.size() as i64,
        }],
        ..Default::default()
    });
    let status = run.await.unwrap().status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    let violations: Vec<_> = status
        .details
        .iter()
        .filter(|a| a.type_url == hearth_proto::PRECONDITION_FAILURE_TYPE_URL)
        .flat_map(|a| {
            hearth_proto::PreconditionFailure::decode(a.value.as_slice())
                .unwrap()
                .violations
        })
        .collect();
    assert_eq!(violations.len(), 1, "{status:?}");
    assert_eq!(violations[0].r#type, "MISSING");
    assert_eq!(
        violations[0].subject,
        format!("blobs/{}/{}", gone.hash_hex(), gone.size())
    );
}
