//! The scheduler: a queue of actions, the executors connected to it, and the
//! operations clients watch. It knows nothing of gRPC or storage; the API
//! layer feeds it jobs and executor events and publishes what it decides.

mod affinity;
mod dispatch;
mod executors;
pub mod history;
#[cfg(test)]
mod invariants;
pub mod metrics;
mod operation;
pub mod paths;
pub mod platform;
mod queue;
mod scheduler;
mod sessions;
mod shared_snapshots;
#[cfg(test)]
mod test_support;

pub use affinity::affinity_key;
pub use executors::{ExecutorInfo, ExecutorSnapshot, WarmKey};
pub use history::{ExecutionRecord, History, HistoryFilter, RecordBase, Stages, HISTORY_CAPACITY};
pub use operation::{OpSnapshot, Stage};
pub use platform::{Platform, PlatformError};
pub use queue::JobQueue;
pub use scheduler::{
    ConnectError, Job, JobSnapshot, RunningJob, Scheduler, SchedulerConfig, SchedulerStats,
    SubmitError, MAX_LISTED_JOBS,
};
pub use sessions::{Adopted, Assignments, ExecutorReport};
