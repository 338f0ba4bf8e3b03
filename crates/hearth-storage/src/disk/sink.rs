//! A blob that arrives in chunks (a ByteStream download), written into the
//! store without ever being whole in memory.
//!
//! The chunks go over a small bounded channel to one blocking-pool thread,
//! which writes them to a staging file and hashes them as they come. So the
//! async side only moves buffers: the file writes and the SHA-256 (a few
//! milliseconds per megabyte) never run on the runtime's threads, and a
//! sender faster than the disk waits on the channel instead of piling up
//! memory. The blob is committed only if it hashes to the digest it was
//! opened for.

use std::fs;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Inner;
use crate::error::IoContext;
use crate::{Digest, DigestHasher, StoreError, StoreResult};

/// Chunks queued between the sender and the writing thread: enough to keep
/// both busy, few enough that a blob's memory stays a few chunks.
const QUEUE: usize = 4;

enum Msg {
    Chunk(Bytes),
    /// Everything was sent: verify and commit. Without it (the sink dropped
    /// mid-blob), the staging file is discarded.
    Finish,
}

/// See the module documentation. Made by [`super::DiskStore::sink`].
pub struct BlobSink {
    tx: mpsc::Sender<Msg>,
    /// The writing thread; taken when its result has been collected.
    task: Option<JoinHandle<StoreResult<()>>>,
}

impl BlobSink {
    pub(super) fn new(inner: Arc<Inner>, expected: Digest) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::task::spawn_blocking(move || receive(&inner, expected, rx));
        BlobSink {
            tx,
            task: Some(task),
        }
    }

    /// Queues the next chunk. An error here is the writer's (the blob was
    /// already longer than its digest says, or the disk failed): stop sending.
    pub async fn send(&mut self, chunk: Bytes) -> StoreResult<()> {
        if self.tx.send(Msg::Chunk(chunk)).await.is_ok() {
            return Ok(());
        }
        // The thread stopped early; its result says why.
        self.result().await.and(Err(StoreError::io(
            "writing a blob",
            std::io::Error::other("the writer stopped before the blob was complete"),
        )))
    }

    /// Ends the blob: commits it if it hashes to the expected digest; a
    /// blob that does not is discarded with [`StoreError::Mismatch`].
    pub async fn finish(mut self) -> StoreResult<()> {
        // A failed send means the thread already ended; result() says how.
        let _ = self.tx.send(Msg::Finish).await;
        self.result().await
    }

    async fn result(&mut self) -> StoreResult<()> {
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| StoreError::io("blob writer thread", std::io::Error::other(e)))?,
            None => Err(StoreError::io(
                "writing a blob",
                std::io::Error::other("the blob writer already ended"),
            )),
        }
    }
}

/// The writing thread: staging file, hash, size bound, commit.
fn receive(inner: &Inner, expected: Digest, mut rx: mpsc::Receiver<Msg>) -> StoreResult<()> {
    let staged = inner.staging_file();
    let result = (|| {
        let mut out = fs::File::create(&staged).ctx(|| format!("creating {}", staged.display()))?;
        let mut hasher = DigestHasher::default();
        let mut len = 0u64;
        loop {
            match rx.blocking_recv() {
                Some(Msg::Chunk(c)) => {
                    len += c.len() as u64;
                    // Stop a sender that goes on past the digest's size
                    // rather than fill the disk with it.
                    if len > expected.size() {
                        return Err(StoreError::Mismatch {
                            expected,
                            actual_hash: "(not computed: too long)".into(),
                            actual_size: len,
                        });
                    }
                    hasher.update(&c);
                    out.write_all(&c)
                        .ctx(|| format!("writing {}", staged.display()))?;
                }
                Some(Msg::Finish) => break,
                None => {
                    return Err(StoreError::io(
                        format!("receiving blob {expected}"),
                        std::io::Error::other("abandoned before it was complete"),
                    ))
                }
            }
        }
        StoreError::check_digest(&expected, hasher.finish())?;
        if expected.is_empty_blob() {
            let _ = fs::remove_file(&staged);
            return Ok(());
        }
        inner.commit(&expected, &staged)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staged);
    }
    result
}
