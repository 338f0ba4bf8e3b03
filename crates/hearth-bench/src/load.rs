//! The load modes: timings while big uploads run beside them, and one big
//! action for an executor's memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hearth_executor::write_requests;
use hearth_proto::reapi::{Command, Directory};
use hearth_storage::Digest;

use crate::{
    bytestream, execute_ok, find_missing, noop_actions, row, unique_blob, upload_action_in, Args,
    Channel,
};

/// Uploads fresh `size`-byte blobs over ByteStream, one after another,
/// until `stop`; counts the bytes the server accepted into `sent`.
async fn upload_forever(
    c: Channel,
    size: usize,
    salt: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Result<()> {
    let mut data = unique_blob(size, salt);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // A new blob each time, or the server would answer "already stored".
        n += 1;
        data[..8].copy_from_slice(&n.to_le_bytes());
        let blob = Bytes::from(data);
        // Hashing 64 MB takes tens of milliseconds: off the bench's own
        // runtime, so it does not delay the calls being timed.
        let d = {
            let blob = blob.clone();
            tokio::task::spawn_blocking(move || Digest::of(&blob)).await?
        };
        write_blob(&c, d, blob.clone())
            .await
            .context("background ByteStream.Write")?;
        sent.fetch_add(size as u64, Ordering::Relaxed);
        // The buffer again, without a copy once no request holds it.
        data = Vec::from(blob);
    }
    Ok(())
}

/// FindMissingBlobs and no-op Executes, timed while uploads run.
pub(crate) async fn under_uploads(c: &Channel, args: &Args) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let uploaders: Vec<_> = (0..args.background_uploads)
        .map(|i| {
            tokio::spawn(upload_forever(
                c.clone(),
                args.upload_size,
                i as u64,
                stop.clone(),
                sent.clone(),
            ))
        })
        .collect();
    // Let the uploads get going before anything is timed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (start, before) = (Instant::now(), sent.load(Ordering::Relaxed));
    find_missing(c).await?;
    noop_actions(c, args.actions).await?;
    let secs = start.elapsed().as_secs_f64();
    let bytes = sent.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for u in uploaders {
        u.await??;
    }
    row(
        &format!(
            "  meanwhile: {} uploads of {:.0} MB at a time",
            args.background_uploads,
            args.upload_size as f64 / 1e6
        ),
        format!("{:.0} MB/s", bytes as f64 / secs / 1e6),
    );
    Ok(())
}

/// ByteStream.Write of `blob` (digest `d`).
async fn write_blob(c: &Channel, d: Digest, blob: Bytes) -> Result<()> {
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    bytestream(c).write(write_requests(resource, blob)).await?;
    Ok(())
}

/// One action copying a fresh `size`-byte input to its output.
pub(crate) async fn big_action(c: &Channel, size: usize) -> Result<()> {
    use hearth_proto::reapi::FileNode;
    let blob = Bytes::from(unique_blob(size, 11));
    let d = Digest::of(&blob);
    write_blob(c, d, blob)
        .await
        .context("uploading the input")?;
    let root = Directory {
        files: vec![FileNode {
            name: "in".into(),
            digest: Some(d.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let command = Command {
        arguments: vec!["/bin/cp".into(), "in".into(), "out".into()],
        output_paths: vec!["out".into()],
        ..Default::default()
    };
    let action = upload_action_in(c, &root, &command).await?;
    let (took, result) = execute_ok(c, action).await?;
    let out = result.output_files.first().context("no output")?;
    anyhow::ensure!(
        out.digest == Some(d.to_proto()),
        "the output is not the input"
    );
    row(
        &format!("Copy action, {:.0} MB in and out", size as f64 / 1e6),
        format!("{:.0} ms", took.as_secs_f64() * 1000.0),
    );
    Ok(())
}
