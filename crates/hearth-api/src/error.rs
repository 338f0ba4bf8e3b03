//! Mapping store and validation errors onto precise gRPC statuses.

use hearth_proto::{
    precondition_failure, protobuf, rpc, PreconditionFailure, PRECONDITION_FAILURE_TYPE_URL,
};
use hearth_scheduler::SubmitError;
use hearth_storage::{Digest, StoreError};
use prost::Message;
use tonic::{Code, Status};

/// The gRPC status for a store error, with `what` naming the request part.
pub fn store_status(err: StoreError, what: &str) -> Status {
    let msg = format!("{what}: {err}");
    match &err {
        StoreError::InvalidDigest(_) | StoreError::Mismatch { .. } => Status::invalid_argument(msg),
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::OutOfRange { .. } => Status::out_of_range(msg),
        StoreError::Io { source, .. } if source.raw_os_error() == Some(28) => {
            Status::resource_exhausted(msg)
        }
        StoreError::Io { .. } => Status::internal(msg),
        StoreError::Backend { .. } => Status::unavailable(msg),
        StoreError::Remote { code, .. } => Status::new(Code::from_i32(*code), msg),
    }
}

/// The status of a queue that refused a job.
pub fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::NoMatchingExecutor(_) => Status::failed_precondition(e.to_string()),
        SubmitError::Unavailable(_) => Status::unavailable(e.to_string()),
    }
}

/// The rpc::Status form of a tonic status, for batch responses.
pub fn rpc_status(s: &Status) -> rpc::Status {
    rpc::Status {
        code: s.code() as i32,
        message: s.message().to_string(),
        details: vec![],
    }
}

pub fn ok_status() -> rpc::Status {
    rpc::Status::default()
}

/// FAILED_PRECONDITION with a `PreconditionFailure` listing each missing
/// blob as REAPI asks, so clients know what to upload.
pub fn missing_blobs_status(context: &str, missing: &[Digest]) -> Status {
    let status = missing_blobs_rpc(context, missing);
    Status::with_details(
        Code::FailedPrecondition,
        status.message.clone(),
        status.encode_to_vec().into(),
    )
}

/// The same as a google.rpc.Status, for an ExecuteResponse.
pub fn missing_blobs_rpc(context: &str, missing: &[Digest]) -> rpc::Status {
    let failure = PreconditionFailure {
        violations: missing
            .iter()
            .map(|d| precondition_failure::Violation {
                r#type: "MISSING".into(),
                subject: format!("blobs/{}/{}", d.hash_hex(), d.size()),
                description: format!("{context}: blob {d} is not in the CAS"),
            })
            .collect(),
    };
    let shown: Vec<String> = missing.iter().take(3).map(|d| d.to_string()).collect();
    let message = format!(
        "{context}: {} blob(s) missing from the CAS: {}{}",
        missing.len(),
        shown.join(", "),
        if missing.len() > 3 { ", …" } else { "" }
    );
    rpc::Status {
        code: Code::FailedPrecondition as i32,
        message,
        details: vec![protobuf::Any {
            type_url: PRECONDITION_FAILURE_TYPE_URL.into(),
            value: failure.encode_to_vec(),
        }],
    }
}
