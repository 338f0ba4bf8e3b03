use std::collections::HashSet;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use hearth_proto::reapi::{
    batch_read_blobs_response, batch_update_blobs_response,
    content_addressable_storage_server::ContentAddressableStorage, BatchReadBlobsRequest,
    BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, Directory,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetChunkMappingRequest,
    GetChunkMappingResponse, GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest,
    RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest,
    SplitBlobResponse,
};
use hearth_storage::{Digest, StoreError};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{ok_status, rpc_status, store_status};
use crate::validate::check_metadata_size;
use crate::Context;
pub struct CasService {
    ctx: Context,
}

impl CasService {
    pub fn new(ctx: Context) -> Self {
        CasService { ctx }
    }

    fn check_batch_size(&self, total: usize, what: &str) -> Result<(), Status> {
        let max = self.ctx.limits.max_batch_bytes;
        if total > max {
            return Err(Status::invalid_argument(format!(
                "{what}: the blobs total {total} bytes, over the batch limit of {max} bytes \
                 (max_batch_total_size_bytes); use ByteStream for large blobs"
            )));
        }
        Ok(())
    }
}

fn parse_digests(list: &[hearth_proto::reapi::Digest], what: &str) -> Result<Vec<Digest>, Status> {
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            Digest::from_proto(d).map_err(|e| Status::invalid_argument(format!("{what}[{i}]: {e}")))
        })
        .collect()
}

/// Page size for GetTree (directories per response).
const TREE_PAGE: usize = 1000;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let cas = self.ctx.store_for(&*self.ctx.caller(&request)?);
        let req = request.into_inner();
        self.ctx.check_instance(&req.instance_name)?;
        let digests = parse_digests(&req.blob_digests, "blob_digests")?;
        let missing = cas
            .find_missing(&digests)
            .await
            .map_err(|e| store_status(e, "FindMissingBlobs"))?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let cas = self.ctx.store_for(&*self.ctx.caller(&request)?);
        let req = request.into_inner();
        self.ctx.check_instance(&req.instance_name)?;
        let total: usize = req.requests.iter().map(|r| r.data.len()).sum();
        self.check_batch_size(total, "BatchUpdateBlobs")?;
        for (i, r) in req.requests.iter().enumerate() {
            if r.compressor != 0 {
                return Err(Status::invalid_argument(format!(
                    "requests[{i}]: compressor {} is not supported; send identity data",
                    r.compressor
                )));
            }
        }
        let cas = &cas;
        let responses = stream::iter(req.requests.into_iter().enumerate())
            .map(|(i, r)| async move {
                let status =
                    match Digest::from_field(r.digest.as_ref(), &format!("requests[{i}].digest")) {
                        Err(e) => rpc_status(&Status::invalid_argument(e.to_string())),
                        Ok(d) => match cas.put(&d, Bytes::from(r.data)).await {
                            Ok(()) => ok_status(),
                            Err(e) => rpc_status(&store_status(e, &format!("requests[{i}]"))),
                        },
                    };
                batch_update_blobs_response::Response {
                    digest: r.digest,
                    status: Some(status),
                }
            })
            .buffered(self.ctx.limits.batch_parallelism)
            .collect::<Vec<_>>()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let cas = self.ctx.store_for(&*self.ctx.caller(&request)?);
        let req = request.into_inner();
        self.ctx.check_instance(&req.instance_name)?;
        let digests = parse_digests(&req.digests, "digests")?;
        let total: u64 = digests.iter().map(Digest::size).sum();
        self.check_batch_size(total as usize, "BatchReadBlobs")?;
        let cas = &cas;
        let responses = stream::iter(digests)
            .map(|d| async move {
                let (data, status) = match cas.read(&d, 0, None).await {
                    Ok(b) => (b.to_vec(), ok_status()),
                    Err(e) => (vec![], rpc_status(&store_status(e, "BatchReadBlobs"))),
                };
                batch_read_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    data,
                    compressor: 0,
                    status: Some(status),
                }
            })
            .buffered(self.ctx.limits.batch_parallelism)
            .collect::<Vec<_>>()
            .await;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetChunkMappingStream = BoxStream<'static, Result<GetChunkMappingResponse, Status>>;

    async fn split_blob(
        &self,
        _: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob: blob chunking is not supported",
        ))
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob: blob chunking is not supported",
        ))
    }

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented(
            "GetChunkMapping: blob chunking is not supported",
        ))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented(
            "RegisterChunkMapping: blob chunking is not supported",
        ))
    }

    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let cas = self.ctx.store_for(&*self.ctx.caller(&request)?);
        let req = request.into_inner();
        self.ctx.check_instance(&req.instance_name)?;
        let root = Digest::from_field(req.root_digest.as_ref(), "root_digest")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let page_size = if req.page_size > 0 {
            (req.page_size as usize).min(TREE_PAGE)
        } else {
            TREE_PAGE
        };
        // The page token is the number of directories already returned, in
        // breadth-first order; the walk is deterministic, so it resumes exactly.
        let skip: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token {:?} is not one this server issued",
                    req.page_token
                ))
            })?
        };
        let max_blob = self.ctx.limits.max_metadata_blob_bytes;
        let mut queue = std::collections::VecDeque::from([root]);
        let mut seen = HashSet::new();
        let mut all = Vec::new();
        while let Some(d) = queue.pop_front() {
            if !seen.insert(d) {
                continue;
            }
            check_metadata_size(&d, "GetTree: Directory", max_blob)?;
            let data = match cas.read(&d, 0, None).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) if d != root => continue,
                Err(e) => return Err(store_status(e, "GetTree")),
            };
            let dir = Directory::decode(data).map_err(|e| {
                Status::invalid_argument(format!(
                    "GetTree: directory {d} is not a Directory message: {e}"
                ))
            })?;
            for child in &dir.directories {
                if let Ok(cd) = Digest::from_field(child.digest.as_ref(), "child") {
                    queue.push_back(cd);
                }
            }
            all.push(dir);
        }
        let pages: Vec<Result<GetTreeResponse, Status>> = {
            let rest: Vec<Directory> = all.into_iter().skip(skip).collect();
            let mut chunks: Vec<Vec<Directory>> =
                rest.chunks(page_size).map(<[Directory]>::to_vec).collect();
            // A client that names a page size gets one page and a token for
            // the next; otherwise the whole tree is streamed.
            let n_all = chunks.len();
            if req.page_size > 0 {
                chunks.truncate(1);
            }
            let n = chunks.len();
            if n == 0 {
                vec![Ok(GetTreeResponse {
                    directories: vec![],
                    next_page_token: String::new(),
                })]
            } else {
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, directories)| {
                        let next = if i + 1 < n_all {
                            (skip + (i + 1) * page_size).to_string()
                        } else {
                            String::new()
                        };
                        Ok(GetTreeResponse {
                            directories,
                            next_page_token: next,
                        })
                    })
                    .collect()
            }
        };
        Ok(Response::new(stream::iter(pages).boxed()))
    }
}
