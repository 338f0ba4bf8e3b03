//! ByteStream Read (with offset/limit) and resumable Write.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use hearth_proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use hearth_storage::{BlobStore, Digest};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::store_status;
use crate::resource::{parse_read, parse_write};
use crate::Context;

/// Bytes per ReadResponse.
const READ_CHUNK: u64 = 1024 * 1024;
/// Uploads are buffered in memory up to this size, then spilled to a file.
const SPILL_AT: usize = 4 * 1024 * 1024;

pub struct ByteStreamService {
    ctx: Context,
    /// Partial uploads kept for resumption, by (upload id, digest).
    uploads: Arc<Mutex<HashMap<(String, Digest), Upload>>>,
}

impl ByteStreamService {
    pub fn new(ctx: Context) -> Self {
        ByteStreamService {
            ctx,
            uploads: Arc::default(),
        }
    }

    fn take_upload(&self, key: &(String, Digest)) -> Option<Upload> {
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
    }

    fn committed(&self, key: &(String, Digest)) -> Option<u64> {
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|u| u.committed)
    }

    fn park_upload(&self, key: (String, Digest), upload: Upload) {
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, upload);
    }
}

/// A blob being received: in memory while small, in a staging file after.
struct Upload {
    committed: u64,
    buf: Vec<u8>,
    file: Option<(PathBuf, tokio::fs::File)>,
}

impl Upload {
    fn new() -> Self {
        Upload {
            committed: 0,
            buf: Vec::new(),
            file: None,
        }
    }

    async fn append(&mut self, cas: &dyn BlobStore, data: &[u8]) -> Result<(), Status> {
        self.committed += data.len() as u64;
        if self.file.is_none() && self.buf.len() + data.len() <= SPILL_AT {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        if self.file.is_none() {
            let path = cas
                .staging_dir()
                .join(format!("upload-{}", uuid::Uuid::new_v4()));
            let f = tokio::fs::File::create(&path)
                .await
                .map_err(|e| io_status(e, "creating upload file"))?;
            self.file = Some((path, f));
        }
        let (_, f) = self.file.as_mut().expect("file was just set");
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            f.write_all(&buf)
                .await
                .map_err(|e| io_status(e, "writing upload"))?;
        }
        f.write_all(data)
            .await
            .map_err(|e| io_status(e, "writing upload"))
    }

    async fn commit(self, cas: &dyn BlobStore, digest: &Digest) -> Result<(), Status> {
        match self.file {
            None => cas.put(digest, Bytes::from(self.buf)).await,
            Some((path, mut f)) => {
                f.flush()
                    .await
                    .map_err(|e| io_status(e, "writing upload"))?;
                drop(f);
                cas.adopt_file(digest, &path).await
            }
        }
        .map_err(|e| store_status(e, "ByteStream.Write"))
    }

    async fn discard(self) {
        if let Some((path, _)) = self.file {
            let _ = tokio::fs::remove_file(path).await;
        }
    }
}

fn io_status(e: std::io::Error, what: &str) -> Status {
    if e.raw_os_error() == Some(28) {
        Status::resource_exhausted(format!("{what}: {e}"))
    } else {
        Status::internal(format!("{what}: {e}"))
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let req = request.into_inner();
        let res = parse_read(&req.resource_name)?;
        self.ctx.check_instance(&res.instance)?;
        if req.read_offset < 0 {
            return Err(Status::out_of_range(format!(
                "read_offset {} is negative",
                req.read_offset
            )));
        }
        if req.read_limit < 0 {
            return Err(Status::invalid_argument(format!(
                "read_limit {} is negative",
                req.read_limit
            )));
        }
        let d = res.digest;
        let start = req.read_offset as u64;
        if start > d.size() {
            return Err(Status::out_of_range(format!(
                "read_offset {start} is beyond the end of blob {d}"
            )));
        }
        let end = if req.read_limit > 0 {
            d.size().min(start + req.read_limit as u64)
        } else {
            d.size()
        };
        let cas = self.ctx.cas.clone();
        let first = cas
            .read(&d, start, Some((end - start).min(READ_CHUNK)))
            .await
            .map_err(|e| store_status(e, "ByteStream.Read"))?;
        let next = start + first.len() as u64;
        let rest = stream::unfold(next, move |off| {
            let cas = cas.clone();
            async move {
                if off >= end {
                    return None;
                }
                let item = cas
                    .read(&d, off, Some((end - off).min(READ_CHUNK)))
                    .await
                    .map(|data| ReadResponse {
                        data: data.to_vec(),
                    })
                    .map_err(|e| store_status(e, "ByteStream.Read"));
                let next = match &item {
                    Ok(r) => off + r.data.len() as u64,
                    Err(_) => end,
                };
                Some((item, next))
            }
        });
        let head = stream::iter([Ok(ReadResponse {
            data: first.to_vec(),
        })]);
        Ok(Response::new(head.chain(rest).boxed()))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty ByteStream.Write: no request messages")
        })?;
        let resource = first.resource_name.clone();
        let res = parse_write(&resource)?;
        self.ctx.check_instance(&res.instance)?;
        let d = res.digest;
        let cas = self.ctx.cas.as_ref();
        let done = WriteResponse {
            committed_size: d.size() as i64,
        };
        if cas
            .find_missing(&[d])
            .await
            .map_err(|e| store_status(e, "ByteStream.Write"))?
            .is_empty()
        {
            // Already stored: tell the client it can stop sending.
            return Ok(Response::new(done));
        }
        let key = (res.upload_id.unwrap_or_default(), d);
        let mut upload = self.take_upload(&key).unwrap_or_else(Upload::new);
        let mut msg = first;
        loop {
            if !msg.resource_name.is_empty() && msg.resource_name != resource {
                upload.discard().await;
                return Err(Status::invalid_argument(format!(
                    "resource_name changed within one write: {:?} then {:?}",
                    resource, msg.resource_name
                )));
            }
            if msg.write_offset != upload.committed as i64 {
                let committed = upload.committed;
                self.park_upload(key, upload);
                return Err(Status::invalid_argument(format!(
                    "write_offset {} does not match the {} bytes committed so far for {resource}",
                    msg.write_offset, committed
                )));
            }
            if upload.committed + msg.data.len() as u64 > d.size() {
                upload.discard().await;
                return Err(Status::invalid_argument(format!(
                    "more data than the {} bytes declared in {resource}",
                    d.size()
                )));
            }
            if let Err(e) = upload.append(cas, &msg.data).await {
                upload.discard().await;
                return Err(e);
            }
            if msg.finish_write {
                break;
            }
            match stream.message().await {
                Ok(Some(m)) => msg = m,
                Ok(None) | Err(_) => {
                    // The client went away: keep what arrived so it can resume.
                    self.park_upload(key, upload);
                    return Err(Status::aborted(format!(
                        "write of {resource} ended before finish_write; resume with QueryWriteStatus"
                    )));
                }
            }
        }
        if upload.committed != d.size() {
            let got = upload.committed;
            upload.discard().await;
            return Err(Status::invalid_argument(format!(
                "finish_write after {got} bytes, but {resource} declares {} bytes",
                d.size()
            )));
        }
        upload.commit(cas, &d).await?;
        Ok(Response::new(done))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let req = request.into_inner();
        let res = parse_write(&req.resource_name)?;
        self.ctx.check_instance(&res.instance)?;
        let d = res.digest;
        let present = self
            .ctx
            .cas
            .find_missing(&[d])
            .await
            .map_err(|e| store_status(e, "QueryWriteStatus"))?
            .is_empty();
        if present {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: d.size() as i64,
                complete: true,
            }));
        }
        let key = (res.upload_id.unwrap_or_default(), d);
        match self.committed(&key) {
            Some(committed) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: committed as i64,
                complete: false,
            })),
            None => Err(Status::not_found(format!(
                "no upload in progress for {}",
                req.resource_name
            ))),
        }
    }
}
