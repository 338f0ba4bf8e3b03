//! What this executor runs, kept across sessions with the server. A session
//! that breaks leaves its actions running; the next session's Hello lists
//! them, and results that found no session go out right after it. Every
//! message after Hello carries the same account (`ExecutorState`), so the
//! server can reconcile (see `hearth_scheduler`'s sessions).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use hearth_proto::worker::{worker_message, ExecutorState, Finished, Hello, Report, WorkerMessage};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

/// Why an assignment is not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Already running as many actions as the capacity (the count).
    Full(usize),
    /// Already running this very operation.
    Duplicate,
}

pub(crate) struct Tracker {
    /// Parent of every action's token: cancelled at shutdown.
    shutdown: CancellationToken,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: HashMap<String, CancellationToken>,
    /// Results that found no session to go out on.
    unsent: Vec<Finished>,
    session: Option<Outbound>,
}

struct Outbound {
    tx: UnboundedSender<WorkerMessage>,
    /// The highest assignment sequence number received on it.
    received: u64,
}

impl Inner {
    fn state(&self) -> ExecutorState {
        let mut running: Vec<String> = self
            .running
            .keys()
            .cloned()
            .chain(self.unsent.iter().map(|f| f.operation_name.clone()))
            .collect();
        running.sort();
        ExecutorState {
            running_operations: running,
            assignments_received: self.session.as_ref().map_or(0, |s| s.received),
            leaving: false,
        }
    }

    /// Sends `f` with the state after it; keeps it for the next session if
    /// there is none or it is closing.
    fn send_finished(&mut self, mut f: Finished) {
        f.state = Some(self.state());
        let Some(session) = &self.session else {
            return self.unsent.push(f);
        };
        let msg = WorkerMessage {
            kind: Some(worker_message::Kind::Finished(f)),
        };
        if let Err(e) = session.tx.send(msg) {
            // The session is closing: the message comes back, for the next.
            self.session = None;
            if let Some(worker_message::Kind::Finished(f)) = e.0.kind {
                self.unsent.push(f);
            }
        }
    }
}

impl Tracker {
    pub fn new(shutdown: CancellationToken) -> Self {
        Tracker {
            shutdown,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills in what a new session's Hello reports as held.
    pub fn hello(&self, mut hello: Hello) -> Hello {
        hello.running_operations = self.lock().state().running_operations;
        hello
    }

    /// The session is open: results kept since the last one go out first.
    pub fn attach(&self, tx: UnboundedSender<WorkerMessage>) {
        let mut inner = self.lock();
        inner.session = Some(Outbound { tx, received: 0 });
        // One at a time, so each one's state lists those still to come.
        while inner.session.is_some() && !inner.unsent.is_empty() {
            let f = inner.unsent.remove(0);
            inner.send_finished(f);
        }
    }

    /// The session ended: results wait for the next one.
    pub fn detach(&self) {
        self.lock().session = None;
    }

    /// Takes an assignment numbered `sequence` unless that would exceed
    /// `capacity` or it already runs; returns its cancellation token.
    pub fn accept(
        &self,
        op: &str,
        sequence: u64,
        capacity: u32,
    ) -> Result<CancellationToken, Refusal> {
        let mut inner = self.lock();
        if let Some(s) = inner.session.as_mut() {
            s.received = s.received.max(sequence);
        }
        if inner.running.contains_key(op) {
            return Err(Refusal::Duplicate);
        }
        if inner.running.len() >= capacity as usize {
            return Err(Refusal::Full(inner.running.len()));
        }
        let token = self.shutdown.child_token();
        inner.running.insert(op.to_string(), token.clone());
        Ok(token)
    }

    pub fn cancel(&self, op: &str) {
        if let Some(t) = self.lock().running.get(op) {
            t.cancel();
        }
    }

    /// An action ended (or was refused): report it with the state after it.
    pub fn finished(&self, f: Finished) {
        let mut inner = self.lock();
        if !f.refused {
            inner.running.remove(&f.operation_name);
        }
        inner.send_finished(f);
    }

    /// The periodic account of what runs, with the warm runners' keys.
    pub fn report(
        &self,
        warm_keys: Vec<String>,
        shared_snapshots: Vec<hearth_proto::worker::SharedSnapshot>,
    ) {
        let inner = self.lock();
        if let Some(s) = &inner.session {
            let _ = s.tx.send(WorkerMessage {
                kind: Some(worker_message::Kind::Report(Report {
                    state: Some(inner.state()),
                    warm_keys,
                    shared_snapshots,
                })),
            });
        }
    }

    /// At shutdown: tells the server this executor holds nothing any more
    /// (its actions are being cancelled), so the server re-queues them at
    /// once rather than waiting out the reconnect grace period for it.
    pub fn farewell(&self) {
        let mut inner = self.lock();
        let received = inner.session.as_ref().map_or(0, |s| s.received);
        if let Some(s) = inner.session.take() {
            let _ = s.tx.send(WorkerMessage {
                kind: Some(worker_message::Kind::Report(Report {
                    state: Some(ExecutorState {
                        running_operations: vec![],
                        assignments_received: received,
                        leaving: true,
                    }),
                    warm_keys: vec![],
                    shared_snapshots: vec![],
                })),
            });
        }
    }

    /// How many actions run now.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }
}
