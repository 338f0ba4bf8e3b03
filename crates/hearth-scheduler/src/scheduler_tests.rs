//! Unit tests of the queue and dispatch, warm-runner affinity included.

use super::*;
use crate::test_support::{info, job};
use tokio::sync::mpsc;

/// A `recycle-runner` job whose platform (so affinity key) is set by `image`.
fn recycled(tag: &str, image: &str) -> Job {
    job(
        tag,
        Platform::from_pairs([("recycle-runner", "true"), ("container-image", image)]),
    )
}

fn key_of(image: &str) -> String {
    affinity_key("", "", &recycled("", image).platform)
}

fn assigned(rx: &mut mpsc::UnboundedReceiver<worker::ServerMessage>) -> Option<String> {
    match rx.try_recv().ok()?.kind? {
        server_message::Kind::Assign(a) => Some(a.operation_name),
        _ => None,
    }
}

#[tokio::test]
async fn waits_for_an_executor_then_dispatches() {
    let s = Scheduler::new(SchedulerConfig::default());
    let op = s.submit(job("a", Platform::default())).unwrap();
    assert_eq!(op.borrow().stage, Stage::Queued);
    let (session, mut rx) = s.connect(info("e1", 1), vec![], "").unwrap();
    let name = assigned(&mut rx).expect("assignment");
    assert_eq!(op.borrow().stage, Stage::Executing);
    let running = s.finish("e1", session, &name).unwrap();
    s.complete(&running.operation_name, ExecuteResponse::default());
    assert_eq!(op.borrow().stage, Stage::Completed);
    assert_eq!(s.stats(None).completed, 1);
}

#[tokio::test]
async fn unmatched_platform_fails_fast_only_when_executors_exist() {
    let s = Scheduler::new(SchedulerConfig::default());
    let fc = Platform::from_pairs([("workload-isolation-type", "firecracker")]);
    assert!(
        s.submit(job("q", fc.clone())).is_ok(),
        "no executors: it waits"
    );
    let _conn = s.connect(info("e1", 1), vec![], "").unwrap();
    let err = s.submit(job("r", fc)).unwrap_err();
    assert!(
        err.to_string()
            .contains("workload-isolation-type=firecracker"),
        "{err}"
    );
}

#[tokio::test]
async fn identical_actions_share_one_execution() {
    let s = Scheduler::new(SchedulerConfig::default());
    let a = s.submit(job("same", Platform::default())).unwrap();
    let b = s.submit(job("same", Platform::default())).unwrap();
    assert_eq!(a.borrow().name, b.borrow().name);
    let mut unshared = job("same", Platform::default());
    unshared.shareable = false;
    let c = s.submit(unshared).unwrap();
    assert_ne!(a.borrow().name, c.borrow().name);
}

#[tokio::test]
async fn lost_executor_requeues_then_gives_up() {
    let s = Scheduler::new(SchedulerConfig {
        max_attempts: 2,
        reconnect_grace: Duration::ZERO,
        ..Default::default()
    });
    let op = s.submit(job("a", Platform::default())).unwrap();
    let (s1, mut rx1) = s.connect(info("e1", 1), vec![], "").unwrap();
    assert!(assigned(&mut rx1).is_some());
    s.disconnect("e1", s1);
    assert_eq!(op.borrow().stage, Stage::Queued);
    let (s2, mut rx2) = s.connect(info("e2", 1), vec![], "").unwrap();
    assert!(
        assigned(&mut rx2).is_some(),
        "re-queued work goes to the next executor"
    );
    s.disconnect("e2", s2);
    let snap = op.borrow().clone();
    assert_eq!(snap.stage, Stage::Completed);
    let status = snap.response.unwrap().status.unwrap();
    assert_eq!(status.code, rpc_code::UNAVAILABLE);
}

#[tokio::test]
async fn queue_timeout_fails_waiting_actions() {
    let s = Scheduler::new(SchedulerConfig {
        queue_timeout: Duration::from_secs(1),
        ..Default::default()
    });
    let op = s.submit(job("a", Platform::default())).unwrap();
    s.sweep(Instant::now() + Duration::from_secs(2));
    let snap = op.borrow().clone();
    assert_eq!(snap.stage, Stage::Completed);
    assert!(snap
        .response
        .unwrap()
        .status
        .unwrap()
        .message
        .contains("queue timeout"));
}

#[tokio::test]
async fn capacity_is_respected() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (_, mut rx) = s.connect(info("e1", 1), vec![], "").unwrap();
    s.submit(job("a", Platform::default())).unwrap();
    s.submit(job("b", Platform::default())).unwrap();
    assert!(assigned(&mut rx).is_some());
    assert!(assigned(&mut rx).is_none(), "second waits for a free slot");
    assert_eq!(s.stats(None).queued, 1);
}

/// Connects "warm", holding a runner with the key of image `k`, and "cold".
fn warm_and_cold(
    s: &Scheduler,
    warm_capacity: u32,
    cold_capacity: u32,
) -> [mpsc::UnboundedReceiver<worker::ServerMessage>; 2] {
    let (_, warm) = s
        .connect(info("warm", warm_capacity), vec![key_of("k")], "")
        .unwrap();
    let (_, cold) = s.connect(info("cold", cold_capacity), vec![], "").unwrap();
    [warm, cold]
}

fn warm_runners(s: &Scheduler, id: &str) -> u32 {
    s.stats(None)
        .executors
        .iter()
        .find(|e| e.info.id == id)
        .map_or(0, |e| e.warm_runners)
}

#[tokio::test]
async fn recycled_job_goes_to_the_executor_holding_its_key() {
    let s = Scheduler::new(SchedulerConfig::default());
    let [mut warm, mut cold] = warm_and_cold(&s, 2, 2);
    assert_eq!(warm_runners(&s, "warm"), 1);
    s.submit(recycled("a", "k")).unwrap();
    assert!(assigned(&mut warm).is_some(), "the warm executor gets it");
    assert!(assigned(&mut cold).is_none());
    assert_eq!(warm_runners(&s, "warm"), 0, "its runner counts as taken");
    s.submit(recycled("b", "k")).unwrap();
    assert!(
        assigned(&mut cold).is_some(),
        "a second job with the key does not pile onto the taken runner"
    );
}

#[tokio::test]
async fn other_jobs_keep_the_most_free_slots_rule() {
    let s = Scheduler::new(SchedulerConfig::default());
    let [mut warm, mut cold] = warm_and_cold(&s, 1, 4);
    let plain = Platform::from_pairs([("container-image", "k")]);
    s.submit(job("plain", plain)).unwrap();
    assert!(
        assigned(&mut cold).is_some(),
        "no recycle-runner: no affinity"
    );
    s.submit(recycled("other", "other")).unwrap();
    assert!(assigned(&mut cold).is_some(), "another key: no affinity");
    assert!(assigned(&mut warm).is_none());
    assert_eq!(warm_runners(&s, "warm"), 1);
    s.submit(recycled("a", "k")).unwrap();
    assert!(
        assigned(&mut warm).is_some(),
        "the warm one wins with fewer slots"
    );
}

#[tokio::test]
async fn recycled_job_does_not_wait_for_a_full_warm_executor() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (_, mut warm) = s.connect(info("warm", 1), vec![key_of("k")], "").unwrap();
    s.submit(job("busy", Platform::default())).unwrap();
    assert!(assigned(&mut warm).is_some());
    let (_, mut cold) = s.connect(info("cold", 1), vec![], "").unwrap();
    s.submit(recycled("a", "k")).unwrap();
    assert!(assigned(&mut cold).is_some(), "goes elsewhere at once");
    assert_eq!(s.stats(None).queued, 0);
}

#[tokio::test]
async fn a_report_replaces_the_warm_keys() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (s1, mut e1) = s.connect(info("e1", 1), vec![key_of("a")], "").unwrap();
    let (s2, mut e2) = s.connect(info("e2", 3), vec![], "").unwrap();
    s.report_warm("e1", s1, vec![key_of("b"), key_of("b")]);
    s.report_warm("e2", s2 + 1, vec![key_of("a")]);
    assert_eq!(warm_runners(&s, "e1"), 2);
    assert_eq!(
        warm_runners(&s, "e2"),
        0,
        "a stale session's report is ignored"
    );
    s.submit(recycled("a", "a")).unwrap();
    assert!(assigned(&mut e2).is_some(), "e1 no longer holds key a");
    s.submit(recycled("b", "b")).unwrap();
    assert!(assigned(&mut e1).is_some(), "e1 holds key b now");
    assert_eq!(
        warm_runners(&s, "e1"),
        1,
        "one of its two b runners is left"
    );
}

/// The attack: a second session says hello with a live executor's id to
/// take its place (and its work). Only the key that holds the id may.
#[tokio::test]
async fn a_live_executor_id_cannot_be_taken_over_by_another_key() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (_, mut rx) = s.connect(info("e1", 1), vec![], "key-a").unwrap();
    let op = s.submit(job("a", Platform::default())).unwrap();
    assert!(assigned(&mut rx).is_some());
    let err = s.connect(info("e1", 64), vec![], "key-b").unwrap_err();
    assert!(err.to_string().contains("\"e1\""), "{err}");
    assert_eq!(op.borrow().stage, Stage::Executing, "the work stays put");
    assert_eq!(s.stats(None).executors[0].info.capacity, 1);
    // The holder itself may reconnect (a network blip).
    s.connect(info("e1", 1), vec![], "key-a").unwrap();
}

#[tokio::test]
async fn operations_are_seen_and_cancelled_only_by_their_tenant() {
    let s = Scheduler::new(SchedulerConfig::default());
    let mut j = job("a", Platform::default());
    j.tenant = "team-a".into();
    let name = s.submit(j).unwrap().borrow().name.clone();
    assert!(s.subscribe(&name, Some("team-b")).is_none());
    assert!(!s.cancel(&name, Some("team-b")));
    assert_eq!(s.stats(Some("team-b")).queued, 0);
    assert_eq!(s.stats(Some("team-a")).queued, 1);
    assert!(s.subscribe(&name, Some("team-a")).is_some());
    assert!(s.subscribe(&name, None).is_some(), "an admin sees it");
    assert!(s.cancel(&name, Some("team-a")));
}

#[tokio::test]
async fn identical_actions_of_two_tenants_do_not_share_one_run() {
    let s = Scheduler::new(SchedulerConfig::default());
    let mut a = job("same", Platform::default());
    a.tenant = "team-a".into();
    let mut b = job("same", Platform::default());
    b.tenant = "team-b".into();
    let (a, b) = (s.submit(a).unwrap(), s.submit(b).unwrap());
    assert_ne!(a.borrow().name, b.borrow().name);
}

/// Cancelling a running action keeps its slot until the executor confirms
/// the action is gone; that confirmation dispatches the next job at once.
#[tokio::test]
async fn a_cancelled_slot_is_freed_by_the_executors_confirmation_and_dispatches() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (session, mut rx) = s.connect(info("e1", 1), vec![], "").unwrap();
    let first = s.submit(job("a", Platform::default())).unwrap();
    let name = assigned(&mut rx).expect("the first job runs");
    let second = s.submit(job("b", Platform::default())).unwrap();
    assert!(s.cancel(&name, None));
    assert_eq!(first.borrow().stage, Stage::Completed);
    assert!(
        assigned(&mut rx).is_none(),
        "the cancelled action may still be running"
    );
    assert_eq!(second.borrow().stage, Stage::Queued);
    assert!(s.finish("e1", session, &name).is_none(), "it already ended");
    let next = assigned(&mut rx).expect("the confirmation dispatched the next job");
    assert_eq!(next, second.borrow().name);
    assert_eq!(second.borrow().stage, Stage::Executing);
}

/// A job re-queued after its executor died counts the queue timeout from
/// the re-queue, not from its first enqueue.
#[tokio::test]
async fn a_requeued_job_gets_a_fresh_queue_timeout() {
    let s = Scheduler::new(SchedulerConfig {
        queue_timeout: Duration::from_millis(200),
        reconnect_grace: Duration::ZERO,
        ..SchedulerConfig::default()
    });
    let (session, mut rx) = s.connect(info("e1", 1), vec![], "").unwrap();
    let op = s.submit(job("a", Platform::default())).unwrap();
    assert!(assigned(&mut rx).is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.disconnect("e1", session);
    assert_eq!(op.borrow().stage, Stage::Queued);
    s.sweep(Instant::now());
    assert_eq!(
        op.borrow().stage,
        Stage::Queued,
        "not failed as a queue timeout"
    );
    s.sweep(Instant::now() + Duration::from_millis(300));
    assert_eq!(
        op.borrow().stage,
        Stage::Completed,
        "the new enqueue times out"
    );
}

/// An executor that refuses an assignment as over its capacity gets the
/// job taken back (queued first, the attempt not counted) and nothing more
/// until one of its actions ends; another executor may take it meanwhile.
#[tokio::test]
async fn a_refused_assignment_is_requeued_and_the_executor_left_alone() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (s1, mut e1) = s.connect(info("e1", 2), vec![], "").unwrap();
    let a = s.submit(job("a", Platform::default())).unwrap();
    let b = s.submit(job("b", Platform::default())).unwrap();
    let first = assigned(&mut e1).unwrap();
    let second = assigned(&mut e1).unwrap();
    s.refused("e1", s1, &second);
    assert_eq!(s.stats(None).queued, 1);
    assert!(assigned(&mut e1).is_none(), "not sent straight back");
    let (_, mut e2) = s.connect(info("e2", 1), vec![], "").unwrap();
    assert_eq!(assigned(&mut e2).as_deref(), Some(second.as_str()));
    let _ = (a, b);
    // Once e1 finishes something, it takes work again.
    let c = s.submit(job("c", Platform::default())).unwrap();
    assert!(assigned(&mut e1).is_none());
    s.finish("e1", s1, &first);
    assert_eq!(assigned(&mut e1).as_deref(), Some(c.borrow().name.as_str()));
}

/// Bazel interrupted: its Execute stream is gone, nobody watches the
/// operation. After a short while it is cancelled on its executor and
/// forgotten (a client coming back gets NOT_FOUND and executes again).
#[tokio::test]
async fn an_operation_nobody_watches_is_abandoned_and_its_executor_told() {
    let s = Scheduler::new(SchedulerConfig {
        abandon_unwatched: Duration::from_secs(3),
        ..SchedulerConfig::default()
    });
    let (session, mut rx) = s.connect(info("e1", 1), vec![], "").unwrap();
    let watched = s.submit(job("kept", Platform::default())).unwrap();
    let kept = assigned(&mut rx).unwrap();
    s.finish("e1", session, &kept);
    let name = {
        let op = s.submit(job("dropped", Platform::default())).unwrap();
        let name = op.borrow().name.clone();
        name
    };
    assert_eq!(assigned(&mut rx).as_deref(), Some(name.as_str()));
    let now = Instant::now();
    s.sweep(now);
    s.sweep(now + Duration::from_secs(2));
    assert!(s.subscribe(&name, None).is_some(), "not yet");
    s.sweep(now + Duration::from_secs(4));
    assert!(s.subscribe(&name, None).is_none(), "forgotten");
    match rx.try_recv().unwrap().kind.unwrap() {
        server_message::Kind::Cancel(c) => assert_eq!(c.operation_name, name),
        other => panic!("expected a cancel: {other:?}"),
    }
    assert_eq!(s.stats(None).executors[0].running, 1, "until it confirms");
    assert!(s.subscribe(&watched.borrow().name, None).is_some());
}
