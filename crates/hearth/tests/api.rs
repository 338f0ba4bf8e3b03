//! The REAPI surface of a real `hearth up`, driven with tonic clients:
//! capabilities, CAS, ByteStream, action cache, and every kind of bad input.
#![allow(deprecated)]

mod common;

use common::*;
use futures::stream;
use hearth_proto::bytestream::{
    byte_stream_client::ByteStreamClient, QueryWriteStatusRequest, ReadRequest, WriteRequest,
};
use hearth_proto::reapi::{
    action_cache_client::ActionCacheClient, batch_update_blobs_request,
    capabilities_client::CapabilitiesClient, ActionResult, BatchUpdateBlobsRequest, Directory,
    DirectoryNode, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest,
    GetTreeRequest, OutputFile, UpdateActionResultRequest,
};
use hearth_storage::Digest;
use tonic::Code;

#[tokio::test]
async fn capabilities_admit_bazel_2_1_and_advertise_sha256() {
    let h = up(&[]);
    let c = channel(&h).await;
    let caps = CapabilitiesClient::new(c)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let low = caps.low_api_version.unwrap();
    let high = caps.high_api_version.unwrap();
    assert_eq!(
        (low.major, low.minor),
        (2, 0),
        "Bazel 2.1 needs low_api_version <= 2.0"
    );
    assert!(high.major == 2 && high.minor >= 3);
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(cache.digest_functions, vec![1], "SHA-256");
    assert!(cache.max_batch_total_size_bytes > 0);
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert!(caps.execution_capabilities.unwrap().exec_enabled);
}

#[tokio::test]
async fn cas_batch_round_trip_and_find_missing() {
    let h = up(&[]);
    let c = channel(&h).await;
    let d = upload(&c, &[b"alpha", b"beta"]).await;
    let absent = Digest::of(b"never uploaded");
    let missing = cas(&c)
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![d[0].to_proto(), absent.to_proto(), d[1].to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![absent.to_proto()]);
    assert_eq!(read_blob(&c, &d[1].to_proto()).await.as_ref(), b"beta");
}

#[tokio::test]
async fn batch_update_with_wrong_digest_is_rejected_per_blob_and_stores_nothing() {
    let h = up(&[]);
    let c = channel(&h).await;
    let claimed = Digest::of(b"what the client claims");
    let resp = cas(&c)
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![
                batch_update_blobs_request::Request {
                    digest: Some(claimed.to_proto()),
                    data: b"something else".to_vec(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(Digest::of(b"fine").to_proto()),
                    data: b"fine".to_vec(),
                    compressor: 0,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let s0 = resp.responses[0].status.clone().unwrap();
    assert_eq!(s0.code, Code::InvalidArgument as i32, "{}", s0.message);
    assert!(s0.message.contains("does not match"), "{}", s0.message);
    assert_eq!(resp.responses[1].status.clone().unwrap().code, 0);
    let missing = cas(&c)
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![claimed.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing.len(), 1, "the mismatched blob must not be stored");
}

#[tokio::test]
async fn malformed_digests_and_oversized_batches_are_invalid_argument() {
    let h = up(&[]);
    let c = channel(&h).await;
    let bad = hearth_proto::reapi::Digest {
        hash: "not-a-hash".into(),
        size_bytes: 3,
    };
    let err = cas(&c)
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![bad],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("blob_digests[0]"),
        "{}",
        err.message()
    );

    let big = vec![7u8; 3 * 1024 * 1024];
    let reqs = (0..2)
        .map(|i| {
            let mut data = big.clone();
            data[0] = i;
            batch_update_blobs_request::Request {
                digest: Some(Digest::of(&data).to_proto()),
                data,
                compressor: 0,
            }
        })
        .collect();
    let err = cas(&c)
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: reqs,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("batch limit"), "{}", err.message());
}

fn bytestream(c: &Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(c.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn chunks(
    resource: &str,
    data: &[u8],
    start: usize,
    chunk: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    let mut out = Vec::new();
    let mut off = start;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        out.push(WriteRequest {
            resource_name: if out.is_empty() {
                resource.to_string()
            } else {
                String::new()
            },
            write_offset: off as i64,
            finish_write: finish && end == data.len(),
            data: data[off..end].to_vec(),
        });
        off = end;
    }
    out
}

#[tokio::test]
async fn bytestream_write_read_with_offset_and_limit() {
    let h = up(&[]);
    let c = channel(&h).await;
    let data: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&data);
    let resource = format!(
        "inst/uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let resp = bytestream(&c)
        .write(stream::iter(chunks(&resource, &data, 0, 64 * 1024, true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, data.len() as i64);

    let mut read = bytestream(&c)
        .read(ReadRequest {
            resource_name: format!("inst/blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: 1_000_000,
            read_limit: 2_500_000,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = read.message().await.unwrap() {
        got.extend(m.data);
    }
    assert_eq!(got, data[1_000_000..3_500_000]);

    let err = bytestream(&c)
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: data.len() as i64 + 1,
            read_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test]
async fn bytestream_write_resumes_after_an_interrupted_stream() {
    let h = up(&[]);
    let c = channel(&h).await;
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 199) as u8).collect();
    let d = Digest::of(&data);
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    // First attempt: half the data, no finish_write; the stream just ends.
    let half = 2_500_000;
    let err = bytestream(&c)
        .write(stream::iter(chunks(
            &resource,
            &data[..half],
            0,
            1 << 20,
            false,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    let status = bytestream(&c)
        .query_write_status(QueryWriteStatusRequest {
            resource_name: resource.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.committed_size, half as i64);
    assert!(!status.complete);
    let resp = bytestream(&c)
        .write(stream::iter(chunks(&resource, &data, half, 1 << 20, true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, data.len() as i64);
    let status = bytestream(&c)
        .query_write_status(QueryWriteStatusRequest {
            resource_name: resource,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.complete);
}

/// Sends `data[..upto]` of `data` without finish_write: the stream ends and
/// the server parks the upload (its answer comes after that).
async fn interrupted_write(c: &Channel, data: &[u8], upto: usize) -> String {
    let d = Digest::of(data);
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let err = bytestream(c)
        .write(stream::iter(chunks(
            &resource,
            &data[..upto],
            0,
            1 << 20,
            false,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    resource
}

async fn write_status(c: &Channel, resource: &str) -> Result<i64, tonic::Status> {
    bytestream(c)
        .query_write_status(QueryWriteStatusRequest {
            resource_name: resource.to_string(),
        })
        .await
        .map(|r| r.into_inner().committed_size)
}

/// Interrupted uploads' files in the server's staging directory.
fn parked_files(h: &Hearth) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(h.dir.path().join("data/staging"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("upload-")
        })
        .collect()
}

#[tokio::test]
async fn interrupted_uploads_expire_and_their_files_are_deleted() {
    let h = up(&["--partial-upload-idle-secs", "1"]);
    let c = channel(&h).await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 193) as u8).collect();
    let resource = interrupted_write(&c, &data, 1_000_000).await;
    // Once idle for a second it is gone: NOT_FOUND, and its file deleted
    // (by the sweeper: nothing else touches the server meanwhile).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !parked_files(&h).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the parked upload's file was never deleted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let err = write_status(&c, &resource).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    // Resuming where it stopped is refused; starting over works.
    let err = bytestream(&c)
        .write(stream::iter(chunks(
            &resource,
            &data,
            1_000_000,
            1 << 20,
            true,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let resp = bytestream(&c)
        .write(stream::iter(chunks(&resource, &data, 0, 1 << 20, true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, data.len() as i64);
}

#[tokio::test]
async fn interrupted_uploads_are_bounded_in_total_bytes() {
    let h = up(&["--partial-upload-max-bytes", "4MB"]);
    let c = channel(&h).await;
    let a: Vec<u8> = (0..5_000_000u32).map(|i| (i % 191) as u8).collect();
    let b: Vec<u8> = (0..5_000_000u32).map(|i| (i % 181) as u8).collect();
    let a_res = interrupted_write(&c, &a, 2_500_000).await;
    assert_eq!(write_status(&c, &a_res).await.unwrap(), 2_500_000);
    assert_eq!(parked_files(&h).len(), 1);
    // Parking B too would exceed 4 MB: A, the least recently active, goes.
    let b_res = interrupted_write(&c, &b, 1_500_000).await;
    let err = write_status(&c, &a_res).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert_eq!(write_status(&c, &b_res).await.unwrap(), 1_500_000);
    assert_eq!(parked_files(&h).len(), 1, "A's file is deleted");
    // An upload bigger than the whole bound is not kept.
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i % 179) as u8).collect();
    let big_res = interrupted_write(&c, &big, 4_500_000).await;
    assert_eq!(
        write_status(&c, &big_res).await.unwrap_err().code(),
        Code::NotFound
    );
    // B resumes.
    let resp = bytestream(&c)
        .write(stream::iter(chunks(&b_res, &b, 1_500_000, 1 << 20, true)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, b.len() as i64);
    assert!(parked_files(&h).is_empty());
}

#[tokio::test]
async fn bytestream_rejects_malformed_names_and_wrong_content() {
    let h = up(&[]);
    let c = channel(&h).await;
    let err = bytestream(&c)
        .read(ReadRequest {
            resource_name: "blobs/xyz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("malformed resource name"),
        "{}",
        err.message()
    );

    let claimed = Digest::of(b"the real content");
    let bogus = b"other content!!!";
    assert_eq!(bogus.len() as u64, claimed.size());
    let resource = format!("uploads/u1/blobs/{}/{}", claimed.hash_hex(), claimed.size());
    let err = bytestream(&c)
        .write(stream::iter(chunks(&resource, bogus, 0, 4, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let err = bytestream(&c)
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", claimed.hash_hex(), claimed.size()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "nothing was stored under the claimed digest"
    );

    let no_uploads = format!("blobs/{}/{}", claimed.hash_hex(), claimed.size());
    let err = bytestream(&c)
        .write(stream::iter(chunks(
            &no_uploads,
            b"the real content",
            0,
            100,
            true,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn get_tree_pages_through_a_tree() {
    let h = up(&[]);
    let c = channel(&h).await;
    // A chain of 5 directories: d0 ⊃ d1 ⊃ … ⊃ d4.
    let mut child: Option<Digest> = None;
    for i in (0..5).rev() {
        let mut dir = Directory::default();
        dir.files.push(file_node(&format!("f{i}"), b"", false));
        if let Some(cd) = child {
            dir.directories.push(DirectoryNode {
                name: format!("d{}", i + 1),
                digest: Some(cd.to_proto()),
            });
        }
        child = Some(upload_msg(&c, &dir).await);
    }
    let root = child.unwrap();
    let mut token = String::new();
    let mut seen = 0;
    let mut pages = 0;
    loop {
        let mut s = cas(&c)
            .get_tree(GetTreeRequest {
                root_digest: Some(root.to_proto()),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let page = s.message().await.unwrap().unwrap();
        assert!(page.directories.len() <= 2);
        seen += page.directories.len();
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!((seen, pages), (5, 3));
}

#[tokio::test]
async fn action_cache_update_get_inline_and_missing_outputs() {
    let h = up(&[]);
    let c = channel(&h).await;
    let out = upload(&c, &[b"output bytes", b"hello stdout"]).await;
    let key = Digest::of(b"some action");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out.txt".into(),
            digest: Some(out[0].to_proto()),
            ..Default::default()
        }],
        stdout_digest: Some(out[1].to_proto()),
        exit_code: 0,
        ..Default::default()
    };
    let mut ac = ActionCacheClient::new(c.clone());
    let err = ac
        .get_action_result(GetActionResultRequest {
            action_digest: Some(key.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    ac.update_action_result(UpdateActionResultRequest {
        action_digest: Some(key.to_proto()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = ac
        .get_action_result(GetActionResultRequest {
            action_digest: Some(key.to_proto()),
            inline_stdout: true,
            inline_output_files: vec!["out.txt".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, b"hello stdout");
    assert_eq!(got.output_files[0].contents, b"output bytes");

    let dangling = ActionResult {
        output_files: vec![OutputFile {
            path: "x".into(),
            digest: Some(Digest::of(b"not uploaded").to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = ac
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(Digest::of(b"other action").to_proto()),
            action_result: Some(dangling),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(violations(&err).len(), 1);
}

#[tokio::test]
async fn configured_instances_reject_unknown_names() {
    let h = up(&["--instance", "main", "--instance", "ci"]);
    let c = channel(&h).await;
    let ok = cas(&c)
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "ci".into(),
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok());
    let err = cas(&c)
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("\"other\"") && err.message().contains("\"main\""),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn blobs_and_results_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let h = up_in(dir, &[]);
    let c = channel(&h).await;
    let d = upload(&c, &[b"persistent"]).await[0];
    let key = Digest::of(b"persistent action");
    ActionCacheClient::new(c.clone())
        .update_action_result(UpdateActionResultRequest {
            action_digest: Some(key.to_proto()),
            action_result: Some(ActionResult {
                stdout_digest: Some(d.to_proto()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut h = h;
    // Crash, not a clean shutdown.
    h.child.kill().unwrap();
    h.child.wait().unwrap();
    let dir = std::mem::replace(&mut h.dir, tempfile::tempdir().unwrap());
    drop(h);
    assert!(path.exists());
    let h2 = up_in(dir, &[]);
    let c2 = channel(&h2).await;
    assert_eq!(read_blob(&c2, &d.to_proto()).await.as_ref(), b"persistent");
    ActionCacheClient::new(c2)
        .get_action_result(GetActionResultRequest {
            action_digest: Some(key.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap();
}
