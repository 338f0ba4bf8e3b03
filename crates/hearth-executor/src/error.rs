use hearth_storage::StoreError;
use tonic::Code;

/// Why an action could not be run to completion; carries the gRPC code the
/// client will see in ExecuteResponse.status.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{context}: {source}")]
    Store {
        context: String,
        #[source]
        source: StoreError,
    },
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Precondition(String),
    /// Inputs that are in neither the local cache nor the server's CAS.
    #[error("{} input blob(s) missing from the CAS, e.g. {}", .0.len(), .0.first().map(|d| d.to_string()).unwrap_or_default())]
    MissingInputs(Vec<hearth_storage::Digest>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
    #[error("cancelled")]
    Cancelled,
    /// An error whose gRPC code the runner chose (e.g. UNAVAILABLE for a VM
    /// that failed to boot, NOT_FOUND for an unknown image).
    #[error("{message}")]
    Coded { code: Code, message: String },
}

impl ExecError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ExecError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn store(context: impl Into<String>, source: StoreError) -> Self {
        ExecError::Store {
            context: context.into(),
            source,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ExecError::Store {
                source: StoreError::NotFound(_),
                ..
            } => Code::FailedPrecondition,
            ExecError::Store {
                source: StoreError::InvalidDigest(_),
                ..
            }
            | ExecError::InvalidInput(_) => Code::InvalidArgument,
            ExecError::Precondition(_) | ExecError::MissingInputs(_) => Code::FailedPrecondition,
            ExecError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                Code::ResourceExhausted
            }
            ExecError::Store {
                source: StoreError::Io { source, .. },
                ..
            } if source.raw_os_error() == Some(28) => Code::ResourceExhausted,
            ExecError::Store {
                source: StoreError::Remote { code, .. },
                ..
            } => Code::from_i32(*code),
            ExecError::Cancelled => Code::Cancelled,
            ExecError::Coded { code, .. } => *code,
            _ => Code::Internal,
        }
    }

    /// The blobs whose absence stopped the action, if that is what did.
    pub fn missing_blobs(&self) -> Vec<hearth_storage::Digest> {
        match self {
            ExecError::MissingInputs(all) => all.clone(),
            ExecError::Store {
                source: StoreError::NotFound(d),
                ..
            } => vec![*d],
            _ => vec![],
        }
    }
}

pub type ExecResult<T> = Result<T, ExecError>;

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> ExecResult<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> ExecResult<T> {
        self.map_err(|e| ExecError::io(context(), e))
    }
}
