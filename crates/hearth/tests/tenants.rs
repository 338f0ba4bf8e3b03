//! A shared deployment, tried as a second tenant playing the attacker would:
//! API keys and capabilities, tenant isolation of results, operations and
//! blobs, and executors that must authenticate and cannot impersonate.

mod common;

use common::worker::FakeExecutor;
use common::*;
use hearth_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use hearth_proto::longrunning::{operations_client::OperationsClient, GetOperationRequest};
use hearth_proto::reapi::{
    action_cache_client::ActionCacheClient, ActionResult, BatchReadBlobsRequest,
    FindMissingBlobsRequest, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
    WaitExecutionRequest,
};
use hearth_proto::worker::{worker_service_client::WorkerServiceClient, Finished, StatusRequest};
use hearth_storage::Digest;
use prost::Message;
use tonic::Code;

/// `hearth up` or `hearth server` (`cmd`) with the test keys.
fn with_keys(cmd: &str) -> Hearth {
    match cmd {
        "up" => {
            let dir = tempfile::tempdir().unwrap();
            let file = keys_file(dir.path());
            up_in(dir, &["--auth-keys", &file])
        }
        _ => server_with_keys(),
    }
}

fn ac(c: &Channel) -> ActionCacheClient<Channel> {
    ActionCacheClient::new(c.clone())
}

async fn get_result(c: &Channel, action: Digest) -> Result<ActionResult, tonic::Status> {
    ac(c)
        .get_action_result(GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn find_missing(c: &Channel, d: Digest) -> Result<Vec<Digest>, tonic::Status> {
    let r = cas(c)
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![d.to_proto()],
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner()
        .missing_blob_digests
        .iter()
        .map(|d| Digest::from_proto(d).unwrap())
        .collect())
}

/// The status code BatchReadBlobs gives for `d`.
async fn batch_read_code(c: &Channel, d: Digest) -> i32 {
    let r = cas(c)
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![d.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.responses[0].status.clone().unwrap_or_default().code
}

async fn bytestream_read(c: &Channel, d: Digest) -> Result<Vec<u8>, tonic::Status> {
    let mut s = ByteStreamClient::new(c.clone())
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend(m.data);
    }
    Ok(out)
}

fn code(r: Result<impl Sized, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[tokio::test]
async fn calls_without_a_valid_key_are_unauthenticated() {
    let h = with_keys("server");
    let anonymous = channel(&h).await;
    let (c, msg) = code(find_missing(&anonymous, Digest::of(b"x")).await);
    assert_eq!(c, Code::Unauthenticated, "{msg}");
    assert!(msg.contains("x-buildbuddy-api-key"), "{msg}");
    let wrong = channel_with_key(&h, Some("key-z")).await;
    let (c, msg) = code(find_missing(&wrong, Digest::of(b"x")).await);
    assert_eq!(
        (c, msg.as_str()),
        (
            Code::Unauthenticated,
            "the API key is not valid on this server"
        )
    );
    // Bearer tokens and BuildBuddy's header work as well as ours.
    let mut req = tonic::Request::new(FindMissingBlobsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer key-a".parse().unwrap());
    let plain = tonic::transport::Channel::from_shared(h.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        hearth_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(plain);
    client.find_missing_blobs(req).await.expect("a bearer key");
    let mut req = tonic::Request::new(FindMissingBlobsRequest::default());
    req.metadata_mut()
        .insert("x-buildbuddy-api-key", "key-a".parse().unwrap());
    client
        .find_missing_blobs(req)
        .await
        .expect("a BuildBuddy header");
}

#[tokio::test]
async fn each_capability_is_required_and_named() {
    let h = with_keys("server");
    let reader = channel_with_key(&h, Some("key-a-read")).await;
    let executor = channel_with_key(&h, Some("key-exec")).await;
    find_missing(&reader, Digest::of(b"x"))
        .await
        .expect("cas-read may look");
    let denied = |r: Result<(), tonic::Status>, capability: &str| {
        let (c, msg) = code(r);
        assert_eq!(c, Code::PermissionDenied, "{msg}");
        assert!(
            msg.contains(&format!("lacks the \"{capability}\" capability")),
            "{msg} should name {capability}"
        );
        assert!(msg.contains("team-a") || msg.contains("fleet"), "{msg}");
        assert!(
            !msg.contains("key-a-read") && !msg.contains("key-exec"),
            "never the key: {msg}"
        );
    };
    denied(upload_result(&reader, &[b"data"]).await, "cas-write");
    denied(
        update_result(&reader, Digest::of(b"action"), ActionResult::default()).await,
        "ac-write",
    );
    denied(
        execute(&reader, Digest::of(b"action"), false)
            .await
            .map(drop),
        "execute",
    );
    denied(
        OperationsClient::new(reader.clone())
            .get_operation(GetOperationRequest {
                name: "operations/x".into(),
            })
            .await
            .map(drop),
        "execute",
    );
    denied(
        FakeExecutor::try_connect(&reader, "rogue", vec![], &[])
            .await
            .map(drop),
        "executor",
    );
    // An executor's key reads and writes blobs, and nothing else.
    upload_result(&executor, &[b"data"])
        .await
        .expect("executor writes blobs");
    denied(
        execute(&executor, Digest::of(b"action"), false)
            .await
            .map(drop),
        "execute",
    );
    denied(
        update_result(&executor, Digest::of(b"action"), ActionResult::default()).await,
        "ac-write",
    );
}

/// BatchUpdateBlobs of `blobs`, as a Result.
async fn upload_result(c: &Channel, blobs: &[&[u8]]) -> Result<(), tonic::Status> {
    use hearth_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest};
    let r = cas(c)
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: blobs
                .iter()
                .map(|b| batch_update_blobs_request::Request {
                    digest: Some(Digest::of(b).to_proto()),
                    data: b.to_vec(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await?;
    for resp in r.into_inner().responses {
        assert_eq!(resp.status.unwrap_or_default().code, 0);
    }
    Ok(())
}

async fn update_result(
    c: &Channel,
    action: Digest,
    result: ActionResult,
) -> Result<(), tonic::Status> {
    ac(c)
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// The attack: team-b, knowing the digests of team-a's action and of its
/// output (from a log, a shared repository…), asks for them every way the
/// API offers. It gets nothing that it did not upload itself.
#[tokio::test]
async fn a_second_tenant_sees_nothing_of_the_first() {
    let h = with_keys("up");
    let a = channel_with_key(&h, Some("key-a")).await;
    let b = channel_with_key(&h, Some("key-b")).await;
    let mut spec = ActionSpec::new("printf secret-of-a > out");
    spec.outputs = vec!["out"];
    let action = make_action(&a, &spec).await;
    let mut stream = exec(&a)
        .execute(hearth_proto::reapi::ExecuteRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let op_name = first.name.clone();
    let mut last = first;
    while !last.done {
        last = stream.message().await.unwrap().unwrap();
    }
    let result = response_of(&last).result.unwrap();
    assert_eq!(result.exit_code, 0);
    let out = Digest::from_proto(result.output_files[0].digest.as_ref().unwrap()).unwrap();
    assert_eq!(bytestream_read(&a, out).await.unwrap(), b"secret-of-a");
    get_result(&a, action).await.expect("team-a's own result");

    assert_eq!(code(get_result(&b, action).await).0, Code::NotFound);
    let (c, msg) = code(execute(&b, action, false).await);
    assert_eq!(
        c,
        Code::FailedPrecondition,
        "team-b does not have the inputs: {msg}"
    );
    for r in [
        code(
            OperationsClient::new(b.clone())
                .get_operation(GetOperationRequest {
                    name: op_name.clone(),
                })
                .await,
        ),
        code(
            exec(&b)
                .wait_execution(WaitExecutionRequest {
                    name: op_name.clone(),
                })
                .await,
        ),
    ] {
        assert_eq!(r.0, Code::NotFound, "{}", r.1);
    }
    assert_eq!(batch_read_code(&b, out).await, Code::NotFound as i32);
    assert_eq!(code(bytestream_read(&b, out).await).0, Code::NotFound);
    assert_eq!(
        find_missing(&b, out).await.unwrap(),
        vec![out],
        "missing to team-b"
    );
    // Its own copy of the same bytes it may read (stored once on disk).
    upload_result(&b, &[b"secret-of-a"]).await.unwrap();
    assert_eq!(bytestream_read(&b, out).await.unwrap(), b"secret-of-a");
    assert!(find_missing(&b, out).await.unwrap().is_empty());
}

/// The attack from the issue: a result forged under another instance name
/// (or by another tenant) is never served to the victim.
#[tokio::test]
async fn forged_results_cross_neither_instances_nor_tenants() {
    let anonymous = up(&[]);
    let c = channel(&anonymous).await;
    let stdout = upload(&c, &[b"forged"]).await[0];
    let action = make_action(&c, &ActionSpec::new("echo real")).await;
    let forged = ActionResult {
        stdout_digest: Some(stdout.to_proto()),
        ..Default::default()
    };
    ac(&c)
        .update_action_result(UpdateActionResultRequest {
            instance_name: "attacker".into(),
            action_digest: Some(action.to_proto()),
            action_result: Some(forged.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(code(get_result(&c, action).await).0, Code::NotFound);
    let (_, response) = execute(&c, action, false).await.unwrap();
    assert!(!response.cached_result, "not served the forged result");
    let out = read_blob(&c, response.result.unwrap().stdout_digest.as_ref().unwrap()).await;
    assert_eq!(&out[..], b"real\n");

    let h = with_keys("up");
    let a = channel_with_key(&h, Some("key-a")).await;
    let b = channel_with_key(&h, Some("key-b")).await;
    let action = make_action(&a, &ActionSpec::new("echo real")).await;
    upload_result(&b, &[b"forged"]).await.unwrap();
    update_result(&b, action, forged.clone())
        .await
        .expect("into team-b's own cache");
    assert_eq!(code(get_result(&a, action).await).0, Code::NotFound);
    // A result pointing at a blob team-b may not read is refused.
    let a_only = upload(&a, &[b"only-a"]).await[0];
    let (c, msg) = code(
        update_result(
            &b,
            action,
            ActionResult {
                output_files: vec![OutputFile {
                    path: "f".into(),
                    digest: Some(a_only.to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{msg}");
}

#[tokio::test]
async fn executors_must_authenticate_and_cannot_take_over_an_id() {
    let h = with_keys("server");
    let none = channel(&h).await;
    let user = channel_with_key(&h, Some("key-a")).await;
    let fleet = channel_with_key(&h, Some("key-exec")).await;
    let other = channel_with_key(&h, Some("key-exec-2")).await;
    assert_eq!(
        code(FakeExecutor::try_connect(&none, "e1", vec![], &[]).await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code(FakeExecutor::try_connect(&user, "e1", vec![], &[]).await).0,
        Code::PermissionDenied
    );
    let _e1 = FakeExecutor::connect(&fleet, "e1", vec![]).await;
    let (c, msg) = code(FakeExecutor::try_connect(&other, "e1", vec![], &[]).await);
    assert_eq!(c, Code::AlreadyExists, "{msg}");
    assert!(msg.contains("\"e1\""), "{msg}");
    // The key that holds the id may reconnect (a network blip).
    FakeExecutor::connect(&fleet, "e1", vec![]).await;
}

/// Runs `action` as team-a in the background; the response when done.
fn execute_in_background(
    c: &Channel,
    action: Digest,
) -> tokio::task::JoinHandle<hearth_proto::reapi::ExecuteResponse> {
    let c = c.clone();
    tokio::spawn(async move { execute(&c, action, true).await.unwrap().1 })
}

fn finished(op: &str, result: &ActionResult) -> Finished {
    Finished {
        operation_name: op.into(),
        action_result: result.encode_to_vec(),
        ..Default::default()
    }
}

/// The attack: a second executor (authenticated, but not the one the work
/// went to) reports a result for someone else's operation.
#[tokio::test]
async fn a_result_is_taken_only_from_the_session_that_was_given_the_work() {
    let h = with_keys("server");
    let a = channel_with_key(&h, Some("key-a")).await;
    let mut e1 =
        FakeExecutor::connect(&channel_with_key(&h, Some("key-exec")).await, "e1", vec![]).await;
    let action = make_action(&a, &ActionSpec::new("exit 7")).await;
    let run = execute_in_background(&a, action);
    let op = e1.assignment().await;
    let e2 = FakeExecutor::connect(
        &channel_with_key(&h, Some("key-exec-2")).await,
        "e2",
        vec![],
    )
    .await;
    e2.send(finished(
        &op,
        &ActionResult {
            exit_code: 0,
            ..Default::default()
        },
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!run.is_finished(), "the forged result was not taken");
    e1.send(finished(
        &op,
        &ActionResult {
            exit_code: 7,
            ..Default::default()
        },
    ));
    assert_eq!(run.await.unwrap().result.unwrap().exit_code, 7);
}

/// The attack: an executor reports outputs that were never uploaded; the
/// result is refused, not cached, and the client is told why.
#[tokio::test]
async fn an_executors_result_is_checked_before_it_is_cached() {
    let h = with_keys("server");
    let a = channel_with_key(&h, Some("key-a")).await;
    let mut e1 =
        FakeExecutor::connect(&channel_with_key(&h, Some("key-exec")).await, "e1", vec![]).await;
    let action = make_action(&a, &ActionSpec::new("true")).await;
    let c = a.clone();
    let run = tokio::spawn(async move { execute(&c, action, false).await.unwrap().1 });
    let op = e1.assignment().await;
    let ghost = Digest::of(b"never uploaded");
    e1.send(finished(
        &op,
        &ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(ghost.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        },
    ));
    let response = run.await.unwrap();
    let status = response.status.unwrap_or_default();
    assert_eq!(status.code, Code::Internal as i32, "{status:?}");
    assert!(
        status.message.contains("not in the CAS"),
        "{}",
        status.message
    );
    assert!(response.result.is_none());
    assert_eq!(code(get_result(&a, action).await).0, Code::NotFound);
}

#[tokio::test]
async fn status_shows_a_tenants_own_queue_and_an_admin_all() {
    let h = with_keys("server");
    let a = channel_with_key(&h, Some("key-a")).await;
    let action = make_action(&a, &ActionSpec::new("true")).await;
    let _queued = execute_in_background(&a, action);
    let queued = |key: &'static str| {
        let h = &h;
        async move {
            let c = channel_with_key(h, Some(key)).await;
            WorkerServiceClient::new(c)
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .queued_actions
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while queued("key-admin").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the action never queued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(queued("key-a").await, 1);
    assert_eq!(queued("key-b").await, 0);
}

#[tokio::test]
async fn keys_reload_on_sighup_and_a_broken_file_keeps_the_old_ones() {
    let h = with_keys("server");
    let file = h.dir.path().join("keys.toml");
    let hup = || {
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &h.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    let works = |key: &'static str| {
        let h = &h;
        async move {
            let c = channel_with_key(h, Some(key)).await;
            find_missing(&c, Digest::of(b"x")).await.is_ok()
        }
    };
    let eventually = |key: &'static str, want: bool| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while works(key).await != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{key} never became {want}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    assert!(!works("key-new").await);
    let mut text = test_keys().replace("key = \"key-b\"", "key = \"key-new\"");
    std::fs::write(&file, &text).unwrap();
    hup();
    eventually("key-new", true).await;
    eventually("key-b", false).await;
    assert!(works("key-a").await);
    // A file that does not parse changes nothing.
    text.push_str("[[key]]\nkey = \"x\"\n");
    std::fs::write(&file, &text).unwrap();
    hup();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(works("key-new").await && works("key-a").await);
}
