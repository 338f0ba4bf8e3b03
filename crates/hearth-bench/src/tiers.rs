//! `--tiers`: what the storage tiers cost. Blobs go up through `--server`
//! (A); FindMissingBlobs and reads go through `--read-server` (B; A when
//! unset). With both on one bucket and B's disk empty, B's first answers are
//! cold (from the bucket) and its second ones cached (its disk and its
//! existence cache).

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use futures::{stream, StreamExt};
use hearth_proto::bytestream::{ReadRequest, WriteRequest};
use hearth_proto::reapi::{self, batch_update_blobs_request, BatchUpdateBlobsRequest};
use hearth_storage::Digest;

use crate::{bytestream, cas, row, unique_blob, Channel};

const SMALL: usize = 1024;
const SMALL_COUNT: usize = 1000;
const LARGE: usize = 64 << 20;
/// FindMissingBlobs calls timed once the answers are cached.
const WARM_CALLS: usize = 200;

pub async fn tiers(a: &Channel, b: &Channel, actions: usize) -> Result<()> {
    let blobs: Vec<Vec<u8>> = (0..SMALL_COUNT)
        .map(|i| unique_blob(SMALL, i as u64))
        .collect();
    let digests: Vec<reapi::Digest> = blobs.iter().map(|b| Digest::of(b).to_proto()).collect();
    let start = Instant::now();
    for chunk in blobs.chunks(100) {
        cas(a)
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests: chunk
                    .iter()
                    .map(|data| batch_update_blobs_request::Request {
                        digest: Some(Digest::of(data).to_proto()),
                        data: data.clone(),
                        compressor: 0,
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .context("BatchUpdateBlobs")?;
    }
    row(
        "BatchUpdateBlobs, 1 KiB blobs, 100/call (through A)",
        format!(
            "{:.0} blobs/s",
            SMALL_COUNT as f64 / start.elapsed().as_secs_f64()
        ),
    );

    let start = Instant::now();
    let missing = find_missing(b, &digests).await?;
    ensure!(
        missing == 0,
        "{missing} of the uploaded blobs are missing on B"
    );
    row(
        "FindMissingBlobs, 1,000 present, first call (B)",
        format!("{:.1} ms", start.elapsed().as_secs_f64() * 1e3),
    );
    let start = Instant::now();
    stream::iter(0..WARM_CALLS)
        .map(|_| find_missing(b, &digests))
        .buffer_unordered(4)
        .for_each(|r| async move {
            assert_eq!(r.expect("FindMissingBlobs"), 0);
        })
        .await;
    row(
        "FindMissingBlobs, 1,000 present, again, 4 in flight (B)",
        format!(
            "{:.0} calls/s",
            WARM_CALLS as f64 / start.elapsed().as_secs_f64()
        ),
    );
    let absent: Vec<reapi::Digest> = (0..SMALL_COUNT)
        .map(|i| Digest::of(&unique_blob(8, i as u64)).to_proto())
        .collect();
    let start = Instant::now();
    let missing = find_missing(b, &absent).await?;
    ensure!(missing == SMALL_COUNT, "absent blobs reported present");
    row(
        "FindMissingBlobs, 1,000 absent (B)",
        format!("{:.1} ms", start.elapsed().as_secs_f64() * 1e3),
    );

    let data = unique_blob(LARGE, 7);
    let d = Digest::of(&data);
    let start = Instant::now();
    let reqs: Vec<WriteRequest> = data
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, part)| WriteRequest {
            resource_name: if i == 0 {
                format!(
                    "uploads/{}/blobs/{}/{}",
                    uuid::Uuid::new_v4(),
                    d.hash_hex(),
                    d.size()
                )
            } else {
                String::new()
            },
            write_offset: (i << 20) as i64,
            finish_write: (i + 1) << 20 >= LARGE,
            data: part.to_vec(),
        })
        .collect();
    bytestream(a)
        .write(stream::iter(reqs))
        .await
        .context("ByteStream.Write")?;
    let mb = LARGE as f64 / 1e6;
    row(
        "ByteStream.Write, one 64 MiB blob (A)",
        format!("{:.0} MB/s", mb / start.elapsed().as_secs_f64()),
    );
    for label in ["first", "again"] {
        let start = Instant::now();
        read(b, &d).await?;
        row(
            &format!("ByteStream.Read, one 64 MiB blob, {label} (B)"),
            format!("{:.0} MB/s", mb / start.elapsed().as_secs_f64()),
        );
    }
    crate::noop_actions(a, actions).await?;
    // Sent to B, run by A's executor: with a shared queue, the trip through
    // Redis to the other replica and back.
    let action = crate::noop_action(a).await?;
    row(
        "No-op action round trip, executed, sent to B (run on A's executor)",
        crate::executed_times(b, action, actions).await?,
    );
    Ok(())
}

async fn find_missing(c: &Channel, digests: &[reapi::Digest]) -> Result<usize> {
    let resp = cas(c)
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            blob_digests: digests.to_vec(),
            ..Default::default()
        })
        .await
        .context("FindMissingBlobs")?;
    Ok(resp.into_inner().missing_blob_digests.len())
}

async fn read(c: &Channel, d: &Digest) -> Result<()> {
    let mut s = bytestream(c)
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            ..Default::default()
        })
        .await
        .context("ByteStream.Read")?
        .into_inner();
    let mut got = 0;
    while let Some(m) = s.message().await? {
        got += m.data.len();
    }
    ensure!(got as u64 == d.size(), "read {got} of {} bytes", d.size());
    Ok(())
}
