//! The queue and its dispatch loop. All state sits behind one mutex; every
//! event (submit, executor connect/finish/disconnect, sweep) takes it, updates
//! the state and runs `dispatch` before letting go.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use hearth_proto::reapi::ExecuteResponse;
use hearth_proto::rpc;
use hearth_proto::worker::{self, server_message};
use hearth_storage::{Digest, PinGuard};
use tokio::sync::watch;

use crate::dispatch::dispatch;
use crate::executors::{Executor, ExecutorSnapshot, WarmKey};
use crate::history::{ExecutionRecord, History, RecordBase};
use crate::shared_snapshots::SnapshotIndex;
use crate::{affinity_key, OpSnapshot, Platform, Stage};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How long an action may wait for an executor before it fails.
    pub queue_timeout: Duration,
    /// How many times an action is tried when its executors keep vanishing.
    pub max_attempts: u32,
    /// How long a finished operation stays visible to WaitExecution.
    pub retention: Duration,
    /// How long an executor whose session broke may take to come back and
    /// keep its running actions; after that they are re-queued. Zero
    /// re-queues at once.
    pub reconnect_grace: Duration,
    /// An executor heard nothing from for this long is taken as gone (its
    /// session is closed and the grace period starts). Executors report
    /// every few seconds even when idle.
    pub executor_silence: Duration,
    /// An operation in flight that no client has watched for this long is
    /// abandoned (Bazel interrupted, say): cancelled on its executor and
    /// forgotten, so a client that comes back with WaitExecution gets
    /// NOT_FOUND and executes again. Bazel re-attaches within a second of
    /// a broken stream.
    pub abandon_unwatched: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            queue_timeout: Duration::from_secs(600),
            max_attempts: 3,
            retention: Duration::from_secs(600),
            reconnect_grace: Duration::from_secs(10),
            executor_silence: Duration::from_secs(60),
            abandon_unwatched: Duration::from_secs(3),
        }
    }
}

/// An action the API layer has validated and wants run.
pub struct Job {
    /// Who asked (empty on a server without API keys): partitions operations,
    /// shared executions and runner keys.
    pub tenant: String,
    pub instance_name: String,
    pub action_digest: Digest,
    /// Encoded REAPI Action and Command.
    pub action: Vec<u8>,
    pub command: Vec<u8>,
    pub platform: Platform,
    pub do_not_cache: bool,
    /// Whether identical concurrent requests may share this execution.
    pub shareable: bool,
    /// Keeps the action's inputs in the CAS until it completes.
    pub pins: Option<PinGuard>,
}

impl Job {
    /// With `recycle-runner=true`: the key of the warm runners it could
    /// reuse.
    pub fn affinity(&self) -> Option<String> {
        self.platform
            .flag("recycle-runner")
            .then(|| affinity_key(&self.tenant, &self.instance_name, &self.platform))
    }
}

/// What the API layer needs to finish an operation an executor reported on.
#[derive(Debug, Clone)]
pub struct RunningJob {
    pub operation_name: String,
    pub tenant: String,
    pub instance_name: String,
    pub action_digest: Digest,
    pub do_not_cache: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no connected executor can run this action: {0}")]
    NoMatchingExecutor(String),
    /// The shared state the queue lives in cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "executor id {0:?} is connected with another key; a session cannot take over a live \
         executor's id (use --executor-id to pick another)"
    )]
    IdInUse(String),
}

#[derive(Debug, Clone, Default)]
pub struct SchedulerStats {
    pub queued: u32,
    pub running: u32,
    pub completed: u64,
    /// Times an action went back to the queue because its executor went
    /// away or no longer ran it.
    pub requeued: u64,
    /// Runner snapshots shared through the CAS, newest first (at most
    /// [`MAX_LISTED_JOBS`]).
    pub shared_snapshots: Vec<hearth_proto::worker::SharedSnapshot>,
    /// How many runner snapshots are shared through the CAS in all.
    pub shared_snapshots_total: usize,
    pub executors: Vec<ExecutorSnapshot>,
    /// The oldest actions in flight, at most [`MAX_LISTED_JOBS`].
    pub jobs: Vec<JobSnapshot>,
}

/// How many in-flight actions `stats` lists.
pub const MAX_LISTED_JOBS: usize = 50;

/// An action in flight, for `hearth status`.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub operation_name: String,
    pub action_digest: Digest,
    /// Where it runs; None while queued.
    pub executor: Option<String>,
    /// Attempts so far (0 while first queued).
    pub attempts: u32,
    /// Since its latest enqueue.
    pub queued_for: Duration,
}

pub(crate) struct JobState {
    pub(crate) job: Job,
    pub(crate) attempts: u32,
    pub(crate) enqueued: Instant,
    pub(crate) queued_at: SystemTime,
    pub(crate) executor: Option<String>,
    /// With `recycle-runner=true`: the key of the warm runners it could reuse.
    pub(crate) affinity: Option<String>,
}

pub(crate) struct OpEntry {
    tenant: String,
    tx: watch::Sender<OpSnapshot>,
    finished_at: Option<Instant>,
    /// Since when no client watches it (while in flight).
    unwatched_since: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) ops: HashMap<String, OpEntry>,
    pub(crate) jobs: HashMap<String, JobState>,
    pub(crate) queue: VecDeque<String>,
    pub(crate) executors: HashMap<String, Executor>,
    /// (tenant, instance, action) → the shareable operation running it.
    pub(crate) shared: HashMap<(String, String, Digest), String>,
    pub(crate) next_session: u64,
    pub(crate) completed: u64,
    pub(crate) requeued: u64,
    /// Runner snapshots executors shared through the CAS, by affinity key.
    pub(crate) snapshots: SnapshotIndex,
    /// Finished operations, for operators.
    pub(crate) history: Arc<History>,
}

pub struct Scheduler {
    pub(crate) config: SchedulerConfig,
    state: Mutex<State>,
    /// Woken when an executor slot may have come free (an executor joined,
    /// or one of its actions ended): a claimer of shared work waits on it.
    pub(crate) slots: Arc<tokio::sync::Notify>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Arc<Self> {
        Arc::new(Scheduler {
            config,
            state: Mutex::default(),
            slots: Arc::default(),
        })
    }

    /// Runs the periodic sweep (queue timeouts, forgetting old operations)
    /// until the scheduler is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(s) => s.sweep(Instant::now()),
                    None => return,
                }
            }
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job, or joins an identical one already in flight.
    pub fn submit(&self, job: Job) -> Result<watch::Receiver<OpSnapshot>, SubmitError> {
        self.submit_named(format!("operations/{}", uuid::Uuid::new_v4()), job)
    }

    /// [`Self::submit`] under a name given by the caller: an operation of
    /// the shared queue keeps the name it got on the replica it came in by.
    pub fn submit_named(
        &self,
        name: String,
        job: Job,
    ) -> Result<watch::Receiver<OpSnapshot>, SubmitError> {
        let mut st = self.lock();
        if st.jobs.contains_key(&name) {
            return Err(SubmitError::Unavailable(format!(
                "operation {name} is already in flight here"
            )));
        }
        let key = shared_key(&job);
        if job.shareable {
            if let Some(rx) = st
                .shared
                .get(&key)
                .and_then(|op| st.ops.get(op))
                .map(|e| e.tx.subscribe())
            {
                tracing::debug!(action = %job.action_digest, "joining in-flight execution");
                return Ok(rx);
            }
        }
        if !st.executors.is_empty() {
            let reasons: Vec<String> = st
                .executors
                .values()
                .filter_map(|e| e.info.mismatch(&job.platform))
                .collect();
            if reasons.len() == st.executors.len() {
                return Err(SubmitError::NoMatchingExecutor(reasons[0].clone()));
            }
        }
        if job.shareable {
            st.shared.insert(key, name.clone());
        }
        let rx = insert_job(&mut st, name.clone(), job);
        st.queue.push_back(name);
        dispatch(&mut st);
        Ok(rx)
    }

    /// Whether an executor has a free slot for an action with `platform`
    /// now: `Some(true)` if one also holds a warm runner of `affinity`.
    pub fn fit(&self, platform: &Platform, affinity: Option<&str>) -> Option<bool> {
        let st = self.lock();
        st.executors
            .values()
            .filter(|e| e.can_take(platform))
            .map(|e| affinity.is_some_and(|k| e.holds_warm(k)))
            .max()
    }

    /// Free executor slots in all, and whether any job waits in the local
    /// queue (then there is nothing to spare).
    pub fn spare_slots(&self) -> u32 {
        let st = self.lock();
        if !st.queue.is_empty() {
            return 0;
        }
        st.executors.values().map(|e| e.free_slots()).sum()
    }

    /// What each connected executor offers.
    pub fn executor_infos(&self) -> Vec<crate::ExecutorInfo> {
        self.lock()
            .executors
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    /// Woken when an executor slot may have come free.
    pub fn slots_notify(&self) -> Arc<tokio::sync::Notify> {
        self.slots.clone()
    }

    /// The executor running an operation here, as "OWNER/ID" (the key it
    /// authenticated with, and its id).
    pub fn runner_of(&self, name: &str) -> Option<String> {
        let st = self.lock();
        let id = st.jobs.get(name)?.executor.as_ref()?;
        let exec = st.executors.get(id)?;
        Some(format!("{}/{}", exec.owner, exec.info.id))
    }

    /// Whether an operation of this name is in flight here.
    pub fn runs(&self, name: &str) -> bool {
        self.lock().jobs.contains_key(name)
    }

    /// Watches an operation by name, if it is known and, given a tenant,
    /// that tenant's (None: any tenant's).
    pub fn subscribe(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Option<watch::Receiver<OpSnapshot>> {
        self.lock()
            .ops
            .get(name)
            .filter(|e| tenant.is_none_or(|t| e.tenant == t))
            .map(|e| e.tx.subscribe())
    }

    /// Cancels a queued or running operation. Returns false if unknown (or,
    /// given a tenant, not that tenant's).
    pub fn cancel(&self, name: &str, tenant: Option<&str>) -> bool {
        let mut st = self.lock();
        match st.ops.get(name) {
            Some(e) if tenant.is_none_or(|t| e.tenant == t) => {}
            _ => return false,
        }
        cancel_locked(&mut st, name, "cancelled by the client");
        true
    }

    /// Takes a job that waits in the queue back out, its operation
    /// forgotten without an end (watchers see the channel close): for work
    /// a shared queue can give to another replica instead. False if it is
    /// not waiting here.
    pub fn withdraw(&self, name: &str) -> bool {
        let mut st = self.lock();
        let waiting = st
            .jobs
            .get(name)
            .is_some_and(|js| js.executor.is_none() && st.queue.iter().any(|q| q == name));
        if waiting {
            st.queue.retain(|q| q != name);
            if let Some(js) = st.jobs.remove(name) {
                let key = shared_key(&js.job);
                if st.shared.get(&key).map(String::as_str) == Some(name) {
                    st.shared.remove(&key);
                }
            }
            st.ops.remove(name);
        }
        waiting
    }

    /// Cancels an operation, whoever's it is, saying why.
    pub fn cancel_because(&self, name: &str, why: &str) {
        cancel_locked(&mut self.lock(), name, why);
    }

    /// Publishes the final response of an operation.
    pub fn complete(&self, op: &str, response: ExecuteResponse) {
        let mut st = self.lock();
        complete_locked(&mut st, op, response);
    }

    /// Recent finished operations (the ones it ran, and cache hits the API
    /// layer records).
    pub fn history(&self) -> Arc<History> {
        self.lock().history.clone()
    }

    /// Counts and executors; given a tenant, the queued and running counts
    /// are that tenant's only.
    pub fn stats(&self, tenant: Option<&str>) -> SchedulerStats {
        let st = self.lock();
        let mine = |js: &&JobState| tenant.is_none_or(|t| js.job.tenant == t);
        let running = st
            .jobs
            .values()
            .filter(mine)
            .filter(|j| j.executor.is_some())
            .count() as u32;
        let queued = st
            .queue
            .iter()
            .filter_map(|op| st.jobs.get(op))
            .filter(|js| mine(js))
            .count() as u32;
        let mut executors: Vec<ExecutorSnapshot> = st
            .executors
            .values()
            .map(|e| ExecutorSnapshot {
                info: e.info.clone(),
                running: e.busy(),
                connected_seconds: e.connected_at.elapsed().as_secs(),
                warm_runners: e.warm_runners(),
                warm_keys: {
                    let mut keys: Vec<WarmKey> = e
                        .warm
                        .iter()
                        .map(|(k, n)| WarmKey {
                            affinity_key: k.clone(),
                            count: *n,
                            shared: st.snapshots.get(k).is_some(),
                        })
                        .collect();
                    keys.sort_by(|a, b| {
                        b.count
                            .cmp(&a.count)
                            .then(a.affinity_key.cmp(&b.affinity_key))
                    });
                    keys
                },
                reconnecting: e.disconnected_at.is_some(),
            })
            .collect();
        executors.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        let mut jobs: Vec<JobSnapshot> = st
            .jobs
            .iter()
            .filter(|(_, js)| mine(js))
            .map(|(name, js)| JobSnapshot {
                operation_name: name.clone(),
                action_digest: js.job.action_digest,
                executor: js.executor.clone(),
                attempts: js.attempts,
                queued_for: js.enqueued.elapsed(),
            })
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.queued_for));
        jobs.truncate(MAX_LISTED_JOBS);
        SchedulerStats {
            queued,
            running,
            completed: st.completed,
            requeued: st.requeued,
            // The index knows affinity keys (hashes), not whose they are:
            // listed to admins (and in anonymous mode) only.
            shared_snapshots: if tenant.is_none() {
                st.snapshots.newest(MAX_LISTED_JOBS)
            } else {
                vec![]
            },
            shared_snapshots_total: st.snapshots.len(),
            executors,
            jobs,
        }
    }

    /// Fails actions that waited too long and forgets old finished operations.
    pub fn sweep(&self, now: Instant) {
        let mut st = self.lock();
        self.sweep_executors(&mut st, now);
        let timeout = self.config.queue_timeout;
        let expired: Vec<String> = st
            .queue
            .iter()
            .filter(|op| {
                st.jobs
                    .get(*op)
                    .is_some_and(|j| now.duration_since(j.enqueued) > timeout)
            })
            .cloned()
            .collect();
        for op in expired {
            st.queue.retain(|q| q != &op);
            let msg = format!(
                "no executor took this action within the queue timeout of {}s",
                timeout.as_secs()
            );
            complete_locked(&mut st, &op, error_response(rpc_code::UNAVAILABLE, &msg));
        }
        let abandon = self.config.abandon_unwatched;
        let mut abandoned = vec![];
        for (name, e) in st.ops.iter_mut() {
            if e.finished_at.is_some() || e.tx.receiver_count() > 0 {
                e.unwatched_since = None;
                continue;
            }
            let since = *e.unwatched_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= abandon {
                abandoned.push(name.clone());
            }
        }
        for name in abandoned {
            tracing::info!(operation = %name, "no client watches it any more; cancelling it");
            cancel_locked(&mut st, &name, "abandoned: no client was waiting for it");
            st.ops.remove(&name);
        }
        let retention = self.config.retention;
        st.ops.retain(|_, e| {
            e.finished_at
                .is_none_or(|t| now.duration_since(t) < retention)
        });
        dispatch(&mut st);
    }
}

/// google.rpc.Code values used here.
pub(crate) mod rpc_code {
    pub const CANCELLED: i32 = 1;
    pub const UNAVAILABLE: i32 = 14;
}

/// Ends `name` as CANCELLED; its executor (if any) is told to stop, and
/// its slot stays taken until the executor confirms the end.
fn cancel_locked(st: &mut State, name: &str, why: &str) {
    let Some(js) = st.jobs.get(name) else {
        return;
    };
    if let Some(exec) = js.executor.as_ref().and_then(|id| st.executors.get_mut(id)) {
        if let Some(seq) = exec.running.remove(name) {
            exec.draining.insert(name.to_string(), seq);
        }
        send_cancel(exec, name);
    }
    st.queue.retain(|q| q != name);
    complete_locked(st, name, error_response(rpc_code::CANCELLED, why));
}

pub(crate) fn send_cancel(exec: &Executor, op: &str) {
    // A broken session cannot take it; the reconnect reconciles.
    let _ = exec.sender.send(worker::ServerMessage {
        kind: Some(server_message::Kind::Cancel(worker::Cancel {
            operation_name: op.to_string(),
        })),
    });
}

/// Registers a job and its operation (queued, in no queue yet).
pub(crate) fn insert_job(st: &mut State, name: String, job: Job) -> watch::Receiver<OpSnapshot> {
    let (tx, rx) = watch::channel(OpSnapshot {
        name: name.clone(),
        action_digest: job.action_digest,
        stage: Stage::Queued,
        response: None,
    });
    st.ops.insert(
        name.clone(),
        OpEntry {
            tenant: job.tenant.clone(),
            tx,
            finished_at: None,
            unwatched_since: None,
        },
    );
    let affinity = job.affinity();
    st.jobs.insert(
        name,
        JobState {
            affinity,
            job,
            attempts: 0,
            enqueued: Instant::now(),
            queued_at: SystemTime::now(),
            executor: None,
        },
    );
    rx
}

fn shared_key(job: &Job) -> (String, String, Digest) {
    (
        job.tenant.clone(),
        job.instance_name.clone(),
        job.action_digest,
    )
}

pub(crate) fn error_response(code: i32, message: &str) -> ExecuteResponse {
    ExecuteResponse {
        status: Some(rpc::Status {
            code,
            message: message.to_string(),
            details: vec![],
        }),
        ..Default::default()
    }
}

pub(crate) fn publish_stage(st: &State, op: &str, stage: Stage) {
    if let Some(e) = st.ops.get(op) {
        e.tx.send_modify(|s| s.stage = stage);
    }
}

/// Publishes `op`'s final response and forgets the job. The executor slot
/// it may hold stays taken until the executor confirms the end (its
/// `Finished`, also sent for cancelled work) or goes away: until then the
/// work may still be running there (a cancelled VM shutting down).
pub(crate) fn complete_locked(st: &mut State, op: &str, response: ExecuteResponse) {
    let Some(js) = st.jobs.remove(op) else { return };
    let record = ExecutionRecord::new(
        RecordBase {
            operation_name: op.to_string(),
            tenant: js.job.tenant.clone(),
            instance_name: js.job.instance_name.clone(),
            action_digest: js.job.action_digest,
            arguments: crate::history::arguments_of(&js.job.command),
            platform: js.job.platform.shown_pairs(),
            isolation: js.job.platform.isolation().to_string(),
            executor: js.executor.clone(),
            attempts: js.attempts,
            queued_at: js.queued_at,
        },
        &response,
    );
    crate::metrics::completed(&record);
    st.history.record(record);
    let key = shared_key(&js.job);
    if st.shared.get(&key).map(String::as_str) == Some(op) {
        st.shared.remove(&key);
    }
    st.completed += 1;
    if let Some(e) = st.ops.get_mut(op) {
        e.finished_at = Some(Instant::now());
        e.tx.send_modify(|s| {
            s.stage = Stage::Completed;
            s.response = Some(response);
        });
    }
    // Dropping the job releases its input pins.
    drop(js);
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
