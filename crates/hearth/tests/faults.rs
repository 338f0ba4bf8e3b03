//! Faults with real processes: an executor's connection cut in the middle
//! of an action (it reconnects and keeps the action), and an executor
//! killed with SIGKILL and started again under its id (the action runs once
//! more, at once, not after the grace period).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::remote::{executor, executor_at, status, wait_for};
use common::*;
use hearth_proto::reapi::ExecuteResponse;
use hearth_proto::worker::Attempt;
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy to `upstream` whose connections can all be cut at once, as
/// a network blip would.
struct Proxy {
    addr: String,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = format!("http://{}", listener.local_addr().expect("address"));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let conns = conns.clone();
            async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    let conn = tokio::spawn(async move {
                        if let Ok(mut up) = TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                    conns.lock().expect("lock").push(conn);
                }
            }
        });
        Proxy {
            addr,
            conns,
            _accept: accept,
        }
    }

    /// Drops every connection open now; new ones are accepted again.
    fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.conns.lock().expect("lock"));
        let n = conns.iter().filter(|c| !c.is_finished()).count();
        for c in conns {
            c.abort();
        }
        n
    }
}

/// The attempt that produced a result, from its metadata.
fn attempt_of(resp: &ExecuteResponse) -> Attempt {
    let meta = resp
        .result
        .as_ref()
        .and_then(|r| r.execution_metadata.as_ref())
        .expect("execution metadata");
    let any = meta
        .auxiliary_metadata
        .iter()
        .find(|a| a.type_url == hearth_proto::ATTEMPT_TYPE_URL)
        .expect("an Attempt in the auxiliary metadata");
    Attempt::decode(any.value.as_slice()).expect("an Attempt")
}

async fn start_action(c: &Channel, script: &str) -> JoinHandle<ExecuteResponse> {
    let mut spec = ActionSpec::new(script);
    spec.outputs = vec!["out.txt"];
    let action = make_action(c, &spec).await;
    tokio::spawn({
        let c = c.clone();
        async move { execute(&c, action, false).await.expect("execute").1 }
    })
}

/// The action's response, which must come within `limit` (else `why`
/// failed) with exit code 0.
async fn succeeds_within(
    limit: Duration,
    run: JoinHandle<ExecuteResponse>,
    why: &str,
) -> ExecuteResponse {
    let resp = tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("{why}: no answer within {limit:?}"))
        .expect("the client");
    assert_eq!(
        resp.result.as_ref().map(|r| r.exit_code),
        Some(0),
        "{:?}",
        resp.status
    );
    resp
}

#[tokio::test]
async fn a_network_blip_keeps_the_running_action() {
    let h = server(&["--executor-grace-secs", "30"]);
    let c = channel(&h).await;
    let proxy = Proxy::start(&h.addr).await;
    let _e = executor_at(&h, &proxy.addr, "blipped");
    wait_for(&c, "the executor", |s| s.executors.len() == 1).await;
    let run = start_action(&c, "sleep 4; echo once > out.txt").await;
    wait_for(&c, "the action to start", |s| s.running_actions == 1).await;
    let started = Instant::now();
    assert!(proxy.cut() > 0, "the executor's connection was cut");
    let resp = run.await.expect("the client");
    let r = resp.result.as_ref().expect("a result");
    assert_eq!(r.exit_code, 0, "{:?}", resp.status);
    assert_eq!(
        attempt_of(&resp),
        Attempt {
            number: 1,
            executor_id: "blipped".into()
        },
        "the first run's result, not a second run's"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not waiting out the grace period: {:?}",
        started.elapsed()
    );
    let s = status(&c).await;
    assert_eq!(s.requeued_actions, 0, "never re-queued: {s:?}");
    assert_eq!(s.executors.len(), 1);
    assert!(!s.executors[0].reconnecting, "{s:?}");
    assert_eq!(
        read_blob(&c, r.output_files[0].digest.as_ref().expect("digest")).await,
        &b"once\n"[..]
    );
}

#[tokio::test]
async fn a_killed_executor_started_again_under_its_id_reruns_the_action_at_once() {
    // A grace period far longer than the test: the restart is what
    // re-queues the action, by holding nothing in its Hello.
    let h = server(&["--executor-grace-secs", "300"]);
    let c = channel(&h).await;
    let mut first = executor(&h, "phoenix");
    wait_for(&c, "the executor", |s| s.executors.len() == 1).await;
    let run = start_action(&c, "sleep 2; echo done > out.txt").await;
    wait_for(&c, "the action to start", |s| s.running_actions == 1).await;
    first.0.kill().expect("kill -9");
    let _ = first.0.wait();
    wait_for(&c, "the server to notice", |s| {
        s.executors.iter().all(|e| e.reconnecting)
    })
    .await;
    let started = Instant::now();
    let _second = executor(&h, "phoenix");
    let resp = succeeds_within(
        Duration::from_secs(60),
        run,
        "the action ends well before the grace period",
    )
    .await;
    assert_eq!(attempt_of(&resp).number, 2, "run once more, no more");
    let s = status(&c).await;
    assert_eq!(s.requeued_actions, 1, "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test]
async fn an_executor_stopped_gracefully_hands_its_action_back_at_once() {
    let h = server(&["--executor-grace-secs", "300"]);
    let c = channel(&h).await;
    let mut leaving = executor(&h, "leaving");
    wait_for(&c, "the executor", |s| s.executors.len() == 1).await;
    let run = start_action(&c, "sleep 3; echo done > out.txt").await;
    wait_for(&c, "the action to start", |s| s.running_actions == 1).await;
    let _staying = executor(&h, "staying");
    wait_for(&c, "the second executor", |s| s.executors.len() == 2).await;
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &leaving.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let _ = leaving.0.wait();
    let resp = succeeds_within(
        Duration::from_secs(60),
        run,
        "re-queued at once, not after the grace period",
    )
    .await;
    assert_eq!(
        attempt_of(&resp),
        Attempt {
            number: 2,
            executor_id: "staying".into()
        }
    );
}

/// The attack: an executor key says hello holding a hundred thousand
/// made-up operations, to make the server track them all. Refused, naming
/// the bound.
#[tokio::test]
async fn a_hello_holding_more_than_capacity_allows_is_refused() {
    let h = server(&[]);
    let c = channel(&h).await;
    let made_up: Vec<String> = (0..100_000).map(|i| format!("operations/{i}")).collect();
    let err = common::worker::FakeExecutor::try_hello(&c, "liar", vec![], &[], made_up)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains(
            "hello lists 100000 running operations; an executor of capacity 2 holds at most 12"
        ),
        "{}",
        err.message()
    );
    assert!(status(&c).await.executors.is_empty());
}
