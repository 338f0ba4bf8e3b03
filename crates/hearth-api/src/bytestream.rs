//! ByteStream Read (with offset/limit) and resumable Write.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use hearth_proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use hearth_storage::{BlobSource, BlobStore, Digest, StagedFile, READ_CHUNK};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::store_status;
use crate::resource::{parse_read, parse_write};
use crate::Context;

/// Uploads are buffered in memory up to this size, then spilled to a file.
const SPILL_AT: usize = 4 * 1024 * 1024;

pub struct ByteStreamService {
    ctx: Context,
    /// Partial uploads kept for resumption.
    parked: Arc<Mutex<Parked>>,
}

/// What a parked upload costs on top of its bytes (its staging file's first
/// block and the bookkeeping), so that many tiny parked uploads are bounded too.
pub const PARKED_UPLOAD_OVERHEAD: u64 = 4096;

/// Interrupted uploads by (upload id, digest), kept for resumption until
/// they have been idle for `idle` or until room is needed (least recently
/// active first). Every parked upload is in a staging file, not in memory.
#[derive(Default)]
struct Parked {
    uploads: HashMap<UploadKey, (Upload, Instant, u64)>,
    /// Parking sequence number → key; the first is the least recently active.
    order: BTreeMap<u64, UploadKey>,
    seq: u64,
    /// Sum of the committed bytes and the overhead of every parked upload.
    bytes: u64,
}

/// (tenant and upload id, digest): no tenant resumes another's upload.
type UploadKey = (String, Digest);

fn upload_key(tenant: &str, upload_id: Option<String>) -> String {
    format!("{tenant}\0{}", upload_id.unwrap_or_default())
}

fn charge(u: &Upload) -> u64 {
    u.committed + PARKED_UPLOAD_OVERHEAD
}

impl Parked {
    fn take(&mut self, key: &UploadKey) -> Option<Upload> {
        let (upload, _, seq) = self.uploads.remove(key)?;
        self.order.remove(&seq);
        self.bytes -= charge(&upload);
        Some(upload)
    }

    fn committed(&self, key: &UploadKey) -> Option<u64> {
        self.uploads.get(key).map(|(u, _, _)| u.committed)
    }

    /// Takes out the uploads idle since `now - idle` or longer.
    fn expire(&mut self, now: Instant, idle: Duration) -> Vec<Upload> {
        let mut gone = Vec::new();
        while let Some((_, key)) = self.order.first_key_value() {
            let parked_at = self.uploads[key].1;
            if now.saturating_duration_since(parked_at) < idle {
                break;
            }
            let key = key.clone();
            gone.extend(self.take(&key));
        }
        gone
    }

    /// Parks `upload`, first dropping expired uploads and then the least
    /// recently active ones until it fits under `max_bytes`. Returns what
    /// was dropped (with `upload` itself when it alone is over the bound) for
    /// the caller to discard.
    fn park(
        &mut self,
        key: UploadKey,
        upload: Upload,
        now: Instant,
        idle: Duration,
        max_bytes: u64,
    ) -> Vec<Upload> {
        let mut gone = self.expire(now, idle);
        gone.extend(self.take(&key));
        let need = charge(&upload);
        if need > max_bytes {
            gone.push(upload);
            return gone;
        }
        while self.bytes + need > max_bytes {
            let Some((_, oldest)) = self.order.first_key_value() else {
                break;
            };
            let oldest = oldest.clone();
            gone.extend(self.take(&oldest));
        }
        self.seq += 1;
        self.order.insert(self.seq, key.clone());
        self.bytes += need;
        self.uploads.insert(key, (upload, now, self.seq));
        gone
    }
}

async fn discard_all(uploads: Vec<Upload>) {
    for u in uploads {
        u.discard().await;
    }
}

impl ByteStreamService {
    pub fn new(ctx: Context) -> Self {
        let parked: Arc<Mutex<Parked>> = Arc::default();
        // Expired uploads' files are deleted even when no request comes.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&parked);
            let idle = ctx.limits.partial_upload_idle;
            let every = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
            rt.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(parked) = weak.upgrade() else {
                        return;
                    };
                    let gone = lock(&parked).expire(Instant::now(), idle);
                    drop(parked);
                    discard_all(gone).await;
                }
            });
        }
        ByteStreamService { ctx, parked }
    }

    fn lock(&self) -> MutexGuard<'_, Parked> {
        lock(&self.parked)
    }

    /// Takes a parked upload to continue it (expired ones are dropped first).
    async fn take_upload(&self, key: &UploadKey) -> Option<Upload> {
        let (gone, upload) = {
            let mut parked = self.lock();
            let gone = parked.expire(Instant::now(), self.ctx.limits.partial_upload_idle);
            (gone, parked.take(key))
        };
        discard_all(gone).await;
        upload
    }

    async fn committed(&self, key: &UploadKey) -> Option<u64> {
        let (gone, committed) = {
            let mut parked = self.lock();
            let gone = parked.expire(Instant::now(), self.ctx.limits.partial_upload_idle);
            (gone, parked.committed(key))
        };
        discard_all(gone).await;
        committed
    }

    /// Keeps an interrupted upload for resumption: in a staging file, within
    /// the bounds. An upload with nothing committed is not kept (a client
    /// that asks is told NOT_FOUND and starts over, which is the same).
    async fn park_upload(&self, key: UploadKey, mut upload: Upload) {
        if upload.committed == 0 {
            return upload.discard().await;
        }
        if let Err(e) = upload.close(&self.ctx.spool).await {
            tracing::warn!(error = %e.message(), "dropping an interrupted upload");
            return upload.discard().await;
        }
        let limits = &self.ctx.limits;
        let gone = self.lock().park(
            key,
            upload,
            Instant::now(),
            limits.partial_upload_idle,
            limits.partial_upload_max_bytes,
        );
        discard_all(gone).await;
    }
}

fn lock(parked: &Mutex<Parked>) -> MutexGuard<'_, Parked> {
    parked.lock().unwrap_or_else(|p| p.into_inner())
}

/// A blob being received: in memory while small, in a staging file after.
/// A parked upload has its file closed (`file` None, `path` set), so parked
/// uploads hold no descriptors; continuing it reopens the file.
struct Upload {
    committed: u64,
    buf: Vec<u8>,
    path: Option<PathBuf>,
    file: Option<tokio::fs::File>,
}

impl Upload {
    fn new() -> Self {
        Upload {
            committed: 0,
            buf: Vec::new(),
            path: None,
            file: None,
        }
    }

    async fn append(&mut self, spool: &Path, data: &[u8]) -> Result<(), Status> {
        self.committed += data.len() as u64;
        if self.path.is_none() && self.buf.len() + data.len() <= SPILL_AT {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        let f = self.spill(spool).await?;
        f.write_all(data)
            .await
            .map_err(|e| io_status(e, "writing upload"))
    }

    /// Moves what is buffered in memory to the staging file, creating or
    /// reopening it, and returns the open file.
    async fn spill(&mut self, spool: &Path) -> Result<&mut tokio::fs::File, Status> {
        let mut file = match (self.file.take(), &self.path) {
            (Some(f), _) => f,
            (None, Some(path)) => tokio::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .await
                .map_err(|e| io_status(e, "reopening upload file"))?,
            (None, None) => {
                let path = spool.join(format!("upload-{}", uuid::Uuid::new_v4()));
                let f = tokio::fs::File::create(&path)
                    .await
                    .map_err(|e| io_status(e, "creating upload file"))?;
                self.path = Some(path);
                f
            }
        };
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            file.write_all(&buf)
                .await
                .map_err(|e| io_status(e, "writing upload"))?;
        }
        Ok(self.file.insert(file))
    }

    /// Everything on disk, the file closed: ready to be parked.
    async fn close(&mut self, spool: &Path) -> Result<(), Status> {
        let f = self.spill(spool).await?;
        f.flush()
            .await
            .map_err(|e| io_status(e, "writing upload"))?;
        self.file = None;
        Ok(())
    }

    async fn commit(mut self, cas: &dyn BlobStore, digest: &Digest) -> Result<(), Status> {
        match self.path.take() {
            None => {
                cas.put(digest, Bytes::from(std::mem::take(&mut self.buf)))
                    .await
            }
            Some(path) => {
                let staged = StagedFile::new(path);
                if let Some(mut f) = self.file.take() {
                    f.flush()
                        .await
                        .map_err(|e| io_status(e, "writing upload"))?;
                }
                cas.write(digest, BlobSource::File(staged)).await
            }
        }
        .map_err(|e| store_status(e, "ByteStream.Write"))
    }

    async fn discard(mut self) {
        self.file = None;
        if let Some(path) = self.path.take() {
            let _ = tokio::fs::remove_file(path).await;
        }
    }
}

/// `data` in pieces of at most `max` bytes (one empty piece for no data).
fn split(data: Bytes, max: usize) -> impl Iterator<Item = Bytes> {
    let pieces = data.len().div_ceil(max).max(1);
    (0..pieces).map(move |i| data.slice(i * max..((i + 1) * max).min(data.len())))
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
        let cas = self.ctx.store_for(&*self.ctx.caller(&request)?);
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
        // The store clamps the range to the blob (no limit: to its end).
        let limit = (req.read_limit > 0).then_some(req.read_limit as u64);
        let chunks = cas
            .read_stream(&d, start, limit)
            .await
            .map_err(|e| store_status(e, "ByteStream.Read"))?;
        // A store may hand back bigger chunks than one message should hold.
        let responses = chunks.flat_map(|chunk| {
            let pieces: Vec<Result<ReadResponse, Status>> = match chunk {
                Ok(data) => split(data, READ_CHUNK as usize)
                    .map(|data| {
                        Ok(ReadResponse {
                            data: data.to_vec(),
                        })
                    })
                    .collect(),
                Err(e) => vec![Err(store_status(e, "ByteStream.Read"))],
            };
            stream::iter(pieces)
        });
        Ok(Response::new(responses.boxed()))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let who = self.ctx.caller(&request)?;
        let cas = self.ctx.store_for(&who);
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty ByteStream.Write: no request messages")
        })?;
        let resource = first.resource_name.clone();
        let res = parse_write(&resource)?;
        self.ctx.check_instance(&res.instance)?;
        let d = res.digest;
        let cas = cas.as_ref();
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
        let key = (upload_key(&who.tenant, res.upload_id), d);
        let mut upload = self.take_upload(&key).await.unwrap_or_else(Upload::new);
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
                self.park_upload(key, upload).await;
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
            if let Err(e) = upload.append(&self.ctx.spool, &msg.data).await {
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
                    self.park_upload(key, upload).await;
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
        let who = self.ctx.caller(&request)?;
        let req = request.into_inner();
        let res = parse_write(&req.resource_name)?;
        self.ctx.check_instance(&res.instance)?;
        let d = res.digest;
        let present = self
            .ctx
            .store_for(&who)
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
        let key = (upload_key(&who.tenant, res.upload_id), d);
        match self.committed(&key).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(committed: u64) -> Upload {
        Upload {
            committed,
            ..Upload::new()
        }
    }

    fn key(n: u8) -> UploadKey {
        (format!("u{n}"), Digest::of(&[n]))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn parked_uploads_expire_after_the_idle_time() {
        let mut p = Parked::default();
        let t0 = Instant::now();
        assert!(p.park(key(1), upload(10), t0, HOUR, u64::MAX).is_empty());
        let t1 = t0 + Duration::from_secs(1800);
        assert!(p.park(key(2), upload(20), t1, HOUR, u64::MAX).is_empty());
        assert!(p
            .expire(t0 + HOUR - Duration::from_secs(1), HOUR)
            .is_empty());
        assert_eq!(p.committed(&key(1)), Some(10));
        let gone = p.expire(t0 + HOUR, HOUR);
        assert_eq!(gone.iter().map(|u| u.committed).collect::<Vec<_>>(), [10]);
        assert_eq!(p.committed(&key(1)), None);
        assert_eq!(p.committed(&key(2)), Some(20));
        assert_eq!(p.bytes, 20 + PARKED_UPLOAD_OVERHEAD);
        // Resuming resets the clock: taken and parked again, it is fresh.
        let u = p.take(&key(2)).unwrap();
        let t2 = t1 + Duration::from_secs(3000);
        assert!(p.park(key(2), u, t2, HOUR, u64::MAX).is_empty());
        assert!(p.expire(t1 + HOUR, HOUR).is_empty());
        assert_eq!(p.expire(t2 + HOUR, HOUR).len(), 1);
        assert_eq!((p.bytes, p.uploads.len(), p.order.len()), (0, 0, 0));
    }

    #[test]
    fn parking_over_the_bound_drops_the_least_recently_active_first() {
        let o = PARKED_UPLOAD_OVERHEAD;
        let max = 3 * (100 + o);
        let mut p = Parked::default();
        let t = Instant::now();
        for n in 1..=3 {
            let at = t + Duration::from_secs(n.into());
            assert!(p.park(key(n), upload(100), at, HOUR, max).is_empty());
        }
        // Key 1 is resumed and interrupted again: now the most recent.
        let u = p.take(&key(1)).unwrap();
        assert!(p
            .park(key(1), u, t + Duration::from_secs(4), HOUR, max)
            .is_empty());
        // A fourth needs room for 250 bytes: 2 then 3 go, 1 stays.
        let gone = p.park(key(4), upload(250), t + Duration::from_secs(5), HOUR, max);
        assert_eq!(gone.len(), 2);
        assert_eq!(p.committed(&key(2)), None);
        assert_eq!(p.committed(&key(3)), None);
        assert_eq!(p.committed(&key(1)), Some(100));
        assert_eq!(p.committed(&key(4)), Some(250));
        assert!(p.bytes <= max);
        // One upload bigger than the whole bound is not kept at all.
        let gone = p.park(key(5), upload(max), t + Duration::from_secs(6), HOUR, max);
        assert_eq!(gone.iter().map(|u| u.committed).collect::<Vec<_>>(), [max]);
        assert_eq!(p.committed(&key(5)), None);
        assert_eq!(p.uploads.len(), 2);
    }
}
