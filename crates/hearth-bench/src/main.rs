//! `hearth-bench --server grpc://127.0.0.1:1985`: measures a running server
//! and prints a table. Numbers only; nothing is asserted.

// Command.platform is what Bazel 2.1 sends; the benchmark does the same.
#![allow(deprecated)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::{stream, StreamExt};
use hearth_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use hearth_proto::reapi::{
    batch_update_blobs_request, command::EnvironmentVariable,
    content_addressable_storage_client::ContentAddressableStorageClient,
    execution_client::ExecutionClient, Action, ActionResult, BatchUpdateBlobsRequest, Command,
    Directory, ExecuteRequest, ExecuteResponse, FindMissingBlobsRequest,
};
use hearth_storage::Digest;
use prost::Message;

mod breakdown;
mod load;
mod shaped;
mod tiers;
mod vm;
mod workspace;
use load::{big_action, under_uploads};
/// A channel that sends `--api-key` with every call (grpc:// or grpcs://).
type Channel = hearth_executor::client::ServerChannel;

#[derive(Parser)]
struct Args {
    /// The server to measure.
    #[arg(long, default_value = "grpc://127.0.0.1:1985")]
    server: String,
    /// Sequential no-op actions for the round-trip figure.
    #[arg(long, default_value_t = 500)]
    actions: usize,
    /// Instead of the REAPI figures, measure microVM actions (this many).
    #[arg(long)]
    vm_actions: Option<usize>,
    /// Which VM start the microVM actions measure: `cold` (a fresh VM
    /// each: a clone of the clean snapshot, or booted with
    /// `--vm-clean-snapshots off`), `dockerd` (the same with
    /// init-dockerd=true), `recycled` (recycle-runner: resumed from the
    /// pool), `restored` (two runner keys taking turns; start the server
    /// with `--vm-pool-size 1` so each action restores its VM from disk),
    /// `burst` (per round, a fresh runner key warmed by one action, then
    /// three actions of it at once: start the server with capacity 3), or
    /// `docker-run` (the seed's `docker run --rm ubuntu:20.04` in a fresh
    /// VM with init-dockerd=true: start the server with a registry holding
    /// it as dockerd's mirror, as scripts/bench-seed-fresh.sh does).
    #[arg(long, default_value = "cold")]
    vm_start: String,
    /// API key to send (a server with --auth-keys).
    #[arg(long)]
    api_key: Option<String>,
    /// PEM CA certificate of a grpcs:// server.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Instead of the full table, measure FindMissingBlobs and no-op
    /// Executes while this many ByteStream uploads of fresh blobs run
    /// without pause beside them (the load that shows blocking on the
    /// server's runtime).
    #[arg(long, default_value_t = 0)]
    background_uploads: usize,
    /// Size of each background upload, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    upload_size: usize,
    /// Instead of the full table, run one action that copies an input of
    /// this many bytes to an output (for an executor's memory: compare its
    /// peak RSS afterwards).
    #[arg(long)]
    big_action: Option<usize>,
    /// Instead of the full table, measure the storage tiers: uploads
    /// through --server, FindMissingBlobs and reads (first and again)
    /// through --read-server, no-op actions through --server.
    #[arg(long)]
    tiers: bool,
    /// The server the tiers benchmark reads through (another replica on
    /// the same bucket, with an empty disk); --server when unset.
    #[arg(long)]
    read_server: Option<String>,
    /// Instead of the full table, measure this many actions shaped like a
    /// compile (a tree of 42 inputs, two new outputs), one at a time.
    #[arg(long)]
    shaped_actions: Option<usize>,
    /// Instead of measuring a server, write a generated C workspace into
    /// this directory (for scripts/bench-build.sh) and exit.
    #[arg(long)]
    generate_workspace: Option<std::path::PathBuf>,
    /// Libraries of the generated workspace.
    #[arg(long, default_value_t = 60)]
    libraries: usize,
    /// Layers the libraries are stacked in (each depends on the one below).
    #[arg(long, default_value_t = 6)]
    layers: usize,
    /// Instead of measuring a server, summarize this Bazel JSON profile
    /// (`--profile=FILE`): its spawn-related tasks, summed.
    #[arg(long)]
    bazel_profile: Option<std::path::PathBuf>,
    /// With --bazel-profile: also the means of a `/metrics` page saved to
    /// this file after the build (stages, queue wait, gRPC calls).
    #[arg(long)]
    metrics_file: Option<std::path::PathBuf>,
}

fn cas(c: &Channel) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(c.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn bytestream(c: &Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(c.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Bytes unique to this run, so nothing is already stored.
fn unique_blob(size: usize, salt: u64) -> Vec<u8> {
    let seed = uuid::Uuid::new_v4().as_u128() as u64 ^ salt;
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn row(name: &str, value: String) {
    println!("| {name:<58} | {value:>22} |");
}

async fn find_missing(c: &Channel) -> Result<()> {
    let digests: Vec<_> = (0..1000u64)
        .map(|i| Digest::of(&i.to_le_bytes()).to_proto())
        .collect();
    let calls = 400;
    let start = Instant::now();
    stream::iter(0..calls)
        .map(|_| {
            let mut client = cas(c);
            let req = FindMissingBlobsRequest {
                blob_digests: digests.clone(),
                ..Default::default()
            };
            async move { client.find_missing_blobs(req).await }
        })
        .buffer_unordered(4)
        .for_each(|r| async move {
            r.expect("FindMissingBlobs");
        })
        .await;
    let secs = start.elapsed().as_secs_f64();
    row(
        "FindMissingBlobs, 1,000 digests/call, 4 in flight",
        format!("{:.0} calls/s", calls as f64 / secs),
    );
    row(
        "  = digests checked",
        format!("{:.0} digests/s", calls as f64 * 1000.0 / secs),
    );
    Ok(())
}

async fn batch_update(
    c: &Channel,
    blob_size: usize,
    per_batch: usize,
    batches: usize,
) -> Result<()> {
    let data: Vec<Vec<Vec<u8>>> = (0..batches)
        .map(|b| {
            (0..per_batch)
                .map(|i| unique_blob(blob_size, (b * per_batch + i) as u64))
                .collect()
        })
        .collect();
    let start = Instant::now();
    for batch in data {
        let requests = batch
            .into_iter()
            .map(|d| batch_update_blobs_request::Request {
                digest: Some(Digest::of(&d).to_proto()),
                data: d,
                compressor: 0,
            })
            .collect();
        cas(c)
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests,
                ..Default::default()
            })
            .await
            .context("BatchUpdateBlobs")?;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = (batches * per_batch) as f64;
    row(
        &format!("BatchUpdateBlobs, {} B blobs, {per_batch}/call", blob_size),
        format!(
            "{:.0} blobs/s, {:.1} MB/s",
            n / secs,
            n * blob_size as f64 / secs / 1e6
        ),
    );
    Ok(())
}

async fn bytestream_large(c: &Channel, size: usize) -> Result<()> {
    let data = unique_blob(size, 7);
    let d = Digest::of(&data);
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let chunk = 1 << 20;
    let reqs: Vec<WriteRequest> = data
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| WriteRequest {
            resource_name: if i == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: (i * chunk) as i64,
            finish_write: (i + 1) * chunk >= size,
            data: part.to_vec(),
        })
        .collect();
    let start = Instant::now();
    bytestream(c)
        .write(stream::iter(reqs))
        .await
        .context("ByteStream.Write")?;
    let w = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut s = bytestream(c)
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut got = 0;
    while let Some(m) = s.message().await? {
        got += m.data.len();
    }
    let r = start.elapsed().as_secs_f64();
    anyhow::ensure!(got == size, "read {got} of {size} bytes");
    let mb = size as f64 / 1e6;
    row(
        &format!("ByteStream.Write, one {:.0} MB blob", mb),
        format!("{:.0} MB/s", mb / w),
    );
    row(
        &format!("ByteStream.Read, one {:.0} MB blob", mb),
        format!("{:.0} MB/s", mb / r),
    );
    Ok(())
}

async fn bytestream_small(c: &Channel, size: usize, count: usize) -> Result<()> {
    let blobs: Vec<Vec<u8>> = (0..count).map(|i| unique_blob(size, i as u64)).collect();
    let start = Instant::now();
    for data in blobs {
        let d = Digest::of(&data);
        let req = WriteRequest {
            resource_name: format!(
                "uploads/{}/blobs/{}/{}",
                uuid::Uuid::new_v4(),
                d.hash_hex(),
                d.size()
            ),
            write_offset: 0,
            finish_write: true,
            data,
        };
        bytestream(c)
            .write(stream::iter([req]))
            .await
            .context("ByteStream.Write")?;
    }
    let secs = start.elapsed().as_secs_f64();
    row(
        &format!("ByteStream.Write, {} B blobs, sequential", size),
        format!("{:.0} blobs/s", count as f64 / secs),
    );
    Ok(())
}

async fn upload_msg<M: Message>(c: &Channel, m: &M) -> Result<Digest> {
    upload_bytes(c, m.encode_to_vec()).await
}

/// Uploads one blob with BatchUpdateBlobs.
async fn upload_bytes(c: &Channel, data: Vec<u8>) -> Result<Digest> {
    let d = Digest::of(&data);
    cas(c)
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data,
                compressor: 0,
            }],
            ..Default::default()
        })
        .await?;
    Ok(d)
}

/// Uploads `command` and an Action running it on an empty input root.
async fn upload_action(c: &Channel, command: &Command) -> Result<Digest> {
    upload_action_in(c, &Directory::default(), command).await
}

/// Uploads an action running `command` on the input tree `root`.
async fn upload_action_in(c: &Channel, root: &Directory, command: &Command) -> Result<Digest> {
    let root = upload_msg(c, root).await?;
    let command = upload_msg(c, command).await?;
    upload_msg(
        c,
        &Action {
            command_digest: Some(command.to_proto()),
            input_root_digest: Some(root.to_proto()),
            ..Default::default()
        },
    )
    .await
}

/// Executes `action` without a cache lookup; returns the round trip and the
/// result, which must have exit code 0.
async fn execute_ok(c: &Channel, action: Digest) -> Result<(Duration, ActionResult)> {
    let (took, op) = execute(c, action, true).await?;
    let Some(hearth_proto::longrunning::operation::Result::Response(any)) = op.result else {
        anyhow::bail!("operation without response");
    };
    let resp = ExecuteResponse::decode(any.value.as_slice())?;
    let result = resp.result.context("no result")?;
    anyhow::ensure!(result.exit_code == 0, "action failed: {:?}", resp.status);
    Ok((took, result))
}

/// Executes `action` and returns the round trip and the final operation.
async fn execute(
    c: &Channel,
    action: Digest,
    skip_cache_lookup: bool,
) -> Result<(Duration, hearth_proto::longrunning::Operation)> {
    let start = Instant::now();
    let mut s = ExecutionClient::new(c.clone())
        .execute(ExecuteRequest {
            action_digest: Some(action.to_proto()),
            skip_cache_lookup,
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(op) = s.message().await? {
        if op.done {
            return Ok((start.elapsed(), op));
        }
    }
    anyhow::bail!("stream ended before the action completed")
}

async fn run_action(c: &Channel, action: Digest, skip_cache_lookup: bool) -> Result<Duration> {
    Ok(execute(c, action, skip_cache_lookup).await?.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// A no-op action of its own (a fresh environment, so never cached yet).
async fn noop_action(c: &Channel) -> Result<Digest> {
    upload_action(
        c,
        &Command {
            arguments: vec!["/bin/true".into()],
            environment_variables: vec![EnvironmentVariable {
                name: "RUN".into(),
                value: uuid::Uuid::new_v4().to_string(),
            }],
            ..Default::default()
        },
    )
    .await
}

/// p50 and p99 of `n` executions of `action` through `c`, cache skipped.
async fn executed_times(c: &Channel, action: Digest, n: usize) -> Result<String> {
    run_action(c, action, true).await?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        times.push(run_action(c, action, true).await?);
    }
    times.sort();
    Ok(format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    ))
}

async fn noop_actions(c: &Channel, n: usize) -> Result<()> {
    let action = noop_action(c).await?;
    for (label, skip) in [
        ("executed (skip_cache_lookup)", true),
        ("served from the action cache", false),
    ] {
        run_action(c, action, skip).await?;
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            times.push(run_action(c, action, skip).await?);
        }
        times.sort();
        row(
            &format!("No-op action round trip, {label}"),
            format!(
                "p50 {:.2} ms, p99 {:.2} ms",
                percentile(&times, 0.5),
                percentile(&times, 0.99)
            ),
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.generate_workspace {
        let shape = workspace::Shape {
            libraries: args.libraries,
            layers: args.layers,
        };
        return workspace::generate(dir, shape);
    }
    if let Some(profile) = &args.bazel_profile {
        breakdown::print_profile(profile)?;
        if let Some(metrics) = &args.metrics_file {
            breakdown::print_metrics(metrics)?;
        }
        return Ok(());
    }
    let c = connect(&args, &args.server)?;
    println!(
        "| benchmark against {:<40} | {:>22} |",
        args.server, "result"
    );
    println!("|{:-<60}|{:->24}|", "", "");
    if let Some(n) = args.vm_actions {
        return vm::vm_actions(&c, n, &args.vm_start).await;
    }
    if args.tiers {
        let b = match &args.read_server {
            Some(url) => connect(&args, url)?,
            None => c.clone(),
        };
        return tiers::tiers(&c, &b, args.actions).await;
    }
    if let Some(n) = args.shaped_actions {
        return shaped::shaped_actions(&c, n).await;
    }
    if let Some(size) = args.big_action {
        return big_action(&c, size).await;
    }
    if args.background_uploads > 0 {
        return under_uploads(&c, &args).await;
    }
    find_missing(&c).await?;
    batch_update(&c, 1024, 100, 50).await?;
    batch_update(&c, 100 * 1024, 30, 10).await?;
    bytestream_small(&c, 4096, 1000).await?;
    bytestream_large(&c, 64 * 1024 * 1024).await?;
    noop_actions(&c, args.actions).await?;
    Ok(())
}

fn connect(args: &Args, url: &str) -> Result<Channel> {
    hearth_executor::client::connect(&hearth_executor::client::ServerAddress {
        url: url.to_string(),
        tls_ca: args.tls_ca.clone(),
        api_key: args.api_key.clone(),
        ..Default::default()
    })
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("connecting to {url}"))
}

fn millis_between(a: &Option<hearth_proto::protobuf::Timestamp>, b_nanos: i128) -> f64 {
    (b_nanos - nanos(a)) as f64 / 1e6
}

/// A timestamp in nanoseconds since the epoch (0 when absent).
fn nanos(t: &Option<hearth_proto::protobuf::Timestamp>) -> i128 {
    t.as_ref()
        .map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
        .unwrap_or(0)
}
