//! A [`BlobStore`] backed by a remote REAPI CAS: what a remote executor uses
//! to fetch inputs and upload outputs.
//!
//! Big blobs never sit whole in memory: [`GrpcStore::download_into`] passes
//! ByteStream chunks to a [`BlobSink`] of the local store, which writes and
//! hashes them on a blocking thread and keeps the blob only if it matches its
//! digest; [`GrpcStore::upload_from`] reads the local file chunk by chunk on
//! a blocking thread into the ByteStream.Write. Either way a blob in transit
//! costs a few chunks of memory, and no SHA-256 or file I/O runs on the
//! runtime's threads (shared with the server in `hearth up`).

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use crate::client::ServerChannel;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use hearth_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use hearth_proto::reapi::{
    batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient, BatchReadBlobsRequest,
    BatchUpdateBlobsRequest, FindMissingBlobsRequest,
};
use hearth_storage::{BlobSource, BlobStore, Digest, DiskStore, StoreError, StoreResult};
use tokio::sync::mpsc;

/// Blobs up to this size go through the batch calls; bigger ones stream.
pub(crate) const BATCH_BLOB_LIMIT: u64 = 1024 * 1024;
/// Bytes per WriteRequest (and per read from the file being uploaded).
pub(crate) const WRITE_CHUNK: usize = 1024 * 1024;
/// The ByteStream.Write requests that upload `data` as `resource`, 1 MiB
/// each; each request's copy is made as it is sent, not all up front.
pub fn write_requests(
    resource: String,
    data: Bytes,
) -> impl futures::Stream<Item = WriteRequest> + Send + 'static {
    let len = data.len();
    stream::iter((0..len).step_by(WRITE_CHUNK)).map(move |start| {
        let end = (start + WRITE_CHUNK).min(len);
        WriteRequest {
            resource_name: if start == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: start as i64,
            finish_write: end == len,
            data: data[start..end].to_vec(),
        }
    })
}

/// WriteRequests read ahead of the network.
const WRITE_QUEUE: usize = 2;
/// Digests per FindMissingBlobs call.
const FIND_MISSING_CHUNK: usize = 10_000;

pub struct GrpcStore {
    channel: ServerChannel,
    instance: String,
    max_message: usize,
}

/// A remote CAS error keeps its status code (UNAVAILABLE stays UNAVAILABLE,
/// so the action can be retried, not failed as INTERNAL).
fn remote_err(what: &str, s: tonic::Status) -> StoreError {
    StoreError::Remote {
        context: format!("remote CAS {what}"),
        code: s.code() as i32,
        message: s.message().to_string(),
    }
}

/// Tries a read-only unary call again (four more times, 0.2 s to 1.6 s
/// apart) when no server answered it: the connection broke or was refused,
/// or the server said UNAVAILABLE. When a replica dies the session moves to
/// the next one within these seconds, and the retry goes there; an action
/// fetching its inputs when its replica died goes on instead of failing.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut delay = std::time::Duration::from_millis(200);
    let mut tries = 0;
    loop {
        match call().await {
            Err(s) if tries < 4 && no_answer(&s) => {
                tracing::debug!(error = %s, "no answer from the server; trying again");
                tokio::time::sleep(delay).await;
                delay *= 2;
                tries += 1;
            }
            answer => return answer,
        }
    }
}

/// A status no server sent: tonic made it from a transport failure (it
/// carries the cause), or the server was unavailable.
fn no_answer(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        || (s.code() == tonic::Code::Unknown && std::error::Error::source(s).is_some())
}

fn rpc_err(what: &str, d: &Digest, s: &hearth_proto::rpc::Status) -> StoreError {
    if s.code == tonic::Code::NotFound as i32 {
        return StoreError::NotFound(*d);
    }
    StoreError::Remote {
        context: format!("remote CAS {what} {d}"),
        code: s.code,
        message: s.message.clone(),
    }
}

impl GrpcStore {
    pub fn new(channel: ServerChannel, instance: impl Into<String>) -> Self {
        GrpcStore {
            channel,
            instance: instance.into(),
            max_message: 64 * 1024 * 1024,
        }
    }

    fn cas(&self) -> ContentAddressableStorageClient<ServerChannel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message)
    }

    fn bytestream(&self) -> ByteStreamClient<ServerChannel> {
        ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(self.max_message)
    }

    /// Reads many small blobs in as few BatchReadBlobs calls as the batch
    /// limit allows; larger ones one by one over ByteStream.
    pub async fn read_many(&self, digests: &[Digest]) -> StoreResult<Vec<(Digest, Bytes)>> {
        let mut out = Vec::with_capacity(digests.len());
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.iter().partition(|d| d.size() <= BATCH_BLOB_LIMIT);
        let mut batch: Vec<Digest> = Vec::new();
        let mut batch_bytes = 0u64;
        for d in small {
            if batch_bytes + d.size() > 3 * BATCH_BLOB_LIMIT && !batch.is_empty() {
                out.extend(self.batch_read(&std::mem::take(&mut batch)).await?);
                batch_bytes = 0;
            }
            batch_bytes += d.size();
            batch.push(d);
        }
        if !batch.is_empty() {
            out.extend(self.batch_read(&batch).await?);
        }
        for d in large {
            out.push((d, self.read(&d, 0, None).await?));
        }
        Ok(out)
    }

    async fn batch_read(&self, digests: &[Digest]) -> StoreResult<Vec<(Digest, Bytes)>> {
        let request = BatchReadBlobsRequest {
            instance_name: self.instance.clone(),
            digests: digests.iter().map(Digest::to_proto).collect(),
            acceptable_compressors: vec![],
            digest_function: 0,
        };
        let resp = retrying(|| {
            let (mut cas, request) = (self.cas(), request.clone());
            async move { cas.batch_read_blobs(request).await }
        })
        .await
        .map_err(|s| remote_err("BatchReadBlobs", s))?
        .into_inner();
        // Up to a few megabytes to hash: on the blocking pool.
        blocking(move || {
            let mut out = Vec::new();
            for r in resp.responses {
                let d = Digest::from_field(r.digest.as_ref(), "BatchReadBlobs response digest")?;
                if let Some(s) = r.status.as_ref().filter(|s| s.code != 0) {
                    return Err(rpc_err("read", &d, s));
                }
                verify(&d, &r.data)?;
                out.push((d, Bytes::from(r.data)));
            }
            Ok(out)
        })
        .await
    }

    fn read_resource(&self, d: &Digest) -> String {
        let resource = format!("{}/blobs/{}/{}", self.instance, d.hash_hex(), d.size());
        resource.trim_start_matches('/').to_string()
    }

    fn write_resource(&self, d: &Digest) -> String {
        let resource = format!(
            "{}/uploads/{}/blobs/{}/{}",
            self.instance,
            uuid::Uuid::new_v4(),
            d.hash_hex(),
            d.size()
        );
        resource.trim_start_matches('/').to_string()
    }

    /// Opens a ByteStream.Read of a whole blob.
    async fn open_read(
        &self,
        d: &Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> StoreResult<tonic::Streaming<hearth_proto::bytestream::ReadResponse>> {
        match self
            .bytestream()
            .read(ReadRequest {
                resource_name: self.read_resource(d),
                read_offset: offset as i64,
                read_limit: limit.unwrap_or(0) as i64,
            })
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::NotFound => Err(StoreError::NotFound(*d)),
            Err(s) => Err(remote_err("ByteStream.Read", s)),
        }
    }

    /// Fetches a blob into `local` chunk by chunk (see the module
    /// documentation); a blob that does not match its digest is refused
    /// and nothing is stored.
    pub async fn download_into(&self, d: &Digest, local: &DiskStore) -> StoreResult<()> {
        if d.is_empty_blob() {
            return Ok(()); // every store has it
        }
        let mut stream = self.open_read(d, 0, None).await?;
        let mut sink = local.sink(*d);
        loop {
            match stream.message().await {
                Ok(Some(m)) => sink.send(Bytes::from(m.data)).await?,
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(StoreError::NotFound(*d))
                }
                Err(s) => return Err(remote_err("ByteStream.Read", s)),
            }
        }
        sink.finish().await
    }

    /// Sends a blob of `local` to the server chunk by chunk (see the module
    /// documentation).
    pub async fn upload_from(&self, d: &Digest, local: &Arc<DiskStore>) -> StoreResult<()> {
        if d.is_empty_blob() {
            return Ok(()); // every CAS has it
        }
        let (local, digest) = (local.clone(), *d);
        self.write_file(d, move || local.open_blob(&digest)).await
    }

    /// ByteStream.Write of the file `open` gives, which holds blob `d`: a
    /// blocking thread reads it into a short queue of WriteRequests.
    async fn write_file(
        &self,
        d: &Digest,
        open: impl FnOnce() -> StoreResult<File> + Send + 'static,
    ) -> StoreResult<()> {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let (resource, size) = (self.write_resource(d), d.size());
        let reader = tokio::task::spawn_blocking(move || {
            let mut file = open()?;
            let mut offset = 0u64;
            loop {
                let mut data = vec![0u8; WRITE_CHUNK.min((size - offset) as usize)];
                file.read_exact(&mut data)
                    .map_err(|e| StoreError::io("reading a blob to upload", e))?;
                let finish_write = offset + data.len() as u64 >= size;
                let req = WriteRequest {
                    resource_name: if offset == 0 {
                        resource.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset as i64,
                    finish_write,
                    data,
                };
                offset = if finish_write {
                    size
                } else {
                    offset + WRITE_CHUNK as u64
                };
                // A closed queue: the server answered early (it has the blob).
                if tx.blocking_send(req).is_err() || finish_write {
                    return Ok(());
                }
            }
        });
        let sent = self
            .bytestream()
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let read = reader
            .await
            .map_err(|e| StoreError::io("upload reader thread", std::io::Error::other(e)))?;
        // A read failure explains a failed write (the stream ended early).
        read?;
        sent.map_err(|s| remote_err("ByteStream.Write", s))?;
        Ok(())
    }
}

fn verify(d: &Digest, data: &[u8]) -> StoreResult<()> {
    StoreError::check_digest(d, Digest::of(data))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::io("remote CAS worker thread", std::io::Error::other(e)))?
}

#[async_trait]
impl BlobStore for GrpcStore {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let request = FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                digest_function: 0,
            };
            let resp = retrying(|| {
                let (mut cas, request) = (self.cas(), request.clone());
                async move { cas.find_missing_blobs(request).await }
            })
            .await
            .map_err(|s| remote_err("FindMissingBlobs", s))?
            .into_inner();
            for d in &resp.missing_blob_digests {
                missing.push(Digest::from_proto(d)?);
            }
        }
        Ok(missing)
    }

    /// In memory: for small blobs and ranges (big inputs go through
    /// [`GrpcStore::download_into`]).
    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        let mut stream = self.open_read(digest, offset, limit).await?;
        let mut buf =
            Vec::with_capacity(limit.unwrap_or(digest.size()).min(digest.size()) as usize);
        loop {
            match stream.message().await {
                Ok(Some(m)) => buf.extend_from_slice(&m.data),
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(StoreError::NotFound(*digest))
                }
                Err(s) => return Err(remote_err("ByteStream.Read", s)),
            }
        }
        if offset == 0 && limit.is_none() {
            let d = *digest;
            return blocking(move || verify(&d, &buf).map(|_| Bytes::from(buf))).await;
        }
        Ok(Bytes::from(buf))
    }

    async fn write(&self, digest: &Digest, source: BlobSource) -> StoreResult<()> {
        match source {
            BlobSource::Bytes(data) => self.put_bytes(digest, data).await,
            BlobSource::File(file) => {
                // Streamed up (the server verifies it), then deleted.
                let owned = file.path().to_path_buf();
                let sent = self
                    .write_file(digest, move || {
                        File::open(&owned)
                            .map_err(|e| StoreError::io(format!("opening {}", owned.display()), e))
                    })
                    .await;
                file.remove().await;
                sent
            }
        }
    }
}

impl GrpcStore {
    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> StoreResult<()> {
        if digest.size() <= BATCH_BLOB_LIMIT {
            let resp = self
                .cas()
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    instance_name: self.instance.clone(),
                    requests: vec![batch_update_blobs_request::Request {
                        digest: Some(digest.to_proto()),
                        data: data.to_vec(),
                        compressor: 0,
                    }],
                    digest_function: 0,
                })
                .await
                .map_err(|s| remote_err("BatchUpdateBlobs", s))?
                .into_inner();
            for r in resp.responses {
                if let Some(s) = r.status.as_ref().filter(|s| s.code != 0) {
                    return Err(rpc_err("write", digest, s));
                }
            }
            return Ok(());
        }
        self.bytestream()
            .write(write_requests(self.write_resource(digest), data))
            .await
            .map_err(|s| remote_err("ByteStream.Write", s))?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "remote_cas_tests.rs"]
mod tests;
