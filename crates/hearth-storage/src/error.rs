use crate::Digest;

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything that can go wrong inside a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid digest: {0}")]
    InvalidDigest(String),
    #[error("blob {0} not found")]
    NotFound(Digest),
    #[error("data does not match digest {expected}: its SHA-256 is {actual_hash} over {actual_size} bytes")]
    Mismatch {
        expected: Digest,
        actual_hash: String,
        actual_size: u64,
    },
    #[error("read offset {offset} is beyond the end of blob {digest}")]
    OutOfRange { digest: Digest, offset: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An object store (S3 and the like) failed to answer; worth retrying.
    #[error("{context}: {message}")]
    Backend { context: String, message: String },
    /// A remote store answered with a gRPC status (its google.rpc.Code is
    /// kept, so callers can pass it on).
    #[error("{context}: the server answered code {code}: {message}")]
    Remote {
        context: String,
        code: i32,
        message: String,
    },
}

impl StoreError {
    /// Ok when the bytes that hashed to `actual` are the blob `expected`
    /// names; otherwise the mismatch, naming both.
    pub fn check_digest(expected: &Digest, actual: Digest) -> StoreResult<()> {
        if actual == *expected {
            return Ok(());
        }
        Err(StoreError::Mismatch {
            expected: *expected,
            actual_hash: actual.hash_hex(),
            actual_size: actual.size(),
        })
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds a human context to an `io::Result`, in the style of `anyhow::Context`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> StoreResult<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> StoreResult<T> {
        self.map_err(|e| StoreError::io(context(), e))
    }
}
