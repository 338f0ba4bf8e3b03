//! GrpcStore against a fake ByteStream server: big blobs go up and down in
//! chunks through files, and a blob whose bytes do not match its digest is
//! refused on download.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::stream::BoxStream;
use hearth_proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use hearth_proto::bytestream::WriteResponse;
use hearth_proto::bytestream::{QueryWriteStatusRequest, QueryWriteStatusResponse, ReadResponse};
use tonic::{Request, Response, Status, Streaming};

use super::*;
use hearth_storage::StagedFile;

/// Bytes per ReadResponse from the fake server.
const SERVE_CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct Fake {
    /// Stored blobs by hash.
    blobs: Mutex<HashMap<String, Vec<u8>>>,
    /// The data length of every WriteRequest received.
    write_chunks: Mutex<Vec<usize>>,
    /// Serve every blob with one byte flipped.
    corrupt: bool,
}

/// `…/blobs/HASH/SIZE` → HASH.
fn hash_of(resource: &str) -> String {
    let parts: Vec<&str> = resource.rsplitn(3, '/').collect();
    parts[1].to_string()
}

/// The server's handle on the fake (the test keeps another).
struct Served(Arc<Fake>);

#[tonic::async_trait]
impl ByteStream for Served {
    type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let hash = hash_of(&request.into_inner().resource_name);
        let mut data = self
            .0
            .blobs
            .lock()
            .unwrap()
            .get(&hash)
            .cloned()
            .ok_or_else(|| Status::not_found(hash))?;
        if self.0.corrupt {
            data[0] ^= 1;
        }
        let chunks: Vec<Result<ReadResponse, Status>> = data
            .chunks(SERVE_CHUNK)
            .map(|c| Ok(ReadResponse { data: c.to_vec() }))
            .collect();
        Ok(Response::new(stream::iter(chunks).boxed()))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let (mut hash, mut data) = (String::new(), Vec::new());
        while let Some(m) = stream.message().await? {
            if !m.resource_name.is_empty() {
                hash = hash_of(&m.resource_name);
            }
            if m.write_offset as usize != data.len() {
                return Err(Status::invalid_argument("wrong write_offset"));
            }
            self.0.write_chunks.lock().unwrap().push(m.data.len());
            data.extend_from_slice(&m.data);
            if m.finish_write {
                break;
            }
        }
        let committed_size = data.len() as i64;
        self.0.blobs.lock().unwrap().insert(hash, data);
        Ok(Response::new(WriteResponse { committed_size }))
    }

    async fn query_write_status(
        &self,
        _: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// Serves `fake` on a free port and returns a GrpcStore talking to it.
async fn serve(fake: Arc<Fake>) -> GrpcStore {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ByteStreamServer::new(Served(fake)).max_decoding_message_size(8 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = crate::client::connect(&crate::client::ServerAddress {
        url: format!("grpc://{addr}"),
        ..Default::default()
    })
    .unwrap();
    GrpcStore::new(channel, "")
}

fn big_blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

const BIG: usize = 5 * WRITE_CHUNK + 12345;

#[tokio::test]
async fn a_big_blob_goes_up_in_chunks_from_the_file_and_comes_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let remote = serve(fake.clone()).await;
    let data = big_blob(BIG);
    let d = Digest::of(&data);
    let here = Arc::new(DiskStore::open(&dir.path().join("here"), 0).unwrap());
    here.put(&d, Bytes::from(data.clone())).await.unwrap();

    remote.upload_from(&d, &here).await.unwrap();
    let chunks = fake.write_chunks.lock().unwrap().clone();
    assert_eq!(chunks.len(), BIG.div_ceil(WRITE_CHUNK), "{chunks:?}");
    assert!(chunks.iter().all(|&n| n <= WRITE_CHUNK), "{chunks:?}");
    assert_eq!(fake.blobs.lock().unwrap()[&d.hash_hex()], data);

    let there = DiskStore::open(&dir.path().join("there"), 0).unwrap();
    remote.download_into(&d, &there).await.unwrap();
    assert_eq!(std::fs::read(there.path_of(&d)).unwrap(), data);
}

#[tokio::test]
async fn put_and_file_writes_send_bounded_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let remote = serve(fake.clone()).await;
    let data = big_blob(BIG);
    let d = Digest::of(&data);
    remote.put(&d, Bytes::from(data.clone())).await.unwrap();
    let path = dir.path().join("file");
    std::fs::write(&path, &data).unwrap();
    remote
        .write(&d, BlobSource::File(StagedFile::new(path.clone())))
        .await
        .unwrap();
    assert!(!path.exists(), "a written file is taken");
    let chunks = fake.write_chunks.lock().unwrap().clone();
    assert_eq!(chunks.len(), 2 * BIG.div_ceil(WRITE_CHUNK), "{chunks:?}");
    assert!(chunks.iter().all(|&n| n <= WRITE_CHUNK), "{chunks:?}");
    assert_eq!(fake.blobs.lock().unwrap()[&d.hash_hex()], data);
}

#[tokio::test]
async fn a_blob_the_server_serves_wrong_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake {
        corrupt: true,
        ..Default::default()
    });
    let data = big_blob(BIG);
    let d = Digest::of(&data);
    fake.blobs.lock().unwrap().insert(d.hash_hex(), data);
    let remote = serve(fake).await;
    let there = DiskStore::open(&dir.path().join("there"), 0).unwrap();
    let e = remote.download_into(&d, &there).await.unwrap_err();
    assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
    assert!(!there.contains(&d));
    assert!(!there.path_of(&d).exists());
    assert_eq!(std::fs::read_dir(there.staging_dir()).unwrap().count(), 0);
    // The in-memory read refuses it too.
    let e = remote.read(&d, 0, None).await.unwrap_err();
    assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
}

#[tokio::test]
async fn a_blob_missing_on_the_server_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let remote = serve(Arc::new(Fake::default())).await;
    let there = DiskStore::open(&dir.path().join("there"), 0).unwrap();
    let d = Digest::of(b"nobody has this");
    let e = remote.download_into(&d, &there).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");
}

#[tokio::test]
async fn reads_are_tried_again_only_when_no_server_answered() {
    use std::sync::atomic::{AtomicU32, Ordering};
    // A connection that broke (tonic gives the cause) or an unavailable
    // server: tried again, and the answer that then comes is the result.
    let calls = AtomicU32::new(0);
    let got = retrying(|| {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        async move {
            match n {
                0 => Err(tonic::Status::from_error(Box::new(std::io::Error::other(
                    "broken pipe",
                )))),
                1 => Err(tonic::Status::unavailable("replica going away")),
                _ => Ok(n),
            }
        }
    })
    .await;
    assert_eq!(got.expect("the third answer"), 2);
    // An answer the server gave, even an error, is final.
    let calls = AtomicU32::new(0);
    let got: Result<(), _> = retrying(|| {
        calls.fetch_add(1, Ordering::Relaxed);
        async { Err(tonic::Status::unknown("the server's own failure")) }
    })
    .await;
    assert_eq!(got.expect_err("an error").code(), tonic::Code::Unknown);
    assert_eq!(calls.load(Ordering::Relaxed), 1);
}
