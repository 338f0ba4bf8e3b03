use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_scheduler::{JobQueue, Scheduler};
use hearth_storage::{ActionCache, BlobStore, Occupancy, Ownership, Pins, StoreStats};

use tonic::Status;

use crate::auth::Auth;
use crate::usage::CacheUsage;

/// Size limits the services enforce and advertise.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Total blob bytes in one BatchUpdateBlobs / BatchReadBlobs.
    pub max_batch_bytes: usize,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Blobs of one batch call stored or read at once: a few for a disk
    /// store (the blocking pool does the work), more for an object store
    /// (each blob waits milliseconds on the network).
    pub batch_parallelism: usize,
    /// Outputs up to this size are inlined when GetActionResult asks.
    pub max_inline_bytes: usize,
    /// Largest Action, Command or Directory blob the server reads and decodes
    /// (validation before Execute, GetTree).
    pub max_metadata_blob_bytes: u64,
    /// An interrupted ByteStream upload is kept for resumption this long
    /// after its last activity.
    pub partial_upload_idle: Duration,
    /// Most bytes interrupted uploads may hold together (each counted with
    /// [`crate::PARKED_UPLOAD_OVERHEAD`] more); the least recently active are
    /// dropped first.
    pub partial_upload_max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_bytes: 4 * 1024 * 1024,
            max_message_bytes: 16 * 1024 * 1024,
            batch_parallelism: 8,
            max_inline_bytes: 1024 * 1024,
            max_metadata_blob_bytes: 16 * 1024 * 1024,
            partial_upload_idle: Duration::from_secs(3600),
            partial_upload_max_bytes: 10 << 30,
        }
    }
}

/// What the services share.
#[derive(Clone)]
pub struct Context {
    pub cas: Arc<dyn BlobStore>,
    /// Keeps a queued action's inputs from eviction (the local disk store
    /// or tier; none for a store without eviction of its own).
    pub pins: Option<Arc<dyn Pins>>,
    /// What the local store holds, for status and metrics.
    pub occupancy: Option<Arc<dyn Occupancy>>,
    /// Where ByteStream uploads too big for memory are spooled before they
    /// are written (the disk store's staging directory, so that is a
    /// rename).
    pub spool: PathBuf,
    pub ac: Arc<dyn ActionCache>,
    /// This process's scheduler: its executors, history and status.
    pub scheduler: Arc<Scheduler>,
    /// Where operations are queued and watched: the scheduler itself, or a
    /// queue shared with other replicas.
    pub queue: Arc<dyn JobQueue>,
    /// Instance names served; empty means any name is accepted.
    pub instances: Arc<Vec<String>>,
    pub limits: Limits,
    pub started: Instant,
    /// API keys (none: single-tenant and anonymous).
    pub auth: Auth,
    /// Which tenant may read which blob; set when keys are.
    pub owners: Option<Arc<dyn Ownership>>,
    /// Action-cache use by tenant.
    pub usage: Arc<CacheUsage>,
}

impl Context {
    pub fn new(
        cas: Arc<dyn BlobStore>,
        ac: Arc<dyn ActionCache>,
        scheduler: Arc<Scheduler>,
    ) -> Self {
        Context {
            cas,
            pins: None,
            occupancy: None,
            spool: std::env::temp_dir(),
            ac,
            queue: Arc::new(scheduler.clone()),
            scheduler,
            instances: Arc::new(Vec::new()),
            limits: Limits::default(),
            started: Instant::now(),
            auth: Auth::anonymous(),
            owners: None,
            usage: Arc::default(),
        }
    }

    /// What the local store holds (zeros when it cannot say).
    pub fn cas_stats(&self) -> StoreStats {
        self.occupancy
            .as_ref()
            .map(|o| o.stats())
            .unwrap_or_default()
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
