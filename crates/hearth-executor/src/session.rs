//! Keeps an executor connected to the scheduler: hello, receive assignments,
//! run them concurrently, report results; reconnect with backoff when the
//! stream breaks. Actions of a broken session are cancelled (the server
//! re-queues them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::ServerChannel;
use hearth_proto::worker::{
    server_message, worker_message, worker_service_client::WorkerServiceClient, Finished, Hello,
    Property, ServerMessage, WorkerMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::Executor;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `http://HOST:PORT`.
    pub server: String,
    pub properties: Vec<(String, String)>,
    pub capacity: u32,
    pub description: String,
    /// Why microVMs are not offered (see `Hello.vm_unavailable`); empty
    /// when they are.
    pub vm_unavailable: String,
}

/// Runs sessions until `shutdown` fires.
pub async fn run(
    executor: Arc<Executor>,
    config: SessionConfig,
    channel: ServerChannel,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        match one_session(&executor, &config, channel.clone(), &shutdown).await {
            Ok(()) => tracing::info!("session with the server ended"),
            Err(e) => {
                tracing::warn!(server = %config.server, error = %e, "session with the server failed")
            }
        }
        if shutdown.is_cancelled() {
            return;
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
    shutdown: &CancellationToken,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = Hello {
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
    };
    let _ = tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Hello(hello)),
    });
    let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut inbound = client
        .session(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(server = %config.server, "connected to the server");
    let session_cancel = shutdown.child_token();
    let _cancel_on_exit = session_cancel.clone().drop_guard();
    let running: Arc<Mutex<HashMap<String, CancellationToken>>> = Arc::default();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Some(ServerMessage { kind: Some(kind) }) = msg else {
            return Ok(());
        };
        match kind {
            server_message::Kind::Assign(a) => {
                let token = session_cancel.child_token();
                let op = a.operation_name.clone();
                let busy = {
                    let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
                    let busy = running.len() >= config.capacity as usize;
                    if !busy {
                        running.insert(op.clone(), token.clone());
                    }
                    busy.then_some(running.len())
                };
                if let Some(n) = busy {
                    // The server's count and ours disagree: never overcommit.
                    tracing::warn!(operation = %op, running = n, "refusing an assignment beyond capacity");
                    let _ = tx.send(WorkerMessage {
                        kind: Some(worker_message::Kind::Finished(Finished {
                            operation_name: op,
                            status_code: tonic::Code::ResourceExhausted as i32,
                            status_message: format!(
                                "executor {} is running {n} actions, its capacity",
                                executor.id()
                            ),
                            refused: true,
                            ..Default::default()
                        })),
                    });
                    continue;
                }
                let executor = executor.clone();
                let tx = tx.clone();
                let running = running.clone();
                tokio::spawn(async move {
                    tracing::debug!(operation = %op, "running action");
                    let finished = executor.execute(a, token.clone()).await;
                    running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&op);
                    // Also for cancelled work: the server keeps the slot
                    // taken until this says the action (its VM, its
                    // processes) is really gone. After the session ended
                    // the send fails, and the new session starts empty.
                    let _ = tx.send(WorkerMessage {
                        kind: Some(worker_message::Kind::Finished(finished)),
                    });
                });
            }
            server_message::Kind::Cancel(c) => {
                if let Some(t) = running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&c.operation_name)
                {
                    t.cancel();
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
