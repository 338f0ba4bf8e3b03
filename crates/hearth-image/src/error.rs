//! The one error type of this crate. Every message names the image reference and the cause.

/// Why [`crate::ImageStore::resolve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference is not a valid image reference (INVALID_ARGUMENT).
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// The repository, tag or digest does not exist in the registry (NOT_FOUND).
    #[error("image {reference} not found: {reason}")]
    NotFound { reference: String, reason: String },

    /// The registry refused the credentials, or needs some and none were given
    /// (PERMISSION_DENIED).
    #[error("access to image {reference} denied: {reason}")]
    PermissionDenied { reference: String, reason: String },

    /// The registry could not be reached or failed (UNAVAILABLE; retrying may help).
    #[error("registry for image {reference} unavailable: {reason}")]
    Unavailable { reference: String, reason: String },

    /// The image exists but cannot be used: unsupported manifest or layer type, no
    /// linux/amd64 variant, content that does not match its digest, or a layer that
    /// tries to write outside the root filesystem (FAILED_PRECONDITION).
    #[error("image {reference} cannot be used: {reason}")]
    BadImage { reference: String, reason: String },

    /// Local failure: disk, unpacking, `mkfs.ext4` (INTERNAL). Carries mkfs's stderr
    /// when that is what failed.
    #[error("converting image {reference} failed: {reason}")]
    Internal { reference: String, reason: String },
}

impl ImageError {
    /// The gRPC status code an executor should report for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ImageError::InvalidReference { .. } => tonic::Code::InvalidArgument,
            ImageError::NotFound { .. } => tonic::Code::NotFound,
            ImageError::PermissionDenied { .. } => tonic::Code::PermissionDenied,
            ImageError::Unavailable { .. } => tonic::Code::Unavailable,
            ImageError::BadImage { .. } => tonic::Code::FailedPrecondition,
            ImageError::Internal { .. } => tonic::Code::Internal,
        }
    }

    /// The reference the error is about, as the caller wrote it.
    pub fn reference(&self) -> &str {
        match self {
            ImageError::InvalidReference { reference, .. }
            | ImageError::NotFound { reference, .. }
            | ImageError::PermissionDenied { reference, .. }
            | ImageError::Unavailable { reference, .. }
            | ImageError::BadImage { reference, .. }
            | ImageError::Internal { reference, .. } => reference,
        }
    }

    /// A `tonic::Status` with [`Self::grpc_code`] and this error's message.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.grpc_code(), self.to_string())
    }

    pub(crate) fn internal(reference: &str, reason: impl std::fmt::Display) -> Self {
        ImageError::Internal {
            reference: reference.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn bad_image(reference: &str, reason: impl std::fmt::Display) -> Self {
        ImageError::BadImage {
            reference: reference.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn unavailable(reference: &str, reason: impl std::fmt::Display) -> Self {
        ImageError::Unavailable {
            reference: reference.to_string(),
            reason: reason.to_string(),
        }
    }
}
