//! Several servers on one S3 bucket (SeaweedFS, started here): blobs that
//! one server's actions produce are served by another with an empty disk.

mod common;

use common::remote::{executor_with, wait_for, wait_for_within};

use std::sync::Arc;

use common::*;
use hearth_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use hearth_proto::reapi::{self, FindMissingBlobsRequest};
use hearth_storage::{Digest, ObjectBlobStore};
use hearth_testkit::SeaweedFs;
use object_store::aws::AmazonS3Builder;
use object_store::ObjectStoreExt;

async fn read_all(c: &Channel, d: &reapi::Digest) -> Vec<u8> {
    let mut read = ByteStreamClient::new(c.clone())
        .max_decoding_message_size(64 << 20)
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .expect("ByteStream.Read")
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = read.message().await.expect("a chunk") {
        got.extend(m.data);
    }
    got
}

async fn missing(c: &Channel, digests: &[reapi::Digest]) -> Vec<reapi::Digest> {
    cas(c)
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: digests.to_vec(),
            digest_function: 0,
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner()
        .missing_blob_digests
}

#[tokio::test]
async fn outputs_of_one_server_on_a_bucket_are_served_by_another_with_an_empty_disk() {
    let s3 = SeaweedFs::start();
    // Replica A: `hearth up` (its executor's outputs go to the bucket),
    // configured by flags.
    let flags = s3.hearth_flags();
    let mut args = vec!["--cas-store", "s3://hearth/ci"];
    args.extend(flags.iter().map(String::as_str));
    let a = up(&args);
    let ca = channel(&a).await;
    let spec = ActionSpec {
        files: vec![("in.txt", b"input bytes\n")],
        outputs: vec!["small.txt", "big.bin"],
        ..ActionSpec::new(
            "tr a-z A-Z < in.txt > small.txt && head -c 12000000 /dev/zero | tr '\\0' x > big.bin",
        )
    };
    let action = make_action(&ca, &spec).await;
    let (_, resp) = execute(&ca, action, true).await.expect("Execute");
    let result = resp.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{result:?}");
    let outputs: Vec<reapi::Digest> = result
        .output_files
        .iter()
        .map(|f| f.digest.clone().expect("digest"))
        .collect();
    assert_eq!(outputs.len(), 2);

    // Both outputs are objects in the bucket, under the prefix.
    let bucket = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&s3.endpoint)
            .with_bucket_name(&s3.bucket)
            .with_access_key_id(&s3.access_key)
            .with_secret_access_key(&s3.secret_key)
            .with_region("us-east-1")
            .with_allow_http(true)
            .build()
            .expect("S3 client"),
    );
    let layout = ObjectBlobStore::new(bucket.clone(), "ci");
    for d in &outputs {
        let d = Digest::from_proto(d).expect("digest");
        let meta = bucket.head(&layout.key(&d)).await.expect("object");
        assert_eq!(meta.size, d.size());
    }

    // Replica B: `hearth server`, a fresh disk, the S3 settings from its
    // config file.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hearth.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ncas-store = \"s3://hearth/ci\"\ns3-endpoint = \"{}\"\ns3-access-key-id = \"{}\"\ns3-secret-access-key = \"{}\"\ns3-region = \"us-east-1\"\ns3-allow-http = true\n",
            s3.endpoint, s3.access_key, s3.secret_key
        ),
    )
    .expect("config");
    let metrics_at = format!("127.0.0.1:{}", common::web::free_port());
    let b = server(&[
        "--config",
        config.to_str().expect("utf-8"),
        "--metrics-listen",
        &metrics_at,
    ]);
    let cb = channel(&b).await;
    let input = Digest::of(b"input bytes\n").to_proto();
    let never = Digest::of(b"never uploaded").to_proto();
    let mut asked = outputs.clone();
    asked.extend([input, never.clone()]);
    assert_eq!(missing(&cb, &asked).await, vec![never]);
    assert_eq!(read_all(&cb, &outputs[0]).await, b"INPUT BYTES\n");
    let big = read_all(&cb, &outputs[1]).await;
    assert_eq!(big.len(), 12_000_000);
    assert!(big.iter().all(|&b| b == b'x'));
    // B's disk now holds what it served.
    let disk_blob = |d: &reapi::Digest| {
        b.dir
            .path()
            .join("data/cas")
            .join(&d.hash[..2])
            .join(&d.hash)
    };
    assert!(disk_blob(&outputs[1]).exists());
    // The operator sees what the bucket was asked, and how it went.
    let metrics = common::web::get(&metrics_at, "/metrics", &[]).body;
    let calls = |op: &str, outcome: &str| {
        common::web::sum(
            &metrics,
            "hearth_cas_tier_requests_total",
            &[
                "tier=\"s3\"",
                &format!("op=\"{op}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        )
    };
    assert_eq!(calls("find_missing", "ok"), 1.0, "{metrics}");
    assert_eq!(
        calls("read", "ok") + calls("read_stream", "ok"),
        2.0,
        "{metrics}"
    );
    assert_eq!(calls("write", "ok"), 0.0, "B wrote nothing: {metrics}");
}

#[tokio::test]
async fn a_bucket_that_cannot_be_reached_is_unavailable_not_a_miss() {
    // Nothing listens on this port: the first lookup fails.
    let port = hearth_testkit::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let b = server(&[
        "--cas-store",
        "s3://nowhere/x",
        "--s3-endpoint",
        &endpoint,
        "--s3-access-key-id",
        "k",
        "--s3-secret-access-key",
        "s",
        "--s3-region",
        "us-east-1",
        "--s3-allow-http",
        "true",
    ]);
    let cb = channel(&b).await;
    let err = cas(&cb)
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![Digest::of(b"anything").to_proto()],
            digest_function: 0,
        })
        .await
        .expect_err("no bucket to ask");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("anything") || err.message().contains("looking up"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_executor_moves_to_the_next_replica_when_its_own_is_killed() {
    let mut a = server(&[]);
    let b = server(&[]);
    let (ca, cb) = (channel(&a).await, channel(&b).await);
    let b_url = b.addr.replace("http://", "grpc://");
    let _executor = executor_with(
        &a,
        &a.addr,
        "roaming",
        &["--capacity", "1", "--vm", "off", "--server", &b_url],
    );
    wait_for(&ca, "the executor on replica A", |s| {
        s.executors.iter().any(|e| e.executor_id == "roaming")
    })
    .await;
    // An action sent to B waits: B has no executor yet.
    let action = make_action(
        &cb,
        &ActionSpec {
            outputs: vec!["out"],
            ..ActionSpec::new("echo moved > out")
        },
    )
    .await;
    let cb2 = cb.clone();
    let run = tokio::spawn(async move { execute(&cb2, action, true).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!run.is_finished(), "B ran it without an executor");

    // Replica A dies: the executor finds B, and B's action runs.
    a.child.kill().expect("kill -9 replica A");
    a.child.wait().expect("reaping replica A");
    wait_for_within(&cb, "the executor on replica B", 30, |s| {
        s.executors.iter().any(|e| e.executor_id == "roaming")
    })
    .await;
    let (_, resp) = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .expect("the action ran within 30 s of the move")
        .expect("the task")
        .expect("Execute");
    let result = resp.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{result:?}");
    let out = result.output_files[0].digest.clone().expect("digest");
    assert_eq!(read_blob(&cb, &out).await, "moved\n");
}

#[tokio::test]
async fn tenants_see_their_blobs_on_every_replica_and_a_result_hidden_by_a_lost_record_survives() {
    use hearth_proto::reapi::{
        action_cache_client::ActionCacheClient, ActionResult, GetActionResultRequest, OutputFile,
        UpdateActionResultRequest,
    };
    let s3 = SeaweedFs::start();
    let redis = hearth_testkit::Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys_file(dir.path());
    let mut shared = vec![
        "--auth-keys".to_string(),
        keys,
        "--cas-store".into(),
        "s3://hearth/tenants".into(),
        "--state".into(),
        redis.url.clone(),
    ];
    shared.extend(s3.hearth_flags());
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    let (a, b) = (server(&shared), server(&shared));
    let (ca, cb, cb_other) = (
        channel_with_key(&a, Some("key-a")).await,
        channel_with_key(&b, Some("key-a")).await,
        channel_with_key(&b, Some("key-b")).await,
    );
    // Team A uploads an output and a result through replica A.
    let out = upload(&ca, &[b"built through A"]).await[0];
    // Who may read it is shared: team A sees it on B, team B does not.
    assert!(missing(&cb, &[out.to_proto()]).await.is_empty());
    assert_eq!(
        missing(&cb_other, &[out.to_proto()]).await,
        vec![out.to_proto()]
    );
    let action = Digest::of(b"an action of team a");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(out.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    ActionCacheClient::new(ca.clone())
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .expect("UpdateActionResult through A");
    let get = |c: Channel| async move {
        ActionCacheClient::new(c)
            .get_action_result(GetActionResultRequest {
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await
    };
    assert_eq!(
        get(cb.clone())
            .await
            .expect("a hit on B")
            .into_inner()
            .output_files
            .len(),
        1
    );

    // The ownership record is lost (expired, evicted from Redis): to team A
    // the output is hidden, so the result is a miss...
    let mut conn = redis::Client::open(redis.url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let records: Vec<String> = redis::cmd("KEYS")
        .arg("hearth:own:*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert!(!records.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&records)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let miss = get(cb.clone()).await.expect_err("hidden now");
    assert_eq!(miss.code(), tonic::Code::NotFound);
    // ...but the entry stays: once team A uploads the output again (as
    // Bazel does for what it finds missing), the result is a hit again.
    upload(&cb, &[b"built through A"]).await;
    let hit = get(ca.clone())
        .await
        .expect("a hit again on A")
        .into_inner();
    assert_eq!(hit.output_files.len(), 1);
}
