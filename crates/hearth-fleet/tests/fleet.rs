//! Two replicas in one process, each its own scheduler with executors
//! connected straight to it, sharing one real `redis-server`.

use std::sync::Arc;
use std::time::Duration;

use hearth_fleet::{FleetConfig, SharedQueue};
use hearth_proto::reapi::{self, Action, Command};
use hearth_proto::worker::{server_message, ServerMessage};
use hearth_scheduler::{
    Assignments, ExecutorInfo, Job, JobQueue, OpSnapshot, Platform, Scheduler, SchedulerConfig,
    Stage, SubmitError,
};
use hearth_storage::Digest;
use hearth_testkit::Redis;
use prost::Message;
use redis::AsyncCommands;
use tokio::sync::watch;

fn config(lease_ms: u64) -> FleetConfig {
    FleetConfig {
        lease: Duration::from_millis(lease_ms),
        abandon_unwatched: Duration::from_secs(1),
        ..Default::default()
    }
}

async fn replica(redis: &Redis, config: FleetConfig) -> (Arc<Scheduler>, SharedQueue) {
    replica_with(redis, config, SchedulerConfig::default()).await
}

async fn replica_with(
    redis: &Redis,
    config: FleetConfig,
    scheduler: SchedulerConfig,
) -> (Arc<Scheduler>, SharedQueue) {
    let scheduler = Scheduler::new(scheduler);
    let queue = SharedQueue::start(&redis.url, scheduler.clone(), config)
        .await
        .expect("connecting to Redis");
    (scheduler, queue)
}

fn info(id: &str) -> ExecutorInfo {
    ExecutorInfo {
        id: id.into(),
        description: String::new(),
        properties: Default::default(),
        isolation_types: vec!["none".into()],
        capacity: 1,
        vm_unavailable: String::new(),
    }
}

/// A job for `script` with the platform `pairs`.
fn job(script: &str, pairs: &[(&str, &str)]) -> Job {
    let platform = reapi::Platform {
        properties: pairs
            .iter()
            .map(|(n, v)| reapi::platform::Property {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
    };
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let command_bytes = command.encode_to_vec();
    let action = Action {
        command_digest: Some(Digest::of(&command_bytes).to_proto()),
        platform: Some(platform.clone()),
        ..Default::default()
    };
    let action_bytes = action.encode_to_vec();
    Job {
        tenant: String::new(),
        instance_name: String::new(),
        action_digest: Digest::of(&action_bytes),
        platform: Platform::from_protos(None, Some(&platform)).expect("platform"),
        action: action_bytes,
        command: command_bytes,
        do_not_cache: false,
        shareable: true,
        pins: None,
    }
}

/// The next message to an executor, within 10 s.
async fn next(rx: &mut Assignments) -> server_message::Kind {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message within 10 s")
        .and_then(|m: ServerMessage| m.kind)
        .expect("a message")
}

async fn assigned(rx: &mut Assignments) -> String {
    match next(rx).await {
        server_message::Kind::Assign(a) => a.operation_name,
        other => panic!("expected an assignment, got {other:?}"),
    }
}

/// The operation an executor is told to cancel next.
async fn cancelled(rx: &mut Assignments) -> String {
    match next(rx).await {
        server_message::Kind::Cancel(c) => c.operation_name,
        other => panic!("expected a cancel, got {other:?}"),
    }
}

/// A plain connection to the test's Redis, to change its state behind the
/// replicas' backs.
async fn raw(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url.as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connection")
}

async fn until(rx: &mut watch::Receiver<OpSnapshot>, stage: Stage) -> OpSnapshot {
    tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|s| s.stage == stage))
        .await
        .unwrap_or_else(|_| panic!("stage {stage:?} within 15 s"))
        .expect("the operation")
        .clone()
}

/// The executor `executor` (of session `session`) reports `name` done,
/// exit code 0.
fn succeed(s: &Scheduler, executor: &str, session: u64, name: &str) {
    let running = s
        .finish(executor, session, name)
        .expect("the executor's job");
    s.complete(&running.operation_name, ok());
}

/// Waits for the operation to complete with the result [`succeed`] gives.
async fn succeeded(rx: &mut watch::Receiver<OpSnapshot>) {
    let done = until(rx, Stage::Completed).await;
    assert_eq!(done.response.expect("response").result, ok().result);
}

fn ok() -> reapi::ExecuteResponse {
    reapi::ExecuteResponse {
        result: Some(reapi::ActionResult {
            exit_code: 0,
            ..Default::default()
        }),
        status: Some(Default::default()),
        ..Default::default()
    }
}

#[tokio::test]
async fn work_sent_to_a_replica_without_executors_runs_on_another_and_completes_for_all() {
    let redis = Redis::start();
    let (_, a) = replica(&redis, config(10_000)).await;
    let (sb, b) = replica(&redis, config(10_000)).await;
    let (_, mut exec_b) = sb.connect(info("on-b"), vec![], "").expect("connect");

    let mut rx = a.submit(job("true", &[])).await.expect("submit on A");
    let name = rx.borrow().name.clone();
    assert_eq!(assigned(&mut exec_b).await, name, "B's executor got it");
    until(&mut rx, Stage::Executing).await;
    // Watched from B too, by name.
    let mut on_b = b
        .subscribe(&name, None)
        .await
        .expect("Redis")
        .expect("known on B");
    assert!(b
        .subscribe(&name, Some("another tenant"))
        .await
        .expect("Redis")
        .is_none());

    succeed(&sb, "on-b", 1, &name);
    for w in [&mut rx, &mut on_b] {
        succeeded(w).await;
    }
    // Completed operations stay visible for the retention period.
    let later = a
        .subscribe(&name, None)
        .await
        .expect("Redis")
        .expect("retained");
    assert_eq!(later.borrow().stage, Stage::Completed);
}

#[tokio::test]
async fn a_replica_that_stops_renewing_loses_its_work_to_another() {
    let redis = Redis::start();
    let (sa, a) = replica(&redis, config(1_000)).await;
    let (sb, b) = replica(&redis, config(1_000)).await;
    let (_, mut exec_b) = sb.connect(info("on-b"), vec![], "").expect("connect");
    let mut rx = a.submit(job("sleep 100", &[])).await.expect("submit on A");
    let name = assigned(&mut exec_b).await;

    // B dies (its tasks stop; its executor never reports).
    b.stop();
    let (_, mut exec_a) = sa.connect(info("on-a"), vec![], "").expect("connect");
    assert_eq!(
        assigned(&mut exec_a).await,
        name,
        "the lapsed lease put it back and A took it"
    );
    succeed(&sa, "on-a", 1, &name);
    succeeded(&mut rx).await;
}

#[tokio::test]
async fn an_executor_moving_replicas_keeps_its_running_action() {
    let redis = Redis::start();
    let (sa, a) = replica(&redis, config(10_000)).await;
    let (sb, _b) = replica(&redis, config(10_000)).await;
    let (session, mut exec_b) = sb.connect(info("roamer"), vec![], "").expect("connect");
    let mut rx = a.submit(job("sleep 100", &[])).await.expect("submit");
    let name = assigned(&mut exec_b).await;
    // Seen executing on A: B has recorded which executor runs it.
    until(&mut rx, Stage::Executing).await;
    sb.disconnect("roamer", session);

    // It comes to A still running it: A takes it over, sends it nothing new
    // and no cancel, and its finish completes the operation.
    let (session_a, mut exec_a) = a
        .connect_executor(info("roamer"), vec![], std::slice::from_ref(&name), "")
        .await
        .expect("connect to A");
    assert!(sa.runs(&name), "A adopted it");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), exec_a.recv())
            .await
            .is_err(),
        "nothing sent to the executor"
    );
    succeed(&sa, "roamer", session_a, &name);
    until(&mut rx, Stage::Completed).await;
    // B's lease is gone: B no longer runs it after its grace period.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!sb.runs(&name), "B let it go");
}

#[tokio::test]
async fn work_nobody_watches_any_more_is_cancelled_on_the_replica_running_it() {
    let redis = Redis::start();
    let (_, a) = replica(&redis, config(1_000)).await;
    let (sb, _b) = replica(&redis, config(1_000)).await;
    let (_, mut exec_b) = sb.connect(info("on-b"), vec![], "").expect("connect");
    let rx = a.submit(job("sleep 100", &[])).await.expect("submit");
    let name = assigned(&mut exec_b).await;
    drop(rx);
    assert_eq!(cancelled(&mut exec_b).await, name);
}

#[tokio::test]
async fn a_client_cancels_through_a_replica_that_does_not_run_it() {
    let redis = Redis::start();
    let (_, a) = replica(&redis, config(10_000)).await;
    let (sb, _b) = replica(&redis, config(10_000)).await;
    let (_, mut exec_b) = sb.connect(info("on-b"), vec![], "").expect("connect");
    let mut rx = a.submit(job("sleep 100", &[])).await.expect("submit");
    let name = assigned(&mut exec_b).await;
    assert!(!a.cancel(&name, Some("someone else")).await.expect("Redis"));
    assert!(a.cancel(&name, None).await.expect("Redis"));
    assert_eq!(cancelled(&mut exec_b).await, name);
    let done = until(&mut rx, Stage::Completed).await;
    assert_eq!(
        done.response
            .expect("response")
            .status
            .expect("status")
            .code,
        1
    );

    // A queued one is cancelled in the queue itself.
    let mut queued = a.submit(job("queued", &[])).await.expect("submit");
    let name = queued.borrow().name.clone();
    assert!(a.cancel(&name, None).await.expect("Redis"));
    until(&mut queued, Stage::Completed).await;
}

#[tokio::test]
async fn work_waiting_too_long_fails_and_malformed_work_does_not_stall_the_queue() {
    let redis = Redis::start();
    let cfg = FleetConfig {
        queue_timeout: Duration::from_secs(1),
        ..config(1_000)
    };
    let (sa, a) = replica(&redis, cfg).await;
    let mut rx = a.submit(job("never", &[])).await.expect("submit");
    let done = until(&mut rx, Stage::Completed).await;
    let status = done.response.expect("response").status.expect("status");
    assert_eq!(status.code, 14, "UNAVAILABLE: {status:?}");
    assert!(status.message.contains("queue timeout"), "{status:?}");

    // Garbage in the queue (a hostile or broken writer) is dropped; the
    // job behind it runs.
    let mut conn = raw(&redis).await;
    let _: () = conn
        .set("hearth:job:operations/garbage", b"\xff\xff\xff".as_slice())
        .await
        .expect("SET");
    let _: () = conn
        .zadd("hearth:queue", "operations/garbage", 0)
        .await
        .expect("ZADD");
    let mut rx = a.submit(job("after garbage", &[])).await.expect("submit");
    let (_, mut exec_a) = sa.connect(info("on-a"), vec![], "").expect("connect");
    assert_eq!(assigned(&mut exec_a).await, rx.borrow_and_update().name);
    let left: Vec<String> = conn.zrange("hearth:queue", 0, -1).await.expect("ZRANGE");
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn the_fleet_refuses_what_no_executor_anywhere_can_run_and_honours_warm_runners_elsewhere() {
    let redis = Redis::start();
    let (sa, a) = replica(&redis, config(10_000)).await;
    let (sb, _b) = replica(&redis, config(10_000)).await;
    let warm_job = job("warm", &[("recycle-runner", "true")]);
    let key = hearth_scheduler::affinity_key("", "", &warm_job.platform);
    let (_, mut cold_a) = sa.connect(info("cold-on-a"), vec![], "").expect("connect");
    let (_, mut warm_b) = sb
        .connect(info("warm-on-b"), vec![key], "")
        .expect("connect");
    // Adverts go round every second (a loaded machine may be late).
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let err = a
        .submit(job("gpu", &[("Pool", "gpu")]))
        .await
        .expect_err("no executor has that pool");
    assert!(matches!(err, SubmitError::NoMatchingExecutor(_)), "{err:?}");

    let rx = a.submit(warm_job).await.expect("submit on A");
    assert_eq!(
        assigned(&mut warm_b).await,
        rx.borrow().name,
        "the warm runner on B got it, not A's idle cold executor"
    );
    assert!(cold_a.try_recv().is_err());
}

#[tokio::test]
async fn work_whose_executor_went_away_goes_back_to_the_shared_queue_not_a_local_one() {
    let redis = Redis::start();
    let (sa, a) = replica(&redis, config(10_000)).await;
    let no_grace = SchedulerConfig {
        reconnect_grace: Duration::ZERO,
        ..Default::default()
    };
    let (sb, _b) = replica_with(&redis, config(10_000), no_grace).await;
    let (session, mut exec_b) = sb.connect(info("on-b"), vec![], "").expect("connect");
    let mut rx = a.submit(job("sleep 100", &[])).await.expect("submit");
    let name = assigned(&mut exec_b).await;
    // B's only executor goes for good; A has one free.
    let (_, mut exec_a) = sa.connect(info("on-a"), vec![], "").expect("connect");
    sb.disconnect("on-b", session);
    assert_eq!(assigned(&mut exec_a).await, name, "A runs it now");
    assert!(!sb.runs(&name), "B no longer holds it");
    succeed(&sa, "on-a", 1, &name);
    until(&mut rx, Stage::Completed).await;
}

#[tokio::test]
async fn an_executor_cannot_take_over_work_it_does_not_run_by_naming_it() {
    let redis = Redis::start();
    let (sa, a) = replica(&redis, config(10_000)).await;
    let (sb, _b) = replica(&redis, config(10_000)).await;
    let (_, mut exec_b) = sb
        .connect(info("on-b"), vec![], "team-key")
        .expect("connect");
    let mut rx = a.submit(job("sleep 100", &[])).await.expect("submit");
    let name = assigned(&mut exec_b).await;
    // Seen executing on A: B has recorded which executor runs it.
    until(&mut rx, Stage::Executing).await;

    // Another executor, and one borrowing B's executor's id under another
    // key, each claim to run it on A.
    for (id, owner) in [("thief", "team-key"), ("on-b", "other-key")] {
        let (_, mut thief) = a
            .connect_executor(info(id), vec![], std::slice::from_ref(&name), owner)
            .await
            .expect("connect to A");
        assert!(!sa.runs(&name), "{owner}/{id} took it over");
        assert_eq!(cancelled(&mut thief).await, name);
    }
    // B still runs it, and its result is the one that counts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(sb.runs(&name), "B lost it");
    succeed(&sb, "on-b", 1, &name);
    succeeded(&mut rx).await;
}

#[tokio::test]
async fn a_job_behind_many_no_free_executor_fits_is_still_claimed() {
    let redis = Redis::start();
    let (sa, a) = replica(&redis, config(10_000)).await;
    let (_, b) = replica(&redis, config(10_000)).await;
    let gpu = ExecutorInfo {
        properties: [("pool".to_string(), "gpu".to_string())].into(),
        ..info("gpu-on-a")
    };
    let (_, mut gpu_a) = sa.connect(gpu, vec![], "").expect("connect");
    let mut waiting = vec![];
    for i in 0..70 {
        let rx = a
            .submit(job(&format!("gpu {i}"), &[("Pool", "gpu")]))
            .await
            .expect("submit");
        waiting.push(rx);
    }
    assigned(&mut gpu_a).await;
    // 69 GPU jobs wait in front of it; B's host executor is free.
    let (_, mut host_b) = b
        .connect_executor(info("host-on-b"), vec![], &[], "")
        .await
        .expect("connect");
    // Advertised at once: A accepts the job it could not place a moment ago.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rx = a.submit(job("host", &[])).await.expect("submit");
    assert_eq!(assigned(&mut host_b).await, rx.borrow().name);
}

#[tokio::test]
async fn a_queued_job_whose_client_left_is_cancelled_not_run() {
    let redis = Redis::start();
    let (_, a) = replica(&redis, config(10_000)).await;
    let (sb, b) = replica(&redis, config(10_000)).await;
    let rx = a.submit(job("left behind", &[])).await.expect("submit");
    let name = rx.borrow().name.clone();
    drop(rx);
    // Its watch lapses (abandonment 1 s + 2 s).
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (_, mut exec_b) = sb.connect(info("on-b"), vec![], "").expect("connect");
    let mut op = b
        .subscribe(&name, None)
        .await
        .expect("Redis")
        .expect("known");
    let done = until(&mut op, Stage::Completed).await;
    assert_eq!(
        done.response
            .expect("response")
            .status
            .expect("status")
            .code,
        1
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), exec_b.recv())
            .await
            .is_err(),
        "it was not sent to the executor"
    );
}

#[tokio::test]
async fn watchers_are_told_when_redis_loses_the_operation() {
    let redis = Redis::start();
    let (_, a) = replica(&redis, config(10_000)).await;
    let mut rx = a.submit(job("forgotten", &[])).await.expect("submit");
    let mut conn = raw(&redis).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    let done = until(&mut rx, Stage::Completed).await;
    let status = done.response.expect("response").status.expect("status");
    assert_eq!(status.code, 14, "{status:?}");
    assert!(
        status.message.contains("gone from the shared state"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_cancel_whose_message_was_lost_still_reaches_the_replica_running_it() {
    let redis = Redis::start();
    let (_, a) = replica(&redis, config(2_000)).await;
    let (sb, _b) = replica(&redis, config(2_000)).await;
    let (_, mut exec_b) = sb.connect(info("on-b"), vec![], "").expect("connect");
    let mut rx = a.submit(job("sleep 100", &[])).await.expect("submit");
    let name = assigned(&mut exec_b).await;
    // The cancel's record, without its message (as if B's subscription was
    // down when it was published).
    let mut conn = raw(&redis).await;
    let _: () = conn
        .set(format!("hearth:cancel:{name}"), 1)
        .await
        .expect("SET");
    assert_eq!(cancelled(&mut exec_b).await, name);
    let done = until(&mut rx, Stage::Completed).await;
    assert_eq!(
        done.response
            .expect("response")
            .status
            .expect("status")
            .code,
        1
    );
}
