//! Shared helpers for the integration tests: start the real `hearth` binary,
//! talk to it with tonic REAPI clients, build actions.
#![allow(dead_code, deprecated)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command as Proc, Stdio};

use bytes::Bytes;
use hearth_proto::longrunning::{operation, Operation};
use hearth_proto::reapi::{
    self, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient, Action, BatchUpdateBlobsRequest, Command, Directory,
    ExecuteRequest, ExecuteResponse, FileNode,
};
use hearth_storage::Digest;
use prost::Message;

/// A connection to the server under test that sends an API key (or none)
/// with every call.
pub type Channel = hearth_executor::client::ServerChannel;

pub mod remote;
pub mod tls;
pub mod vm;
pub mod web;
pub mod worker;

/// A running `hearth` process, killed when dropped.
pub struct Hearth {
    pub child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl Drop for Hearth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hearth {
    /// Stops the process with SIGTERM (a graceful shutdown), waits for it,
    /// and hands back its directory for a restart with `up_in`.
    pub fn stop(&mut self) -> tempfile::TempDir {
        let status = Proc::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        let exited = self.child.wait().expect("waiting for hearth");
        assert!(exited.success(), "hearth exited with {exited}");
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hearth")
}

/// Starts `hearth ARGS…` and waits for its "listening on" line.
pub fn spawn_listening(args: &[&str], dir: tempfile::TempDir) -> Hearth {
    let mut child = Proc::new(bin())
        .args(args)
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting hearth");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading hearth's stdout");
    let addr = line
        .trim()
        .strip_prefix("hearth listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from hearth: {line:?}"))
        .to_string();
    Hearth {
        child,
        addr: format!("http://{addr}"),
        dir,
    }
}

/// `hearth up` on a free port with a fresh data dir, plus extra flags.
pub fn up(extra: &[&str]) -> Hearth {
    let dir = tempfile::tempdir().expect("tempdir");
    up_in(dir, extra)
}

pub fn up_in(dir: tempfile::TempDir, extra: &[&str]) -> Hearth {
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path").to_string();
    let mut args = vec!["up", "--listen", "127.0.0.1:0", "--data-dir", &data];
    // MicroVMs only where a test asks for them: their probe boot costs seconds.
    if !extra.contains(&"--vm") {
        args.extend(["--vm", "off"]);
    }
    args.extend_from_slice(extra);
    spawn_listening(&args, dir)
}

/// Plain keys (the file may hold them for tests and small setups) and one
/// hashed, as operators' tooling writes them.
pub fn test_keys() -> String {
    let admin = hearth_api::auth::key_hash("key-admin");
    format!(
        r#"
[[key]]
key = "key-a"
tenant = "team-a"
capabilities = ["cas-read", "cas-write", "ac-write", "execute"]

[[key]]
key = "key-b"
tenant = "team-b"
capabilities = ["cas-read", "cas-write", "ac-write", "execute"]

[[key]]
client_cert_subject = "CN=team-a-ci"
tenant = "team-a"
capabilities = ["cas-read", "cas-write", "execute"]

[[key]]
key = "key-a-read"
tenant = "team-a"
capabilities = ["cas-read"]

[[key]]
key = "key-exec"
tenant = "fleet"
capabilities = ["executor"]

[[key]]
key = "key-exec-2"
tenant = "fleet"
capabilities = ["executor"]

[[key]]
sha256 = "{}"
tenant = "ops"
capabilities = ["admin"]
"#,
        admin.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Writes [`test_keys`] to `dir/keys.toml`; its path.
pub fn keys_file(dir: &std::path::Path) -> String {
    let file = dir.join("keys.toml");
    std::fs::write(&file, test_keys()).expect("writing keys.toml");
    file.to_str().expect("utf-8 path").to_string()
}

/// `hearth server` with the test keys ([`test_keys`]) on a free port.
pub fn server_with_keys() -> Hearth {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys_file(dir.path());
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path").to_string();
    spawn_listening(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--auth-keys",
            &keys,
        ],
        dir,
    )
}

/// `hearth server` (no executor of its own) on a free port.
pub fn server(extra: &[&str]) -> Hearth {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir
        .path()
        .join("data")
        .to_str()
        .expect("utf-8 path")
        .to_string();
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--data-dir", &data];
    args.extend_from_slice(extra);
    spawn_listening(&args, dir)
}

pub async fn channel(h: &Hearth) -> Channel {
    channel_with_key(h, None).await
}

/// A connection that presents `key` as `x-hearth-api-key`.
pub async fn channel_with_key(h: &Hearth, key: Option<&str>) -> Channel {
    // The server printed its address once it listened; connections are
    // made on first use.
    hearth_executor::client::connect(&hearth_executor::client::ServerAddress {
        url: h.addr.clone(),
        api_key: key.map(str::to_string),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", h.addr))
}

pub fn cas(c: &Channel) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(c.clone())
}

pub fn exec(c: &Channel) -> ExecutionClient<Channel> {
    ExecutionClient::new(c.clone())
}

/// Uploads blobs with BatchUpdateBlobs and returns their digests.
pub async fn upload(c: &Channel, blobs: &[&[u8]]) -> Vec<Digest> {
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    let resp = cas(c)
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: blobs
                .iter()
                .zip(&digests)
                .map(|(b, d)| batch_update_blobs_request::Request {
                    digest: Some(d.to_proto()),
                    data: b.to_vec(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    for r in resp.responses {
        assert_eq!(r.status.unwrap_or_default().code, 0, "upload failed");
    }
    digests
}

pub async fn upload_msg<M: Message>(c: &Channel, m: &M) -> Digest {
    upload(c, &[&m.encode_to_vec()]).await[0]
}

pub fn file_node(name: &str, data: &[u8], executable: bool) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(Digest::of(data).to_proto()),
        is_executable: executable,
        node_properties: None,
    }
}

/// Uploads an Action with no timeout or platform of its own and returns its digest.
pub async fn action_of(c: &Channel, command: Digest, input_root: Digest) -> Digest {
    upload_msg(
        c,
        &Action {
            command_digest: Some(command.to_proto()),
            input_root_digest: Some(input_root.to_proto()),
            ..Default::default()
        },
    )
    .await
}

/// An action: `sh -c SCRIPT` in an input root holding `files`, with the given
/// platform properties and outputs (as output_paths).
pub struct ActionSpec<'a> {
    pub script: &'a str,
    pub files: Vec<(&'a str, &'a [u8])>,
    pub outputs: Vec<&'a str>,
    pub platform: Vec<(&'a str, &'a str)>,
    pub timeout_secs: Option<i64>,
    pub do_not_cache: bool,
}

impl<'a> ActionSpec<'a> {
    pub fn new(script: &'a str) -> Self {
        ActionSpec {
            script,
            files: vec![],
            outputs: vec![],
            platform: vec![],
            timeout_secs: None,
            do_not_cache: false,
        }
    }
}

pub fn platform(pairs: &[(&str, &str)]) -> reapi::Platform {
    reapi::Platform {
        properties: pairs
            .iter()
            .map(|(n, v)| reapi::platform::Property {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
    }
}

/// Uploads everything an action needs and returns its digest.
pub async fn make_action(c: &Channel, spec: &ActionSpec<'_>) -> Digest {
    let blobs: Vec<&[u8]> = spec.files.iter().map(|(_, d)| *d).collect();
    if !blobs.is_empty() {
        upload(c, &blobs).await;
    }
    let mut root = Directory::default();
    for (name, data) in &spec.files {
        root.files.push(file_node(name, data, false));
    }
    let root_digest = upload_msg(c, &root).await;
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), spec.script.into()],
        environment_variables: vec![reapi::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        output_paths: spec.outputs.iter().map(|s| s.to_string()).collect(),
        platform: Some(platform(&spec.platform)),
        ..Default::default()
    };
    let command_digest = upload_msg(c, &command).await;
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root_digest.to_proto()),
        timeout: spec.timeout_secs.map(|s| hearth_proto::protobuf::Duration {
            seconds: s,
            nanos: 0,
        }),
        do_not_cache: spec.do_not_cache,
        ..Default::default()
    };
    upload_msg(c, &action).await
}

/// Runs Execute to completion; returns every Operation seen and the response.
pub async fn execute(
    c: &Channel,
    action: Digest,
    skip_cache_lookup: bool,
) -> Result<(Vec<Operation>, ExecuteResponse), tonic::Status> {
    let mut stream = exec(c)
        .execute(ExecuteRequest {
            instance_name: String::new(),
            skip_cache_lookup,
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut ops = Vec::new();
    while let Some(op) = stream.message().await? {
        let done = op.done;
        ops.push(op);
        if done {
            break;
        }
    }
    let last = ops.last().cloned().expect("at least one operation");
    assert!(last.done, "stream ended before the operation was done");
    Ok((ops, response_of(&last)))
}

pub fn response_of(op: &Operation) -> ExecuteResponse {
    match &op.result {
        Some(operation::Result::Response(any)) => {
            ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse")
        }
        other => panic!("operation has no response: {other:?}"),
    }
}

pub fn stage_of(op: &Operation) -> i32 {
    let any = op.metadata.as_ref().expect("metadata");
    reapi::ExecuteOperationMetadata::decode(any.value.as_slice())
        .expect("ExecuteOperationMetadata")
        .stage
}

/// Reads a blob through BatchReadBlobs.
pub async fn read_blob(c: &Channel, d: &reapi::Digest) -> Bytes {
    let resp = cas(c)
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![d.clone()],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .expect("BatchReadBlobs")
        .into_inner();
    let r = resp.responses.into_iter().next().expect("one response");
    assert_eq!(r.status.unwrap_or_default().code, 0, "read of {d:?} failed");
    Bytes::from(r.data)
}

/// The google.rpc.PreconditionFailure violations in a status's details.
pub fn violations(s: &tonic::Status) -> Vec<hearth_proto::precondition_failure::Violation> {
    let status = hearth_proto::rpc::Status::decode(s.details()).expect("rpc.Status in details");
    status
        .details
        .iter()
        .filter(|a| a.type_url == hearth_proto::PRECONDITION_FAILURE_TYPE_URL)
        .flat_map(|a| {
            hearth_proto::PreconditionFailure::decode(a.value.as_slice())
                .expect("PreconditionFailure")
                .violations
        })
        .collect()
}
