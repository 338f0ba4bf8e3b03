//! Unit tests of the queue and dispatch.

use super::*;

fn job(tag: &str, platform: Platform) -> Job {
    Job {
        instance_name: String::new(),
        action_digest: Digest::of(tag.as_bytes()),
        action: vec![],
        command: vec![],
        platform,
        do_not_cache: false,
        shareable: true,
        pins: None,
    }
}

fn info(id: &str, capacity: u32) -> ExecutorInfo {
    ExecutorInfo {
        id: id.into(),
        description: String::new(),
        properties: Default::default(),
        isolation_types: vec!["none".into()],
        capacity,
    }
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
    let (session, mut rx) = s.connect(info("e1", 1));
    let name = assigned(&mut rx).expect("assignment");
    assert_eq!(op.borrow().stage, Stage::Executing);
    let running = s.finish("e1", session, &name).unwrap();
    s.complete(&running.operation_name, ExecuteResponse::default());
    assert_eq!(op.borrow().stage, Stage::Completed);
    assert_eq!(s.stats().completed, 1);
}

#[tokio::test]
async fn unmatched_platform_fails_fast_only_when_executors_exist() {
    let s = Scheduler::new(SchedulerConfig::default());
    let fc = Platform::from_pairs([("workload-isolation-type", "firecracker")]);
    assert!(
        s.submit(job("q", fc.clone())).is_ok(),
        "no executors: it waits"
    );
    let _conn = s.connect(info("e1", 1));
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
        ..Default::default()
    });
    let op = s.submit(job("a", Platform::default())).unwrap();
    let (s1, mut rx1) = s.connect(info("e1", 1));
    assert!(assigned(&mut rx1).is_some());
    s.disconnect("e1", s1);
    assert_eq!(op.borrow().stage, Stage::Queued);
    let (s2, mut rx2) = s.connect(info("e2", 1));
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
    let (_, mut rx) = s.connect(info("e1", 1));
    s.submit(job("a", Platform::default())).unwrap();
    s.submit(job("b", Platform::default())).unwrap();
    assert!(assigned(&mut rx).is_some());
    assert!(assigned(&mut rx).is_none(), "second waits for a free slot");
    assert_eq!(s.stats().queued, 1);
}
