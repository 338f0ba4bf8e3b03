//! The executor's view of the CAS: a local disk store that inputs are
//! hardlinked from, filled on demand from the server's CAS. In `hearth up`
//! the local store *is* the server's disk store and nothing is copied; when
//! that disk is a cache in front of a bucket, the bucket is the upstream.

use std::path::PathBuf;
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use hearth_storage::{BlobSource, BlobStore, Digest, DiskStore, PinGuard};

use crate::error::{ExecError, ExecResult};
use crate::remote_cas::{GrpcStore, BATCH_BLOB_LIMIT};

/// Concurrent fetches from the server.
const FETCH_PARALLELISM: usize = 8;

#[derive(Clone)]
pub struct LocalCas {
    local: Arc<DiskStore>,
    /// Where blobs the local store lacks come from and outputs go, when the
    /// local store is not the whole CAS.
    upstream: Option<Upstream>,
}

#[derive(Clone)]
enum Upstream {
    /// The server's CAS, over gRPC.
    Server(Arc<GrpcStore>),
    /// The durable tier behind the server's disk (`hearth up` on a bucket).
    Tier(Arc<dyn BlobStore>),
}

impl Upstream {
    fn store(&self) -> &dyn BlobStore {
        match self {
            Upstream::Server(s) => s.as_ref(),
            Upstream::Tier(s) => s.as_ref(),
        }
    }
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
            upstream: Some(Upstream::Server(upstream)),
        }
    }

    /// The server's disk store, with the durable tier behind it
    /// (`hearth up --cas-store s3://…`): outputs go to both.
    pub fn tiered(local: Arc<DiskStore>, slow: Arc<dyn BlobStore>) -> Self {
        LocalCas {
            local,
            upstream: Some(Upstream::Tier(slow)),
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
        let fetched = match upstream {
            Upstream::Server(server) => self.fetch_from_server(server, &missing).await,
            Upstream::Tier(slow) => {
                stream::iter(missing.iter().copied())
                    .map(|d| async move {
                        hearth_storage::copy_into_disk(slow.as_ref(), &self.local, &d)
                            .await
                            .map_err(|e| ExecError::store("fetching an input from the bucket", e))
                    })
                    .buffer_unordered(FETCH_PARALLELISM)
                    .try_collect::<Vec<()>>()
                    .await
            }
        };
        match fetched {
            Ok(_) => Ok(()),
            // The server lacks some: name them all, for the client to upload.
            Err(e) if !e.missing_blobs().is_empty() => {
                let gone = upstream
                    .store()
                    .find_missing(&missing)
                    .await
                    .unwrap_or_default();
                Err(if gone.is_empty() {
                    e
                } else {
                    ExecError::MissingInputs(gone)
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Small blobs in batches, in memory; big ones one by one, streamed into
    /// the local store (never whole in memory).
    async fn fetch_from_server(
        &self,
        upstream: &GrpcStore,
        missing: &[Digest],
    ) -> ExecResult<Vec<()>> {
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            missing.iter().partition(|d| d.size() <= BATCH_BLOB_LIMIT);
        let batches: Vec<Vec<Digest>> = small
            .chunks(64)
            .map(<[Digest]>::to_vec)
            .chain(large.into_iter().map(|d| vec![d]))
            .collect();
        stream::iter(batches)
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
            .await
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
            .store()
            .find_missing(digests)
            .await
            .map_err(|e| ExecError::store("asking the server which outputs it lacks", e))?;
        stream::iter(missing)
            .map(|d| async move {
                match upstream {
                    // Streamed from the file, never whole in memory.
                    Upstream::Server(server) if d.size() > BATCH_BLOB_LIMIT => server
                        .upload_from(&d, &self.local)
                        .await
                        .map_err(|e| ExecError::store("uploading an output", e)),
                    Upstream::Tier(slow) if d.size() > BATCH_BLOB_LIMIT => {
                        let link = self
                            .local
                            .link_out(&d)
                            .await
                            .map_err(|e| ExecError::store("reading an output", e))?;
                        slow.write(&d, BlobSource::File(link))
                            .await
                            .map_err(|e| ExecError::store("storing an output in the bucket", e))
                    }
                    _ => {
                        let data = self
                            .local
                            .read(&d, 0, None)
                            .await
                            .map_err(|e| ExecError::store("reading an output", e))?;
                        upstream
                            .store()
                            .put(&d, data)
                            .await
                            .map_err(|e| ExecError::store("uploading an output", e))
                    }
                }
            })
            .buffer_unordered(FETCH_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}
