use std::time::Duration;

/// Why a VM could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM failed to boot: {reason}; console tail:\n{console}")]
    Boot { reason: String, console: String },
    #[error("the guest agent stopped answering: {0}")]
    Agent(String),
    #[error("guest agent speaks protocol version {0}, this host speaks {1}")]
    Version(u32, u32),
    #[error("{0}")]
    Setup(String),
    /// A host-side deadline passed (see deadline.rs): the guest agent or
    /// QEMU is wedged. Whoever gets this kills the VM.
    #[error("{what} within {limit:?}")]
    Timeout { what: String, limit: Duration },
}

impl VmError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmError::Io {
            context: context.into(),
            source,
        }
    }
}
