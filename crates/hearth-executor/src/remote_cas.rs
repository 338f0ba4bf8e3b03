//! A [`BlobStore`] backed by a remote REAPI CAS: what a remote executor uses
//! to fetch inputs and upload outputs.

use std::path::{Path, PathBuf};

use crate::client::ServerChannel;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream;
use hearth_proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use hearth_proto::reapi::{
    batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient, BatchReadBlobsRequest,
    BatchUpdateBlobsRequest, FindMissingBlobsRequest,
};
use hearth_storage::{BlobStore, Digest, StoreError, StoreResult, StoreStats};

/// Blobs up to this size go through the batch calls; bigger ones stream.
const BATCH_BLOB_LIMIT: u64 = 1024 * 1024;
const WRITE_CHUNK: usize = 1024 * 1024;
/// Digests per FindMissingBlobs call.
const FIND_MISSING_CHUNK: usize = 10_000;

pub struct GrpcStore {
    channel: ServerChannel,
    instance: String,
    staging: PathBuf,
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
    pub fn new(channel: ServerChannel, instance: impl Into<String>, staging: PathBuf) -> Self {
        GrpcStore {
            channel,
            instance: instance.into(),
            staging,
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
        let resp = self
            .cas()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: digests.iter().map(Digest::to_proto).collect(),
                acceptable_compressors: vec![],
                digest_function: 0,
            })
            .await
            .map_err(|s| remote_err("BatchReadBlobs", s))?
            .into_inner();
        let mut out = Vec::new();
        for r in resp.responses {
            let d = Digest::from_field(r.digest.as_ref(), "BatchReadBlobs response digest")?;
            if let Some(s) = r.status.as_ref().filter(|s| s.code != 0) {
                return Err(rpc_err("read", &d, s));
            }
            if Digest::of(&r.data) != d {
                return Err(StoreError::Mismatch {
                    expected: d,
                    actual_hash: Digest::of(&r.data).hash_hex(),
                    actual_size: r.data.len() as u64,
                });
            }
            out.push((d, Bytes::from(r.data)));
        }
        Ok(out)
    }
}

#[async_trait]
impl BlobStore for GrpcStore {
    async fn find_missing(&self, digests: &[Digest]) -> StoreResult<Vec<Digest>> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let resp = self
                .cas()
                .find_missing_blobs(FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                    digest_function: 0,
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

    async fn read(&self, digest: &Digest, offset: u64, limit: Option<u64>) -> StoreResult<Bytes> {
        let resource = format!(
            "{}/blobs/{}/{}",
            self.instance,
            digest.hash_hex(),
            digest.size()
        );
        let resource = resource.trim_start_matches('/').to_string();
        let mut stream = match self
            .bytestream()
            .read(ReadRequest {
                resource_name: resource,
                read_offset: offset as i64,
                read_limit: limit.unwrap_or(0) as i64,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(StoreError::NotFound(*digest))
            }
            Err(s) => return Err(remote_err("ByteStream.Read", s)),
        };
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
        if offset == 0 && limit.is_none() && Digest::of(&buf) != *digest {
            return Err(StoreError::Mismatch {
                expected: *digest,
                actual_hash: Digest::of(&buf).hash_hex(),
                actual_size: buf.len() as u64,
            });
        }
        Ok(Bytes::from(buf))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> StoreResult<()> {
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
        let resource = format!(
            "{}/uploads/{}/blobs/{}/{}",
            self.instance,
            uuid::Uuid::new_v4(),
            digest.hash_hex(),
            digest.size()
        );
        let resource = resource.trim_start_matches('/').to_string();
        let chunks: Vec<WriteRequest> = data
            .chunks(WRITE_CHUNK)
            .enumerate()
            .map(|(i, c)| WriteRequest {
                resource_name: if i == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: (i * WRITE_CHUNK) as i64,
                finish_write: (i + 1) * WRITE_CHUNK >= data.len(),
                data: c.to_vec(),
            })
            .collect();
        self.bytestream()
            .write(stream::iter(chunks))
            .await
            .map_err(|s| remote_err("ByteStream.Write", s))?;
        Ok(())
    }

    async fn adopt_file(&self, digest: &Digest, path: &Path) -> StoreResult<()> {
        let data = tokio::fs::read(path)
            .await
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        let _ = tokio::fs::remove_file(path).await;
        self.put(digest, Bytes::from(data)).await
    }

    fn staging_dir(&self) -> &Path {
        &self.staging
    }

    fn pin(&self, _: &[Digest]) {}
    fn unpin(&self, _: &[Digest]) {}

    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}
