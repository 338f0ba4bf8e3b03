//! The executor's view of the CAS: a local disk store that inputs are
//! hardlinked from, filled on demand from the server's CAS. In `hearth up`
//! the local store *is* the server's store and nothing is copied.

use std::path::PathBuf;
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use hearth_storage::{BlobStore, Digest, DiskStore, PinGuard};

use crate::error::{ExecError, ExecResult};
use crate::remote_cas::{GrpcStore, BATCH_BLOB_LIMIT};

/// Concurrent fetches from the server.
const FETCH_PARALLELISM: usize = 8;

#[derive(Clone)]
pub struct LocalCas {
    local: Arc<DiskStore>,
    /// The server's CAS, when it is not `local` itself.
    upstream: Option<Arc<GrpcStore>>,
}

impl LocalCas {
    /// The executor shares the server's store (`hearth up`).
    pub fn shared(store: Arc<DiskStore>) -> Self {
        LocalCas {
            local: store,
            upstream: None,
        }
    }

    /// A local cache in front of a remote CAS.
    pub fn caching(local: Arc<DiskStore>, upstream: Arc<GrpcStore>) -> Self {
        LocalCas {
            local,
            upstream: Some(upstream),
        }
    }

    pub fn local(&self) -> &Arc<DiskStore> {
        &self.local
    }

    pub fn path_of(&self, d: &Digest) -> PathBuf {
        self.local.path_of(d)
    }

    /// Pins blobs in the local store for the life of the guard.
    pub fn pin(&self, digests: Vec<Digest>) -> PinGuard {
        PinGuard::new(self.local.clone(), digests)
    }

    /// Makes sure every blob is in the local store, fetching the missing ones.
    pub async fn ensure(&self, digests: &[Digest]) -> ExecResult<()> {
        let missing = self
            .local
            .find_missing(digests)
            .await
            .map_err(|e| ExecError::store("checking the local cache", e))?;
        if missing.is_empty() {
            return Ok(());
        }
        let Some(upstream) = &self.upstream else {
            return Err(ExecError::MissingInputs(missing));
        };
        // Small blobs in batches, in memory; big ones one by one, streamed
        // into the local store (never whole in memory).
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            missing.iter().partition(|d| d.size() <= BATCH_BLOB_LIMIT);
        let batches: Vec<Vec<Digest>> = small
            .chunks(64)
            .map(<[Digest]>::to_vec)
            .chain(large.into_iter().map(|d| vec![d]))
            .collect();
        let fetched = stream::iter(batches)
            .map(|batch| async move {
                if let [d] = batch[..] {
                    if d.size() > BATCH_BLOB_LIMIT {
                        return upstream
                            .download_into(&d, &self.local)
                            .await
                            .map_err(|e| ExecError::store("fetching an input from the server", e));
                    }
                }
                let blobs = upstream
                    .read_many(&batch)
                    .await
                    .map_err(|e| ExecError::store("fetching inputs from the server", e))?;
                for (d, data) in blobs {
                    self.local
                        .put(&d, data)
                        .await
                        .map_err(|e| ExecError::store("caching an input", e))?;
                }
                Ok::<(), ExecError>(())
            })
            .buffer_unordered(FETCH_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await;
        match fetched {
            Ok(_) => Ok(()),
            // The server lacks some: name them all, for the client to upload.
            Err(e) if !e.missing_blobs().is_empty() => {
                let gone = upstream.find_missing(&missing).await.unwrap_or_default();
                Err(if gone.is_empty() {
                    e
                } else {
                    ExecError::MissingInputs(gone)
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Reads a (small) blob, fetching it first if needed.
    pub async fn read(&self, d: &Digest) -> ExecResult<bytes::Bytes> {
        self.ensure(&[*d]).await?;
        self.local
            .read(d, 0, None)
            .await
            .map_err(|e| ExecError::store(format!("reading {d}"), e))
    }

    /// Reads a (small) blob the local store holds. Blocking: for the
    /// blocking pool.
    pub fn read_local(&self, d: &Digest) -> ExecResult<bytes::Bytes> {
        self.local
            .read_blocking(d)
            .map_err(|e| ExecError::store(format!("reading {d}"), e))
    }

    /// Stores a blob locally and makes sure the server has it.
    pub async fn upload(&self, d: &Digest, data: bytes::Bytes) -> ExecResult<()> {
        self.local
            .put(d, data.clone())
            .await
            .map_err(|e| ExecError::store("storing an output", e))?;
        self.push(&[*d]).await
    }

    /// Sends blobs already in the local store to the server, if it lacks them.
    pub async fn push(&self, digests: &[Digest]) -> ExecResult<()> {
        let Some(upstream) = &self.upstream else {
            return Ok(());
        };
        let missing = upstream
            .find_missing(digests)
            .await
            .map_err(|e| ExecError::store("asking the server which outputs it lacks", e))?;
        stream::iter(missing)
            .map(|d| async move {
                if d.size() > BATCH_BLOB_LIMIT {
                    // Streamed from the file, never whole in memory.
                    return upstream
                        .upload_from(&d, &self.local)
                        .await
                        .map_err(|e| ExecError::store("uploading an output", e));
                }
                let data = self
                    .local
                    .read(&d, 0, None)
                    .await
                    .map_err(|e| ExecError::store("reading an output", e))?;
                upstream
                    .put(&d, data)
                    .await
                    .map_err(|e| ExecError::store("uploading an output", e))
            })
            .buffer_unordered(FETCH_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}
