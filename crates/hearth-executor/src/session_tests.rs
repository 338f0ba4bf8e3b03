//! The session against a server played by the test: one that assigns more
//! than the executor's capacity.

use super::*;
use crate::client::{connect_any, ServerAddress};
use crate::error::ExecResult;
use crate::runner::{RunOutcome, RunSpec, Runner};
use crate::{ExecutorConfig, LocalCas};
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use hearth_proto::worker::worker_service_server::{WorkerService, WorkerServiceServer};
use hearth_proto::worker::{Assignment, StatusRequest, StatusResponse};
use hearth_storage::DiskStore;
use prost::Message;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// Runs every command for a while.
struct Slow;

#[async_trait]
impl Runner for Slow {
    fn isolation_type(&self) -> &'static str {
        "none"
    }
    async fn run(&self, _: &RunSpec, cancel: CancellationToken) -> ExecResult<RunOutcome> {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(RunOutcome::default()),
            _ = cancel.cancelled() => Err(crate::ExecError::Cancelled),
        }
    }
}

/// Sends three assignments at once, and reports every Finished it gets.
struct Overcommitting(mpsc::UnboundedSender<hearth_proto::worker::Finished>);

#[tonic::async_trait]
impl WorkerService for Overcommitting {
    type SessionStream = BoxStream<'static, Result<ServerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let _hello = inbound.message().await?;
        let finished = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(worker_message::Kind::Finished(f)) = m.kind {
                    let _ = finished.send(f);
                }
            }
        });
        let action = hearth_proto::reapi::Action::default().encode_to_vec();
        let command = hearth_proto::reapi::Command {
            arguments: vec!["true".into()],
            ..Default::default()
        }
        .encode_to_vec();
        let assign = |n: usize| {
            Ok(ServerMessage {
                kind: Some(server_message::Kind::Assign(Assignment {
                    operation_name: format!("op-{n}"),
                    action: action.clone(),
                    command: command.clone(),
                    ..Default::default()
                })),
            })
        };
        let msgs: Vec<Result<ServerMessage, Status>> = (0..3).map(assign).collect();
        Ok(Response::new(Box::pin(
            futures::stream::iter(msgs).chain(futures::stream::pending()),
        )))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("status"))
    }
}

#[tokio::test]
async fn assignments_beyond_capacity_are_refused() {
    let (tx, mut finished) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(Overcommitting(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(&dir.path().join("cas"), 0).unwrap());
    let config = ExecutorConfig {
        id: "e".into(),
        work_dir: dir.path().join("work"),
        default_timeout: Duration::from_secs(60),
        max_timeout: Duration::from_secs(60),
        action_owner: None,
    };
    let runners: Vec<Arc<dyn Runner>> = vec![Arc::new(Slow)];
    let executor = Arc::new(Executor::new(config, LocalCas::shared(store), runners).unwrap());
    let (channel, servers) = connect_any(&[ServerAddress {
        url: format!("grpc://{addr}"),
        ..Default::default()
    }])
    .unwrap();
    let shutdown = CancellationToken::new();
    let session = SessionConfig {
        properties: vec![],
        capacity: 2,
        description: String::new(),
        vm_unavailable: String::new(),
        report_interval: REPORT_INTERVAL,
    };
    tokio::spawn(run(executor, session, channel, servers, shutdown.clone()));
    let f = tokio::time::timeout(Duration::from_secs(20), finished.recv())
        .await
        .expect("an answer to the third assignment")
        .unwrap();
    assert_eq!(f.operation_name, "op-2");
    assert!(f.refused, "{f:?}");
    assert_eq!(f.status_code, tonic::Code::ResourceExhausted as i32);
    assert!(
        f.status_message.contains("capacity"),
        "{}",
        f.status_message
    );
    shutdown.cancel();
}
