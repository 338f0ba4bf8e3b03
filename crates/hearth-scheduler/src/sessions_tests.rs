//! Unit tests of reconciliation: reconnects, reports, the grace period.

use std::time::Duration;

use hearth_proto::reapi::ExecuteResponse;
use hearth_proto::worker::{server_message, ServerMessage};
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::test_support::info;
use crate::{Job, Platform, SchedulerConfig};

fn job(tag: &str) -> Job {
    crate::test_support::job(tag, Platform::default())
}

fn scheduler(grace: Duration) -> std::sync::Arc<Scheduler> {
    Scheduler::new(SchedulerConfig {
        reconnect_grace: grace,
        ..SchedulerConfig::default()
    })
}

/// Next message: ("assign", op, sequence) or ("cancel", op, 0).
fn next(rx: &mut UnboundedReceiver<ServerMessage>) -> Option<(&'static str, String, u64)> {
    match rx.try_recv().ok()?.kind? {
        server_message::Kind::Assign(a) => Some(("assign", a.operation_name, a.sequence)),
        server_message::Kind::Cancel(c) => Some(("cancel", c.operation_name, 0)),
    }
}

fn report(running: &[&str], received: u64) -> ExecutorReport {
    ExecutorReport {
        running: running.iter().map(|s| s.to_string()).collect(),
        assignments_received: received,
        leaving: false,
    }
}

/// A gracefully stopping executor's last report.
fn farewell(received: u64) -> ExecutorReport {
    ExecutorReport {
        leaving: true,
        ..report(&[], received)
    }
}

#[tokio::test]
async fn a_reconnect_within_the_grace_period_keeps_the_running_action() {
    let s = scheduler(Duration::from_secs(30));
    let (s1, mut rx1) = s.connect(info("e1", 1), vec![], "k").unwrap();
    let op = s.submit(job("a")).unwrap();
    let (_, name, _) = next(&mut rx1).unwrap();
    s.disconnect("e1", s1);
    s.sweep(Instant::now());
    assert_eq!(op.borrow().stage, Stage::Executing, "not re-queued yet");
    assert!(s.stats(None).executors[0].reconnecting);
    let (s2, mut rx2) = s
        .reconnect(info("e1", 1), vec![], std::slice::from_ref(&name), "k")
        .unwrap();
    assert!(
        next(&mut rx2).is_none(),
        "nothing re-sent, nothing cancelled"
    );
    assert_eq!(op.borrow().stage, Stage::Executing);
    assert!(
        s.finish("e1", s1, &name).is_none(),
        "the old session is gone"
    );
    let job = s
        .finish("e1", s2, &name)
        .expect("the new session reports it");
    s.complete(&job.operation_name, ExecuteResponse::default());
    assert_eq!(op.borrow().stage, Stage::Completed);
    assert_eq!(s.stats(None).requeued, 0);
}

#[tokio::test]
async fn a_reconnect_without_the_action_requeues_it_at_once() {
    let s = scheduler(Duration::from_secs(30));
    let (s1, mut rx1) = s.connect(info("e1", 1), vec![], "k").unwrap();
    let op = s.submit(job("a")).unwrap();
    let (_, name, _) = next(&mut rx1).unwrap();
    s.disconnect("e1", s1);
    // A restarted executor with the same id holds nothing.
    let (_, mut rx2) = s.reconnect(info("e1", 1), vec![], &[], "k").unwrap();
    let (kind, again, seq) = next(&mut rx2).expect("re-sent");
    assert_eq!((kind, again.as_str(), seq), ("assign", name.as_str(), 1));
    assert_eq!(op.borrow().stage, Stage::Executing);
    assert_eq!(s.stats(None).requeued, 1);
}

#[tokio::test]
async fn work_no_job_owns_is_cancelled_and_holds_its_slot_until_it_ends() {
    let s = scheduler(Duration::from_secs(30));
    let (session, mut rx) = s
        .reconnect(info("e1", 1), vec![], &["operations/ghost".into()], "k")
        .unwrap();
    assert_eq!(
        next(&mut rx),
        Some(("cancel", "operations/ghost".to_string(), 0))
    );
    let op = s.submit(job("a")).unwrap();
    assert!(next(&mut rx).is_none(), "its one slot is still taken");
    assert!(s.finish("e1", session, "operations/ghost").is_none());
    let (kind, name, _) = next(&mut rx).unwrap();
    assert_eq!((kind, name), ("assign", op.borrow().name.clone()));
}

#[tokio::test]
async fn after_the_grace_period_the_action_is_requeued_and_a_late_return_takes_it_back() {
    let s = scheduler(Duration::from_secs(5));
    let (s1, mut rx1) = s.connect(info("e1", 1), vec![], "k").unwrap();
    let op = s.submit(job("a")).unwrap();
    let (_, name, _) = next(&mut rx1).unwrap();
    s.disconnect("e1", s1);
    s.sweep(Instant::now() + Duration::from_secs(6));
    assert_eq!(op.borrow().stage, Stage::Queued);
    assert!(s.stats(None).executors.is_empty());
    // It comes back still running it, before anyone else took the job.
    let (s2, mut rx2) = s
        .reconnect(info("e1", 1), vec![], std::slice::from_ref(&name), "k")
        .unwrap();
    assert!(next(&mut rx2).is_none());
    assert_eq!(op.borrow().stage, Stage::Executing);
    assert!(s.finish("e1", s2, &name).is_some());
    assert_eq!(s.stats(None).jobs[0].attempts, 1, "one run, not two");
}

#[tokio::test]
async fn a_late_return_is_told_to_stop_what_another_executor_now_runs() {
    let s = scheduler(Duration::from_secs(5));
    let (s1, mut rx1) = s.connect(info("e1", 1), vec![], "k").unwrap();
    let op = s.submit(job("a")).unwrap();
    let (_, name, _) = next(&mut rx1).unwrap();
    s.disconnect("e1", s1);
    s.sweep(Instant::now() + Duration::from_secs(6));
    let (s2, mut rx2) = s.connect(info("e2", 1), vec![], "k").unwrap();
    assert_eq!(next(&mut rx2).unwrap().1, name);
    let (s3, mut rx3) = s
        .reconnect(info("e1", 1), vec![], std::slice::from_ref(&name), "k")
        .unwrap();
    assert_eq!(next(&mut rx3), Some(("cancel", name.clone(), 0)));
    assert!(
        s.finish("e1", s3, &name).is_none(),
        "its result is not the job's"
    );
    assert_eq!(op.borrow().stage, Stage::Executing, "e2 still runs it");
    assert!(s.finish("e2", s2, &name).is_some());
}

#[tokio::test]
async fn a_report_missing_a_received_assignment_requeues_it_but_not_one_in_flight() {
    let s = scheduler(Duration::from_secs(30));
    let (session, mut rx) = s.connect(info("e1", 2), vec![], "k").unwrap();
    let a = s.submit(job("a")).unwrap();
    let b = s.submit(job("b")).unwrap();
    let (_, first, seq1) = next(&mut rx).unwrap();
    let (_, _second, seq2) = next(&mut rx).unwrap();
    assert_eq!((seq1, seq2), (1, 2));
    // The executor has seen only the first and no longer runs it.
    s.report("e1", session, &report(&[], 1));
    assert_eq!(a.borrow().stage, Stage::Executing, "re-sent at once");
    assert_eq!(next(&mut rx).map(|m| (m.1, m.2)), Some((first, 3)));
    assert_eq!(
        b.borrow().stage,
        Stage::Executing,
        "the second is in flight"
    );
    assert_eq!(s.stats(None).requeued, 1);
}

#[tokio::test]
async fn a_stray_operation_in_a_report_is_cancelled_once() {
    let s = scheduler(Duration::from_secs(30));
    let (session, mut rx) = s.connect(info("e1", 2), vec![], "k").unwrap();
    s.report("e1", session, &report(&["operations/x"], 0));
    assert_eq!(next(&mut rx), Some(("cancel", "operations/x".into(), 0)));
    s.report("e1", session, &report(&["operations/x"], 0));
    assert!(next(&mut rx).is_none());
    assert_eq!(s.stats(None).executors[0].running, 1, "it holds a slot");
    s.report("e1", session, &report(&[], 0));
    assert_eq!(s.stats(None).executors[0].running, 0, "gone, slot freed");
}

#[tokio::test]
async fn a_silent_executor_is_taken_as_gone_and_its_stream_closed() {
    let s = Scheduler::new(SchedulerConfig {
        reconnect_grace: Duration::from_secs(5),
        executor_silence: Duration::from_secs(20),
        ..SchedulerConfig::default()
    });
    let (session, mut rx) = s.connect(info("e1", 1), vec![], "k").unwrap();
    let op = s.submit(job("a")).unwrap();
    assert!(next(&mut rx).is_some());
    s.sweep(Instant::now() + Duration::from_secs(10));
    assert!(!s.stats(None).executors[0].reconnecting, "still heard of");
    s.sweep(Instant::now() + Duration::from_secs(21));
    assert!(s.stats(None).executors[0].reconnecting);
    assert!(
        matches!(
            rx.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        ),
        "its outbound stream is closed, so it reconnects"
    );
    s.report("e1", session, &report(&[], 1));
    s.sweep(Instant::now() + Duration::from_secs(27));
    assert_eq!(
        op.borrow().stage,
        Stage::Queued,
        "re-queued after the grace"
    );
}

#[tokio::test]
async fn a_cancelled_action_on_an_executor_that_was_away_is_cancelled_again_on_return() {
    let s = scheduler(Duration::from_secs(30));
    let (s1, mut rx1) = s.connect(info("e1", 1), vec![], "k").unwrap();
    let op = s.submit(job("a")).unwrap();
    let (_, name, _) = next(&mut rx1).unwrap();
    s.disconnect("e1", s1);
    assert!(s.cancel(&name, None));
    assert_eq!(op.borrow().stage, Stage::Completed);
    let (_, mut rx2) = s
        .reconnect(info("e1", 1), vec![], std::slice::from_ref(&name), "k")
        .unwrap();
    assert_eq!(
        next(&mut rx2),
        Some(("cancel", name, 0)),
        "the first cancel was lost with the session"
    );
}

#[tokio::test]
async fn a_leaving_executor_hands_its_work_back_and_gets_no_more() {
    let s = scheduler(Duration::from_secs(300));
    let (session, mut rx) = s.connect(info("e1", 1), vec![], "k").unwrap();
    let op = s.submit(job("a")).unwrap();
    let (_, name, seq) = next(&mut rx).unwrap();
    s.report("e1", session, &farewell(seq));
    assert_eq!(op.borrow().stage, Stage::Queued, "re-queued at once");
    assert!(next(&mut rx).is_none(), "not sent back to the leaver");
    let (_, mut rx2) = s.connect(info("e2", 1), vec![], "k").unwrap();
    assert_eq!(next(&mut rx2).map(|m| m.1), Some(name));
}

/// An assignment sent while the executor's farewell was on its way is not
/// left waiting out the grace period when the leaver's stream closes.
#[tokio::test]
async fn what_crossed_a_farewell_is_requeued_when_the_leaver_goes() {
    let s = scheduler(Duration::from_secs(300));
    let (session, mut rx) = s.connect(info("e1", 2), vec![], "k").unwrap();
    let a = s.submit(job("a")).unwrap();
    let (_, _, seq) = next(&mut rx).unwrap();
    let b = s.submit(job("b")).unwrap();
    // The farewell was written before the second assignment arrived.
    s.report("e1", session, &farewell(seq));
    assert_eq!(a.borrow().stage, Stage::Queued);
    assert_eq!(
        b.borrow().stage,
        Stage::Executing,
        "in flight to the leaver"
    );
    s.disconnect("e1", session);
    assert_eq!(b.borrow().stage, Stage::Queued, "not held for 300 s");
    assert!(s.stats(None).executors.is_empty());
}

/// Shared snapshots are listed to admins only: a tenant's status would
/// otherwise show every tenant's warm runners (and their manifests).
#[tokio::test]
async fn shared_snapshots_are_listed_to_admins_only() {
    let s = scheduler(Duration::from_secs(5));
    let shared = hearth_proto::worker::SharedSnapshot {
        affinity_key: "aff".into(),
        runner_key: "aff.vm".into(),
        manifest: Some(hearth_proto::worker::Digest {
            hash: "a".repeat(64),
            size_bytes: 10,
        }),
    };
    assert_eq!(s.note_shared_snapshots("e1", vec![shared]).len(), 1);
    assert_eq!(s.stats(None).shared_snapshots.len(), 1);
    assert!(s.stats(Some("team-a")).shared_snapshots.is_empty());
}
