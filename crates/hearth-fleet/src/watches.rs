//! Operations clients watch through this replica, wherever they run: each
//! is a watch channel fed by the `ops` channel, by this replica's own
//! mirrors, and by a poll that covers messages lost while Redis was away.

use std::collections::HashMap;
use std::sync::Mutex;

use hearth_scheduler::{OpSnapshot, Stage};
use tokio::sync::watch;

#[derive(Default)]
pub struct Watches {
    map: Mutex<HashMap<String, watch::Sender<OpSnapshot>>>,
}

impl Watches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<OpSnapshot>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of `snap.name`'s states, starting from `snap` unless a
    /// later one is known.
    pub fn watch(&self, snap: OpSnapshot) -> watch::Receiver<OpSnapshot> {
        let mut map = self.lock();
        match map.get(&snap.name) {
            Some(tx) => {
                let rx = tx.subscribe();
                deliver_to(tx, snap);
                rx
            }
            None => {
                let name = snap.name.clone();
                let (tx, rx) = watch::channel(snap);
                map.insert(name, tx);
                rx
            }
        }
    }

    /// A new state of an operation, if anyone here watches it.
    pub fn deliver(&self, snap: OpSnapshot) {
        if let Some(tx) = self.lock().get(&snap.name) {
            deliver_to(tx, snap);
        }
    }

    /// Ends a watched operation with an error (its record was lost).
    pub fn fail(&self, name: &str, code: i32, message: &str) {
        if let Some(tx) = self.lock().get(name) {
            let snap = crate::failed(tx.borrow().clone(), code, message);
            deliver_to(tx, snap);
        }
    }

    /// The operations someone here still watches (and not yet completed);
    /// forgets those nobody does.
    pub fn watched(&self) -> Vec<String> {
        let mut map = self.lock();
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.iter()
            .filter(|(_, tx)| tx.borrow().stage != Stage::Completed)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// A completed operation stays completed: a late or replayed message of an
/// earlier stage is ignored. Unchanged stages wake no one.
fn deliver_to(tx: &watch::Sender<OpSnapshot>, snap: OpSnapshot) {
    tx.send_if_modified(|cur| {
        if cur.stage == Stage::Completed || (cur.stage == snap.stage && snap.response.is_none()) {
            return false;
        }
        *cur = snap;
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::reapi::ExecuteResponse;
    use hearth_storage::Digest;

    fn snap(stage: Stage) -> OpSnapshot {
        OpSnapshot {
            name: "operations/a".into(),
            action_digest: Digest::of(b"a"),
            stage,
            response: (stage == Stage::Completed).then(ExecuteResponse::default),
        }
    }

    #[test]
    fn completed_is_final_and_unwatched_ones_are_forgotten() {
        let w = Watches::default();
        let mut rx = w.watch(snap(Stage::Queued));
        w.deliver(snap(Stage::Executing));
        assert_eq!(rx.borrow_and_update().stage, Stage::Executing);
        w.deliver(snap(Stage::Completed));
        w.deliver(snap(Stage::Queued));
        assert_eq!(rx.borrow().stage, Stage::Completed);
        assert!(
            w.watched().is_empty(),
            "a completed operation needs no poll"
        );
        drop(rx);
        w.watched();
        assert!(w.lock().is_empty());
    }
}
