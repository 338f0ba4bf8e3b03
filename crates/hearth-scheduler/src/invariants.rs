//! Property tests: random sequences of submissions (duplicates included),
//! executor deliveries, finishes, refusals, cancels, reports, connects,
//! broken sessions, restarts and the passing of time, played against
//! simulated executors that behave as the real ones do. After every step:
//!
//! - no executor is given more than its capacity;
//! - no job waits in the queue while a matching executor has a free slot;
//! - every job is queued exactly when no executor holds it, and an
//!   executor holds a job exactly when the job says it runs there;
//! - a completed operation's response never changes (it ends once), and
//!   identical shareable submissions in flight share one operation.
//!
//! At the end, with every executor back and working, every operation ends.

use std::time::{Duration, Instant};

use hearth_proto::reapi::{ActionResult, ExecuteResponse};
use hearth_proto::worker::{server_message, ServerMessage};
use hearth_storage::Digest;
use proptest::prelude::*;
use tokio::sync::{mpsc, watch};

use crate::{
    ExecutorInfo, ExecutorReport, Job, OpSnapshot, Platform, Scheduler, SchedulerConfig, Stage,
};

#[derive(Debug, Clone)]
enum Step {
    Submit {
        tag: u8,
        shareable: bool,
        gpu: bool,
    },
    Connect(usize),
    /// The session breaks; the executor keeps running its actions.
    Break(usize),
    /// The executor process dies and starts again, holding nothing.
    Restart(usize),
    /// The executor shuts down gracefully: it says it holds nothing and
    /// leaves (and may start again later).
    Leave(usize),
    /// The executor reads what the server sent it.
    Deliver(usize),
    /// The executor ends one of its actions (with or without its state: the
    /// end alone must free the slot and dispatch).
    Finish(usize, usize, bool),
    /// The executor says what it runs.
    Report(usize),
    Cancel(usize),
    /// Time passes (seconds).
    Sweep(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..5, any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(tag, shareable, gpu)| Step::Submit { tag, shareable, gpu }),
        2 => (0usize..3).prop_map(Step::Connect),
        1 => (0usize..3).prop_map(Step::Break),
        1 => (0usize..3).prop_map(Step::Restart),
        1 => (0usize..3).prop_map(Step::Leave),
        4 => (0usize..3).prop_map(Step::Deliver),
        4 => (0usize..3, 0usize..4, any::<bool>()).prop_map(|(e, i, r)| Step::Finish(e, i, r)),
        1 => (0usize..3).prop_map(Step::Report),
        1 => (0usize..16).prop_map(Step::Cancel),
        1 => (0u64..40).prop_map(Step::Sweep),
    ]
}

/// A simulated executor: it takes assignments up to its capacity, refuses
/// beyond, keeps running across broken sessions, and ends work when told.
struct SimExecutor {
    id: String,
    capacity: u32,
    gpu: bool,
    session: Option<(u64, mpsc::UnboundedReceiver<ServerMessage>)>,
    /// Running (or finished, not yet reported) operations.
    running: Vec<String>,
    received: u64,
}

impl SimExecutor {
    fn info(&self) -> ExecutorInfo {
        let mut properties = std::collections::BTreeMap::new();
        if self.gpu {
            properties.insert("pool".to_string(), "gpu".to_string());
        }
        ExecutorInfo {
            id: self.id.clone(),
            description: String::new(),
            properties,
            isolation_types: vec!["none".into()],
            capacity: self.capacity,
            vm_unavailable: String::new(),
        }
    }

    fn report(&self) -> ExecutorReport {
        ExecutorReport {
            running: self.running.clone(),
            assignments_received: self.received,
            leaving: false,
        }
    }
}

struct World {
    s: std::sync::Arc<Scheduler>,
    execs: Vec<SimExecutor>,
    /// Every watcher handed out, with the final response once seen.
    watchers: Vec<(watch::Receiver<OpSnapshot>, Option<ExecuteResponse>)>,
    now: Instant,
}

fn job(tag: u8, shareable: bool, gpu: bool) -> Job {
    let mut pairs = vec![];
    if gpu {
        pairs.push(("Pool", "gpu"));
    }
    Job {
        tenant: String::new(),
        instance_name: String::new(),
        action_digest: Digest::of(&[tag, gpu as u8]),
        action: vec![],
        command: vec![],
        platform: Platform::from_pairs(pairs),
        do_not_cache: false,
        shareable,
        pins: None,
    }
}

/// What a run of `op` produces: distinct per operation.
fn result_of(op: &str) -> ExecuteResponse {
    ExecuteResponse {
        result: Some(ActionResult {
            stdout_raw: op.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl World {
    fn new() -> World {
        let s = Scheduler::new(SchedulerConfig {
            reconnect_grace: Duration::from_secs(10),
            executor_silence: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(120),
            max_attempts: 3,
            ..SchedulerConfig::default()
        });
        let execs = [(1, false), (2, false), (1, true)]
            .into_iter()
            .enumerate()
            .map(|(i, (capacity, gpu))| SimExecutor {
                id: format!("e{i}"),
                capacity,
                gpu,
                session: None,
                running: vec![],
                received: 0,
            })
            .collect();
        World {
            s,
            execs,
            watchers: vec![],
            now: Instant::now(),
        }
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Submit {
                tag,
                shareable,
                gpu,
            } => {
                let in_flight = self.in_flight_shared(tag, gpu);
                if let Ok(rx) = self.s.submit(job(tag, shareable, gpu)) {
                    if let (true, Some(name)) = (shareable, in_flight) {
                        assert_eq!(rx.borrow().name, name, "duplicates share one run");
                    }
                    self.watchers.push((rx, None));
                }
            }
            Step::Connect(e) => self.connect(e),
            Step::Break(e) => {
                if let Some((session, _)) = self.execs[e].session.take() {
                    self.s.disconnect(&self.execs[e].id, session);
                }
            }
            Step::Restart(e) => {
                if let Some((session, _)) = self.execs[e].session.take() {
                    self.s.disconnect(&self.execs[e].id, session);
                }
                self.execs[e].running.clear();
            }
            Step::Leave(e) => {
                let x = &mut self.execs[e];
                if let Some((session, _)) = x.session.take() {
                    let farewell = ExecutorReport {
                        running: vec![],
                        assignments_received: x.received,
                        leaving: true,
                    };
                    self.s.report(&x.id, session, &farewell);
                    self.s.disconnect(&x.id, session);
                    x.running.clear();
                }
            }
            Step::Deliver(e) => self.deliver(e),
            Step::Finish(e, i, with_state) => self.finish(e, i, with_state),
            Step::Report(e) => {
                let x = &self.execs[e];
                if let Some((session, _)) = &x.session {
                    self.s.report(&x.id, *session, &x.report());
                }
            }
            Step::Cancel(i) => {
                if let Some((rx, _)) = self.watchers.get(i) {
                    let name = rx.borrow().name.clone();
                    self.s.cancel(&name, None);
                }
            }
            Step::Sweep(secs) => {
                self.now += Duration::from_secs(secs);
                self.s.sweep(self.now);
            }
        }
    }

    fn in_flight_shared(&self, tag: u8, gpu: bool) -> Option<String> {
        let st = self.s.lock();
        let key = (String::new(), String::new(), Digest::of(&[tag, gpu as u8]));
        st.shared.get(&key).cloned()
    }

    fn connect(&mut self, e: usize) {
        let x = &mut self.execs[e];
        let held = x.running.clone();
        // Connecting again while connected is a reconnect after a blip the
        // server has not noticed yet.
        if let Ok((session, rx)) = self.s.reconnect(x.info(), vec![], &held, "owner") {
            x.session = Some((session, rx));
            x.received = 0;
        }
    }

    fn deliver(&mut self, e: usize) {
        let x = &mut self.execs[e];
        let Some((session, rx)) = x.session.as_mut() else {
            return;
        };
        let session = *session;
        let mut refused = vec![];
        let mut cancelled = vec![];
        while let Ok(msg) = rx.try_recv() {
            match msg.kind {
                Some(server_message::Kind::Assign(a)) => {
                    x.received = x.received.max(a.sequence);
                    if x.running.contains(&a.operation_name) {
                        continue;
                    }
                    if x.running.len() >= x.capacity as usize {
                        refused.push(a.operation_name);
                    } else {
                        x.running.push(a.operation_name);
                    }
                }
                Some(server_message::Kind::Cancel(c)) => cancelled.push(c.operation_name),
                None => {}
            }
        }
        let id = x.id.clone();
        for op in refused {
            self.s.refused(&id, session, &op);
        }
        // A cancelled action ends at once, reporting its end.
        for op in cancelled {
            if let Some(i) = self.execs[e].running.iter().position(|o| *o == op) {
                self.finish(e, i, true);
            }
        }
    }

    fn finish(&mut self, e: usize, i: usize, with_state: bool) {
        let x = &mut self.execs[e];
        if x.running.is_empty() {
            return;
        }
        let Some((session, _)) = &x.session else {
            return;
        };
        let session = *session;
        let op = x.running.remove(i % x.running.len());
        let report = x.report();
        let id = x.id.clone();
        if let Some(job) = self.s.finish(&id, session, &op) {
            self.s.complete(&job.operation_name, result_of(&op));
        }
        if with_state {
            self.s.report(&id, session, &report);
        }
    }

    fn check(&mut self) {
        for (rx, seen) in &mut self.watchers {
            let snap = rx.borrow().clone();
            match (seen.as_ref(), snap.stage) {
                (Some(first), stage) => {
                    assert_eq!(stage, Stage::Completed, "{} went back", snap.name);
                    assert_eq!(
                        snap.response.as_ref(),
                        Some(first),
                        "{} ended twice",
                        snap.name
                    );
                }
                (None, Stage::Completed) => *seen = snap.response.clone(),
                _ => {}
            }
        }
        let st = self.s.lock();
        for (id, e) in &st.executors {
            assert!(
                e.busy() <= e.info.capacity,
                "{id} overcommitted: {} running, {} draining, capacity {}",
                e.running.len(),
                e.draining.len(),
                e.info.capacity
            );
            for op in e.running.keys() {
                let on = st.jobs.get(op).and_then(|j| j.executor.as_deref());
                assert_eq!(
                    on,
                    Some(id.as_str()),
                    "{id} holds {op}, which runs elsewhere"
                );
            }
        }
        for (op, js) in &st.jobs {
            let queued = st.queue.contains(op);
            match &js.executor {
                None => assert!(queued, "{op} is neither queued nor running"),
                Some(id) => {
                    assert!(!queued, "{op} is both queued and on {id}");
                    assert!(
                        st.executors
                            .get(id)
                            .is_some_and(|e| e.running.contains_key(op)),
                        "{op} says it runs on {id}, which does not hold it"
                    );
                }
            }
        }
        for op in &st.queue {
            let Some(js) = st.jobs.get(op) else { continue };
            let idle = st.executors.values().find(|e| e.can_take(&js.job.platform));
            assert!(
                idle.is_none(),
                "{op} waits while {} has a free slot",
                idle.map_or("", |e| e.info.id.as_str())
            );
        }
    }

    /// Every executor comes back and works until nothing is left.
    fn drain(&mut self) {
        for round in 0..50 {
            for e in 0..self.execs.len() {
                if self.execs[e].session.is_none() {
                    self.connect(e);
                }
                self.deliver(e);
                while !self.execs[e].running.is_empty() {
                    self.finish(e, 0, true);
                    self.deliver(e);
                }
                self.check();
            }
            if self.s.lock().jobs.is_empty() {
                return;
            }
            // Let grace periods lapse, so nothing waits for a ghost.
            self.now += Duration::from_secs(11);
            self.s.sweep(self.now);
            assert!(round < 49, "work left after 50 rounds");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn scheduler_invariants_hold(steps in prop::collection::vec(step(), 1..80)) {
        let mut w = World::new();
        for s in &steps {
            w.apply(s);
            w.check();
        }
        w.drain();
        w.check();
        for (rx, seen) in &w.watchers {
            prop_assert!(seen.is_some(), "{} never ended", rx.borrow().name);
        }
        let st = w.s.lock();
        for e in st.executors.values() {
            prop_assert_eq!(e.busy(), 0, "{} still holds work", &e.info.id);
        }
    }
}
