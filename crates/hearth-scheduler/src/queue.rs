//! The seam between the API layer and where operations live: this process's
//! scheduler on its own, or a queue shared by several replicas (the
//! `hearth-fleet` crate). The API layer submits, watches and cancels through
//! it; executors still connect to the local scheduler.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::executors::ExecutorInfo;
use crate::scheduler::{ConnectError, Job, Scheduler, SubmitError};
use crate::sessions::Assignments;
use crate::OpSnapshot;

#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Queues a job, or joins an identical one in flight.
    async fn submit(&self, job: Job) -> Result<watch::Receiver<OpSnapshot>, SubmitError>;

    /// Watches an operation by name, if it is known and, given a tenant,
    /// that tenant's.
    async fn subscribe(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<Option<watch::Receiver<OpSnapshot>>, SubmitError>;

    /// Cancels a queued or running operation; false if unknown (or another
    /// tenant's).
    async fn cancel(&self, name: &str, tenant: Option<&str>) -> Result<bool, SubmitError>;

    /// An executor (re)connects still running `running`; see
    /// [`Scheduler::reconnect`].
    async fn connect_executor(
        &self,
        info: ExecutorInfo,
        warm_keys: Vec<String>,
        running: &[String],
        owner: &str,
    ) -> Result<(u64, Assignments), ConnectError>;
}

/// One process on its own: the scheduler is the queue.
#[async_trait]
impl JobQueue for Arc<Scheduler> {
    async fn submit(&self, job: Job) -> Result<watch::Receiver<OpSnapshot>, SubmitError> {
        Scheduler::submit(self, job)
    }

    async fn subscribe(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<Option<watch::Receiver<OpSnapshot>>, SubmitError> {
        Ok(Scheduler::subscribe(self, name, tenant))
    }

    async fn cancel(&self, name: &str, tenant: Option<&str>) -> Result<bool, SubmitError> {
        Ok(Scheduler::cancel(self, name, tenant))
    }

    async fn connect_executor(
        &self,
        info: ExecutorInfo,
        warm_keys: Vec<String>,
        running: &[String],
        owner: &str,
    ) -> Result<(u64, Assignments), ConnectError> {
        self.reconnect(info, warm_keys, running, owner)
    }
}
