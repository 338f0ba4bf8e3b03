//! Hearth's gRPC surface, one file per service: Capabilities, CAS, ByteStream,
//! ActionCache, Execution, longrunning Operations and the executor protocol.
//! [`Context`] carries the stores and the scheduler they share.

// Deprecated REAPI fields (Command.platform, output_files, …) are read on
// purpose: Bazel 2.1 and 4.2 still send them.
#![allow(deprecated)]

mod ac;
mod access;
pub mod auth;
mod bytestream;
mod capabilities;
mod cas;
mod context;
mod error;
mod execution;
mod operations;
mod request_metrics;
mod resource;
mod runner_snapshots;
pub mod usage;
mod validate;
mod worker;

pub use bytestream::PARKED_UPLOAD_OVERHEAD;
pub use context::{Context, Limits};
pub use error::{missing_blobs_status, store_status};
pub use request_metrics::RequestMetricsLayer;

use hearth_proto::{bytestream as bs, longrunning, reapi, worker as wp};

/// Adds every Hearth service to a tonic router builder.
pub fn routes(ctx: Context) -> tonic::service::Routes {
    let max = ctx.limits.max_message_bytes;
    let mut routes = tonic::service::Routes::default();
    routes = routes
        .add_service(reapi::capabilities_server::CapabilitiesServer::new(
            capabilities::CapabilitiesService::new(ctx.clone()),
        ))
        .add_service(
            reapi::content_addressable_storage_server::ContentAddressableStorageServer::new(
                cas::CasService::new(ctx.clone()),
            )
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            bs::byte_stream_server::ByteStreamServer::new(bytestream::ByteStreamService::new(
                ctx.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            reapi::action_cache_server::ActionCacheServer::new(ac::ActionCacheService::new(
                ctx.clone(),
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            reapi::execution_server::ExecutionServer::new(execution::ExecutionService::new(
                ctx.clone(),
            ))
            .max_decoding_message_size(max),
        )
        .add_service(longrunning::operations_server::OperationsServer::new(
            operations::OperationsService::new(ctx.clone()),
        ))
        .add_service(
            wp::worker_service_server::WorkerServiceServer::new(worker::WorkerService::new(ctx))
                .max_decoding_message_size(max),
        );
    routes
}
