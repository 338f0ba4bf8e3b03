//! Dispatch: which queued job goes to which executor, run after every event
//! that may free a slot or queue a job (the scheduler calls it with its
//! state locked).

use std::time::SystemTime;

use hearth_proto::worker::{self, server_message};

use crate::scheduler::{publish_stage, State};
use crate::Stage;

/// Hands queued jobs to executors with free slots, oldest job first; each
/// goes to the matching executor with the most free slots, except that a job
/// with an affinity key prefers, among those, one holding a warm runner with
/// that key. It never waits for a warm executor that has no free slot.
pub(crate) fn dispatch(st: &mut State) {
    let mut i = 0;
    while i < st.queue.len() {
        let op = st.queue[i].clone();
        let Some(js) = st.jobs.get(&op) else {
            st.queue.remove(i);
            continue;
        };
        let affinity = js.affinity.as_deref();
        let target = st
            .executors
            .values()
            .filter(|e| e.can_take(&js.job.platform))
            .max_by_key(|e| (affinity.is_some_and(|k| e.holds_warm(k)), e.free_slots()))
            .map(|e| e.info.id.clone());
        let Some(exec_id) = target else {
            i += 1;
            continue;
        };
        let Some(exec) = st.executors.get_mut(&exec_id) else {
            i += 1;
            continue;
        };
        st.queue.remove(i);
        crate::metrics::dispatched(js.enqueued.elapsed());
        let sequence = exec.sequence + 1;
        let queued_at = js
            .queued_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let msg = worker::ServerMessage {
            kind: Some(server_message::Kind::Assign(worker::Assignment {
                operation_name: op.clone(),
                tenant: js.job.tenant.clone(),
                instance_name: js.job.instance_name.clone(),
                action_digest: Some(worker::Digest {
                    hash: js.job.action_digest.hash_hex(),
                    size_bytes: js.job.action_digest.size() as i64,
                }),
                action: js.job.action.clone(),
                command: js.job.command.clone(),
                queued_at: Some(worker::Timestamp {
                    seconds: queued_at.as_secs() as i64,
                    nanos: queued_at.subsec_nanos() as i32,
                }),
                attempt: js.attempts + 1,
                sequence,
                shared_snapshot: affinity.and_then(|k| st.snapshots.get(k)).cloned(),
            })),
        };
        if exec.sender.send(msg).is_err() {
            // The session is going away; its disconnect will follow.
            st.queue.insert(i, op);
            i += 1;
            continue;
        }
        exec.sequence = sequence;
        exec.running.insert(op.clone(), sequence);
        if let Some(key) = affinity {
            if exec.holds_warm(key) {
                tracing::debug!(operation = %op, executor = %exec_id, "sent to an executor holding a warm runner");
                // Taken now: the next job with this key must not count on it.
                // The executor's next report says what it really holds.
                exec.take_warm(key);
            }
        }
        if let Some(js) = st.jobs.get_mut(&op) {
            js.executor = Some(exec_id);
            js.attempts += 1;
        }
        publish_stage(st, &op, Stage::Executing);
    }
}
