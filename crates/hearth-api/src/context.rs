use std::sync::Arc;
use std::time::Instant;

use hearth_scheduler::Scheduler;
use hearth_storage::{ActionCache, BlobStore};
use tonic::Status;

/// Size limits the services enforce and advertise.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Total blob bytes in one BatchUpdateBlobs / BatchReadBlobs.
    pub max_batch_bytes: usize,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Outputs up to this size are inlined when GetActionResult asks.
    pub max_inline_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_bytes: 4 * 1024 * 1024,
            max_message_bytes: 16 * 1024 * 1024,
            max_inline_bytes: 1024 * 1024,
        }
    }
}

/// What the services share.
#[derive(Clone)]
pub struct Context {
    pub cas: Arc<dyn BlobStore>,
    pub ac: Arc<dyn ActionCache>,
    pub scheduler: Arc<Scheduler>,
    /// Instance names served; empty means any name is accepted.
    pub instances: Arc<Vec<String>>,
    pub limits: Limits,
    pub started: Instant,
}

impl Context {
    pub fn new(
        cas: Arc<dyn BlobStore>,
        ac: Arc<dyn ActionCache>,
        scheduler: Arc<Scheduler>,
    ) -> Self {
        Context {
            cas,
            ac,
            scheduler,
            instances: Arc::new(Vec::new()),
            limits: Limits::default(),
            started: Instant::now(),
        }
    }

    /// Rejects an instance name that is not configured.
    pub fn check_instance(&self, name: &str) -> Result<(), Status> {
        if self.instances.is_empty() || self.instances.iter().any(|i| i == name) {
            return Ok(());
        }
        Err(Status::invalid_argument(format!(
            "unknown instance name {name:?}; this server serves: {}",
            self.instances
                .iter()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}
