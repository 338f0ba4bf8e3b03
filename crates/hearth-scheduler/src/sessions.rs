//! Executor sessions: connecting, reports, finished work, going away — and
//! reconciling what an executor says it runs with what the scheduler
//! believes. The executor's word wins (Buildbarn's `Synchronize` is the
//! model): a job it no longer runs is re-queued, work it runs that no job
//! owns is cancelled, and a reconnect within the grace period keeps its
//! running actions instead of running them again.

use std::collections::HashSet;
use std::time::{Instant, SystemTime};

use hearth_proto::worker;
use tokio::sync::mpsc;

use crate::dispatch::dispatch;
use crate::executors::{Executor, ExecutorInfo};
use crate::scheduler::{
    complete_locked, error_response, insert_job, publish_stage, rpc_code, send_cancel,
    ConnectError, RunningJob, Scheduler, State,
};
use crate::Stage;

/// What an executor reports it runs (`ExecutorState` on the wire).
#[derive(Debug, Clone, Default)]
pub struct ExecutorReport {
    /// Operations it runs, or has finished and is about to report.
    pub running: Vec<String>,
    /// The highest assignment sequence number of this session it has seen;
    /// later assignments may still be on their way and are not judged.
    pub assignments_received: u64,
    /// It is shutting down: it gets nothing more.
    pub leaving: bool,
}

/// The channel an executor's session receives its work on.
pub type Assignments = mpsc::UnboundedReceiver<worker::ServerMessage>;

/// Adopted jobs' operation names and operations, to watch.
pub type Adopted = Vec<(String, tokio::sync::watch::Receiver<crate::OpSnapshot>)>;

impl Scheduler {
    /// Registers an executor holding no work; see [`Self::reconnect`].
    pub fn connect(
        &self,
        info: ExecutorInfo,
        warm_keys: Vec<String>,
        owner: &str,
    ) -> Result<(u64, Assignments), ConnectError> {
        self.reconnect(info, warm_keys, &[], owner)
    }

    /// Registers an executor with the affinity keys of its warm runners and
    /// the operations it still holds (from an earlier session); returns its
    /// session number and the channel on which it receives work. `owner`
    /// names the key it authenticated with: a session under the same id and
    /// owner replaces the old one and is reconciled with it; another owner
    /// cannot take a live id over.
    pub fn reconnect(
        &self,
        info: ExecutorInfo,
        warm_keys: Vec<String>,
        running: &[String],
        owner: &str,
    ) -> Result<(u64, Assignments), ConnectError> {
        self.reconnect_adopting(info, warm_keys, running, owner, vec![])
            .map(|(session, rx, _)| (session, rx))
    }

    /// [`Self::reconnect`], first taking in `adopted`: jobs (with their
    /// operation names) that another replica ran on this executor before it
    /// came here. The ones it lists are its again; any other is queued.
    /// Returns their operations to watch.
    pub fn reconnect_adopting(
        &self,
        info: ExecutorInfo,
        warm_keys: Vec<String>,
        running: &[String],
        owner: &str,
        adopted: Vec<(String, crate::Job)>,
    ) -> Result<(u64, Assignments, Adopted), ConnectError> {
        let mut st = self.lock();
        let old = match st.executors.get(&info.id) {
            Some(old) if old.owner != owner => {
                tracing::warn!(executor = %info.id, "refused a session taking over a live executor id");
                return Err(ConnectError::IdInUse(info.id));
            }
            Some(_) => st.executors.remove(&info.id),
            None => None,
        };
        st.next_session += 1;
        let session = st.next_session;
        let mut watched = vec![];
        for (name, job) in adopted {
            if st.jobs.contains_key(&name) {
                continue;
            }
            watched.push((name.clone(), insert_job(&mut st, name.clone(), job)));
            st.queue.push_front(name);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let id = info.id.clone();
        tracing::info!(executor = %id, capacity = info.capacity, isolation = ?info.isolation_types, warm = warm_keys.len(), holding = running.len(), "executor connected");
        let mut exec = Executor::new(info, owner, session, tx);
        exec.set_warm(warm_keys);
        let (mut was_running, mut was_draining) =
            old.map(|o| (o.running, o.draining)).unwrap_or_default();
        let listed: HashSet<&String> = running.iter().collect();
        for op in listed {
            // Sequence 0: the executor itself vouched for these.
            if was_running.remove(op).is_some() || adopt_queued(&mut st, op, &exec) {
                exec.running.insert(op.clone(), 0);
                continue;
            }
            // Its job is gone, or runs elsewhere now: stop it. It holds a
            // slot until the executor says it ended.
            was_draining.remove(op);
            exec.draining.insert(op.clone(), 0);
            send_cancel(&exec, op);
        }
        st.executors.insert(id.clone(), exec);
        for op in was_running.into_keys() {
            self.lost(&mut st, &op, &format!("executor {id} came back without it"));
        }
        dispatch(&mut st);
        self.slots.notify_one();
        Ok((session, rx, watched))
    }

    /// An executor's session ended. Its running jobs wait out the reconnect
    /// grace period (see [`Self::sweep`]) for it to come back with them.
    pub fn disconnect(&self, executor_id: &str, session: u64) {
        let mut st = self.lock();
        self.disconnect_locked(&mut st, executor_id, session, Instant::now());
        dispatch(&mut st);
    }

    fn disconnect_locked(&self, st: &mut State, executor_id: &str, session: u64, now: Instant) {
        let Some(exec) = st
            .executors
            .get_mut(executor_id)
            .filter(|e| e.session == session && e.disconnected_at.is_none())
        else {
            return;
        };
        tracing::warn!(
            executor = executor_id,
            running = exec.running.len(),
            grace_secs = self.config.reconnect_grace.as_secs_f32(),
            "executor disconnected"
        );
        exec.disconnected_at = Some(now);
        // Closes the outbound stream if it is still open (a silent executor).
        exec.sender = mpsc::unbounded_channel().0;
        // One that said it was leaving is not coming back for what was
        // sent to it after its farewell.
        if self.config.reconnect_grace.is_zero() || exec.leaving {
            self.forget_executor(st, executor_id);
        }
    }

    /// Removes an executor that did not come back; its jobs are re-queued.
    fn forget_executor(&self, st: &mut State, executor_id: &str) {
        let Some(exec) = st.executors.remove(executor_id) else {
            return;
        };
        let why = format!("executor {executor_id} went away");
        for op in exec.running.into_keys() {
            self.lost(st, &op, &why);
        }
    }

    /// Ends the grace period of executors that did not come back, and takes
    /// executors silent for too long as gone.
    pub(crate) fn sweep_executors(&self, st: &mut State, now: Instant) {
        let grace = self.config.reconnect_grace;
        let silence = self.config.executor_silence;
        let mut expired = vec![];
        let mut silent = vec![];
        for (id, e) in &st.executors {
            match e.disconnected_at {
                Some(t) if now.saturating_duration_since(t) >= grace => expired.push(id.clone()),
                None if now.saturating_duration_since(e.last_heard) >= silence => {
                    silent.push((id.clone(), e.session))
                }
                _ => {}
            }
        }
        for (id, session) in silent {
            tracing::warn!(executor = %id, silence_secs = silence.as_secs(), "executor silent; taking it as gone");
            self.disconnect_locked(st, &id, session, now);
        }
        for id in expired {
            tracing::warn!(executor = %id, "executor did not come back within the grace period");
            self.forget_executor(st, &id);
        }
    }

    /// A job whose executor no longer runs it: back to the front of the
    /// queue, or failed once it has used its attempts.
    fn lost(&self, st: &mut State, op: &str, why: &str) {
        let Some(js) = st.jobs.get_mut(op) else {
            return;
        };
        js.executor = None;
        if js.attempts >= self.config.max_attempts {
            let msg = format!("{why}; it ran this action {} times; giving up", js.attempts);
            complete_locked(st, op, error_response(rpc_code::UNAVAILABLE, &msg));
            return;
        }
        tracing::info!(operation = %op, attempt = js.attempts, why, "re-queueing action");
        // The queue timeout, and the next attempt's queued time, count from
        // this enqueue.
        js.enqueued = Instant::now();
        js.queued_at = SystemTime::now();
        st.requeued += 1;
        st.queue.push_front(op.to_string());
        publish_stage(st, op, Stage::Queued);
    }

    /// An executor's report of what it runs (on its own, or with a
    /// Finished): reconciles and takes it as a sign of life.
    pub fn report(&self, executor_id: &str, session: u64, report: &ExecutorReport) {
        let mut st = self.lock();
        let Some(exec) = heard_from(&mut st, executor_id, session) else {
            return;
        };
        exec.leaving |= report.leaving;
        let seen = report.assignments_received;
        let listed: HashSet<&str> = report.running.iter().map(String::as_str).collect();
        // Only assignments it has received can be missing from its list.
        let gone = |(op, seq): (&String, &u64)| *seq <= seen && !listed.contains(op.as_str());
        let lost: Vec<String> = exec
            .running
            .iter()
            .filter(|e| gone(*e))
            .map(|(op, _)| op.clone())
            .collect();
        for op in &lost {
            exec.running.remove(op);
        }
        exec.draining.retain(|op, seq| !gone((op, seq)));
        let strays: Vec<String> = listed
            .into_iter()
            .filter(|op| !exec.running.contains_key(*op) && !exec.draining.contains_key(*op))
            .map(str::to_string)
            .collect();
        for op in strays {
            tracing::warn!(executor = executor_id, operation = %op, "executor runs an operation it was not given; cancelling it");
            send_cancel(exec, &op);
            exec.draining.insert(op, 0);
        }
        let why = format!("executor {executor_id} no longer runs it");
        for op in lost {
            tracing::warn!(executor = executor_id, operation = %op, "executor lost an action");
            self.lost(&mut st, &op, &why);
        }
        dispatch(&mut st);
    }

    /// An executor stored runner snapshots in the CAS: later jobs of their
    /// affinity keys carry the newest. Malformed reports are ignored.
    /// Returns those taken in.
    pub fn note_shared_snapshots(
        &self,
        executor: &str,
        snapshots: Vec<worker::SharedSnapshot>,
    ) -> Vec<worker::SharedSnapshot> {
        let mut st = self.lock();
        let mut kept = vec![];
        for s in snapshots {
            let key = s.affinity_key.clone();
            if st.snapshots.note(s.clone()) {
                kept.push(s);
            } else {
                tracing::warn!(executor, key = %key, "malformed shared snapshot report; ignored");
            }
        }
        kept
    }

    /// Whether a shared snapshot of `affinity_key` is known.
    pub fn has_shared_snapshot(&self, affinity_key: &str) -> bool {
        self.lock().snapshots.get(affinity_key).is_some()
    }

    /// An executor reports the affinity keys of the warm runners it holds now
    /// (one entry per runner); they replace what it reported before.
    pub fn report_warm(&self, executor_id: &str, session: u64, warm_keys: Vec<String>) {
        let mut st = self.lock();
        if let Some(exec) = heard_from(&mut st, executor_id, session) {
            exec.set_warm(warm_keys);
        }
    }

    /// An executor reports it finished `op`. Frees its slot (which
    /// dispatches the next job) and returns the job so the caller can store
    /// the result and then call [`Self::complete`]. Returns None for work
    /// no job owns any more, e.g. one cancelled while it ran.
    pub fn finish(&self, executor_id: &str, session: u64, op: &str) -> Option<RunningJob> {
        let mut st = self.lock();
        let exec = heard_from(&mut st, executor_id, session)?;
        let ours = exec.running.remove(op).is_some();
        if !ours && exec.draining.remove(op).is_none() {
            return None;
        }
        exec.saturated = false;
        self.slots.notify_one();
        let job = st.jobs.get(op).filter(|_| ours).map(|js| RunningJob {
            operation_name: op.to_string(),
            tenant: js.job.tenant.clone(),
            instance_name: js.job.instance_name.clone(),
            action_digest: js.job.action_digest,
            do_not_cache: js.job.do_not_cache,
        });
        dispatch(&mut st);
        job
    }

    /// An executor refused `op` as over its capacity: the job goes back to
    /// the front of the queue (the attempt not counted) and the executor
    /// gets nothing more until one of its actions ends.
    pub fn refused(&self, executor_id: &str, session: u64, op: &str) {
        let mut st = self.lock();
        let Some(exec) = heard_from(&mut st, executor_id, session) else {
            return;
        };
        if exec.running.remove(op).is_none() {
            exec.draining.remove(op);
            return;
        }
        exec.saturated = true;
        if let Some(js) = st.jobs.get_mut(op) {
            js.executor = None;
            js.attempts = js.attempts.saturating_sub(1);
            st.queue.push_front(op.to_string());
            publish_stage(&st, op, Stage::Queued);
        }
        dispatch(&mut st);
    }
}

/// The executor `executor_id` if `session` is its current one, marked as
/// heard from: every message of its session is a sign of life.
fn heard_from<'a>(st: &'a mut State, executor_id: &str, session: u64) -> Option<&'a mut Executor> {
    let exec = st
        .executors
        .get_mut(executor_id)
        .filter(|e| e.session == session)?;
    exec.last_heard = Instant::now();
    Some(exec)
}

/// A reconnecting executor still runs `op`, whose job went back to the
/// queue when the executor was given up on: it takes the job back instead
/// of the job running twice.
fn adopt_queued(st: &mut State, op: &str, exec: &Executor) -> bool {
    let Some(js) = st.jobs.get_mut(op) else {
        return false;
    };
    if js.executor.is_some() || exec.info.mismatch(&js.job.platform).is_some() {
        return false;
    }
    // The attempt it continues was counted when it was first sent there.
    js.executor = Some(exec.info.id.clone());
    st.queue.retain(|q| q != op);
    tracing::info!(operation = %op, executor = %exec.info.id, "a returning executor took its action back");
    publish_stage(st, op, Stage::Executing);
    true
}

#[cfg(test)]
#[path = "sessions_tests.rs"]
mod tests;
