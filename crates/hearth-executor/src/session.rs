//! Keeps an executor connected to the scheduler: hello, receive assignments,
//! run them concurrently, report results and, every few seconds, what runs;
//! reconnect with backoff when the stream breaks. Actions outlive a broken
//! session: the next one's Hello lists them, and the server reconciles.

use std::sync::Arc;
use std::time::Duration;

use crate::client::{ServerChannel, Servers};
use hearth_proto::worker::{
    server_message, worker_message, worker_service_client::WorkerServiceClient, Finished, Hello,
    Property, ServerMessage, WorkerMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::tracker::{Refusal, Tracker};
use crate::Executor;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub properties: Vec<(String, String)>,
    pub capacity: u32,
    pub description: String,
    /// Why microVMs are not offered (see `Hello.vm_unavailable`); empty
    /// when they are.
    pub vm_unavailable: String,
    /// How often it tells the server what it runs (also a sign of life:
    /// keep it well under the server's executor silence limit).
    pub report_interval: Duration,
}

/// How often executors report what they run by default.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// How long a shutting-down executor waits for the server to take in that
/// it holds nothing any more.
const FAREWELL_WAIT: Duration = Duration::from_secs(2);

/// Runs sessions until `shutdown` fires. A session that broke is taken up
/// again with the same server; a server that cannot be reached is left for
/// the next of `servers` (replicas of one service), so an executor outlives
/// the replica it was connected to.
pub async fn run(
    executor: Arc<Executor>,
    config: SessionConfig,
    channel: ServerChannel,
    servers: Servers,
    shutdown: CancellationToken,
) {
    let tracker = Arc::new(Tracker::new(shutdown.clone()));
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        let mut connected = false;
        let server = servers.current().to_string();
        match one_session(
            &executor,
            &config,
            channel.clone(),
            &tracker,
            &shutdown,
            &mut connected,
        )
        .await
        {
            Ok(()) => tracing::info!(server, "session with the server ended"),
            Err(e) => {
                tracing::warn!(server, error = %e, running = tracker.running(), "session with the server failed; running actions go on")
            }
        }
        tracker.detach();
        if shutdown.is_cancelled() {
            return;
        }
        if !connected && servers.len() > 1 {
            // The backoff keeps growing: with every replica down, the
            // executor must not spin through them.
            let next = servers.fail_over();
            tracing::warn!(
                from = server,
                to = next,
                "cannot reach the server; trying the next one"
            );
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn one_session(
    executor: &Arc<Executor>,
    config: &SessionConfig,
    channel: ServerChannel,
    tracker: &Arc<Tracker>,
    shutdown: &CancellationToken,
    connected: &mut bool,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = tracker.hello(Hello {
        executor_id: executor.id().to_string(),
        properties: config
            .properties
            .iter()
            .map(|(name, value)| Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        isolation_types: executor.isolation_types(),
        capacity: config.capacity,
        description: config.description.clone(),
        running_operations: vec![],
        warm_keys: executor.warm_keys(),
        vm_unavailable: config.vm_unavailable.clone(),
    });
    let _ = tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Hello(hello)),
    });
    let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut inbound = client
        .session(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    *connected = true;
    tracing::info!(holding = tracker.running(), "connected to the server");
    tracker.attach(tx);
    let mut reports = tokio::time::interval(config.report_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m?,
            _ = reports.tick() => {
                tracker.report(executor.warm_keys(), executor.take_published());
                continue;
            }
            _ = shutdown.cancelled() => {
                tracker.farewell();
                // The server closes its side once it has taken the farewell
                // in; waiting for that (briefly) keeps the process from
                // exiting with the farewell unsent.
                let _ = tokio::time::timeout(FAREWELL_WAIT, async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(());
            }
        };
        let Some(ServerMessage { kind: Some(kind) }) = msg else {
            return Ok(());
        };
        match kind {
            server_message::Kind::Assign(a) => {
                let op = a.operation_name.clone();
                let token = match tracker.accept(&op, a.sequence, config.capacity) {
                    Ok(token) => token,
                    Err(Refusal::Duplicate) => {
                        tracing::warn!(operation = %op, "assigned an operation it already runs; ignored");
                        continue;
                    }
                    Err(Refusal::Full(n)) => {
                        // The server's count and ours disagree: never overcommit.
                        tracing::warn!(operation = %op, running = n, "refusing an assignment beyond capacity");
                        tracker.finished(Finished {
                            operation_name: op,
                            status_code: tonic::Code::ResourceExhausted as i32,
                            status_message: format!(
                                "executor {} is running {n} actions, its capacity",
                                executor.id()
                            ),
                            refused: true,
                            ..Default::default()
                        });
                        continue;
                    }
                };
                let executor = executor.clone();
                let tracker = tracker.clone();
                tokio::spawn(async move {
                    tracing::debug!(operation = %op, "running action");
                    let finished = executor.execute(a, token).await;
                    // Also for cancelled work: the server keeps the slot
                    // taken until this says the action (its VM, its
                    // processes) is really gone. Without a session it waits
                    // for the next one.
                    tracker.finished(finished);
                });
            }
            server_message::Kind::Cancel(c) => tracker.cancel(&c.operation_name),
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
