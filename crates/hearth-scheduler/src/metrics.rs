//! What the scheduler tells `/metrics`, through the `metrics` facade (each
//! call is a no-op unless the binary installed an exporter).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::history::ExecutionRecord;
use crate::SchedulerStats;

/// A job left the queue for an executor after waiting `wait`.
pub(crate) fn dispatched(wait: Duration) {
    histogram!("hearth_queue_wait_seconds").record(wait.as_secs_f64());
}

/// An operation the scheduler ran finished.
pub(crate) fn completed(r: &ExecutionRecord) {
    let outcome = if r.status_code != 0 {
        "error"
    } else if r.succeeded() {
        "ok"
    } else {
        "failed"
    };
    counter!("hearth_executions_total", "isolation" => r.base.isolation.clone(), "outcome" => outcome)
        .increment(1);
    for (stage, took) in r.stages().named() {
        if let Some(took) = took {
            histogram!(
                "hearth_execution_stage_seconds",
                "stage" => stage,
                "isolation" => r.base.isolation.clone()
            )
            .record(took.as_secs_f64());
        }
    }
    if let Some(start) = r.runner_start() {
        let kind = start_kind(&start.kind);
        counter!("hearth_vm_starts_total", "kind" => kind).increment(1);
        histogram!("hearth_vm_start_seconds", "kind" => kind)
            .record(start.ready_millis as f64 / 1000.0);
    }
}

/// The label of a runner start as an executor reported it: one of the
/// kinds executors start runners by (`hearth_executor::StartKind`, a
/// crate this one does not depend on), else `other`, so that an executor
/// sending made-up kinds cannot grow the label set.
fn start_kind(kind: &str) -> &'static str {
    ["cold", "clone", "resume", "restore", "fetched"]
        .into_iter()
        .find(|k| *k == kind)
        .unwrap_or("other")
}

/// Sets the gauges of the queue and the executors from `stats` (the
/// exporter calls it before each scrape).
pub fn publish(stats: &SchedulerStats) {
    gauge!("hearth_queue_length").set(f64::from(stats.queued));
    gauge!("hearth_actions_running").set(f64::from(stats.running));
    let connected = stats.executors.iter().filter(|e| !e.reconnecting).count();
    gauge!("hearth_executors_connected").set(connected as f64);
    let capacity: u32 = stats.executors.iter().map(|e| e.info.capacity).sum();
    let busy: u32 = stats.executors.iter().map(|e| e.running).sum();
    gauge!("hearth_executor_slots", "state" => "busy").set(f64::from(busy));
    gauge!("hearth_executor_slots", "state" => "free")
        .set(f64::from(capacity.saturating_sub(busy)));
    let warm: u32 = stats.executors.iter().map(|e| e.warm_runners).sum();
    gauge!("hearth_warm_runners").set(f64::from(warm));
    gauge!("hearth_shared_runner_snapshots").set(stats.shared_snapshots_total as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executor_cannot_make_up_start_kinds() {
        assert_eq!(start_kind("clone"), "clone");
        assert_eq!(start_kind("fetched"), "fetched");
        assert_eq!(start_kind("kind-1234567"), "other");
        assert_eq!(start_kind(""), "other");
    }
}
