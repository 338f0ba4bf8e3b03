//! Wire types. REAPI, ByteStream, longrunning and google.rpc come from the
//! `bazel-remote-apis` crate; Hearth's executor protocol is compiled from
//! `proto/hearth/worker/v1/worker.proto`.

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
pub use bazel_remote_apis::build::bazel::semver;
pub use bazel_remote_apis::google::{bytestream, longrunning, protobuf, rpc};

/// Hearth's executor ↔ server protocol.
pub mod worker {
    #![allow(clippy::all)]
    tonic::include_proto!("hearth.worker.v1");
}

/// What server replicas keep in shared state (Redis).
pub mod state {
    #![allow(clippy::all)]
    tonic::include_proto!("hearth.state.v1");
}

/// `google.rpc.PreconditionFailure` from `google/rpc/error_details.proto`,
/// which `bazel-remote-apis` does not ship. Bazel reads it from the details of
/// a FAILED_PRECONDITION status to learn which inputs are missing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PreconditionFailure {
    #[prost(message, repeated, tag = "1")]
    pub violations: Vec<precondition_failure::Violation>,
}

pub mod precondition_failure {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Violation {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(string, tag = "2")]
        pub subject: String,
        #[prost(string, tag = "3")]
        pub description: String,
    }
}

/// Type URL for [`PreconditionFailure`] inside a `google.protobuf.Any`.
pub const PRECONDITION_FAILURE_TYPE_URL: &str =
    "type.googleapis.com/google.rpc.PreconditionFailure";

/// Type URL for [`worker::Attempt`] in `ExecutedActionMetadata.auxiliary_metadata`.
pub const ATTEMPT_TYPE_URL: &str = "type.googleapis.com/hearth.worker.v1.Attempt";

/// Type URL for [`worker::RunnerStart`] in `ExecutedActionMetadata.auxiliary_metadata`.
pub const RUNNER_START_TYPE_URL: &str = "type.googleapis.com/hearth.worker.v1.RunnerStart";
