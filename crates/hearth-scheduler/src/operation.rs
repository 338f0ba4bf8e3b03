use hearth_proto::reapi::ExecuteResponse;
use hearth_storage::Digest;

/// Where an operation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Queued,
    Executing,
    Completed,
}

/// What a watcher of an operation sees; published on every change.
#[derive(Debug, Clone)]
pub struct OpSnapshot {
    pub name: String,
    pub action_digest: Digest,
    pub stage: Stage,
    /// Present once `stage` is `Completed`.
    pub response: Option<ExecuteResponse>,
}
