//! An executor played by the test over the executor protocol itself.

use hearth_proto::worker::{
    server_message, worker_message, worker_service_client::WorkerServiceClient, Assignment,
    Finished, Hello, Report, ServerMessage, WorkerMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::Channel;

pub struct FakeExecutor {
    tx: mpsc::UnboundedSender<WorkerMessage>,
    inbound: tonic::Streaming<ServerMessage>,
}

impl FakeExecutor {
    /// Says hello as `id` (capacity 2, host actions, `properties`); the
    /// server's refusal, if it refuses.
    pub async fn try_connect(
        c: &Channel,
        id: &str,
        warm_keys: Vec<String>,
        properties: &[(&str, &str)],
    ) -> Result<Self, tonic::Status> {
        Self::try_hello(c, id, warm_keys, properties, vec![]).await
    }

    /// As `try_connect`, saying it still holds `running` operations.
    pub async fn try_hello(
        c: &Channel,
        id: &str,
        warm_keys: Vec<String>,
        properties: &[(&str, &str)],
        running: Vec<String>,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let hello = Hello {
            running_operations: running,
            executor_id: id.into(),
            isolation_types: vec!["none".into()],
            capacity: 2,
            warm_keys,
            properties: properties
                .iter()
                .map(|(name, value)| hearth_proto::worker::Property {
                    name: name.to_string(),
                    value: value.to_string(),
                })
                .collect(),
            ..Default::default()
        };
        tx.send(WorkerMessage {
            kind: Some(worker_message::Kind::Hello(hello)),
        })
        .expect("queueing hello");
        let inbound = WorkerServiceClient::new(c.clone())
            .session(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(FakeExecutor { tx, inbound })
    }

    pub async fn connect(c: &Channel, id: &str, warm_keys: Vec<String>) -> Self {
        Self::try_connect(c, id, warm_keys, &[])
            .await
            .expect("the server accepts the executor")
    }

    pub async fn assigned(&mut self) -> Assignment {
        match self
            .inbound
            .message()
            .await
            .expect("session")
            .and_then(|m| m.kind)
        {
            Some(server_message::Kind::Assign(a)) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    pub async fn assignment(&mut self) -> String {
        self.assigned().await.operation_name
    }

    pub fn send(&self, f: Finished) {
        self.tx
            .send(WorkerMessage {
                kind: Some(worker_message::Kind::Finished(f)),
            })
            .expect("sending finished");
    }

    pub fn report(&self, r: Report) {
        self.tx
            .send(WorkerMessage {
                kind: Some(worker_message::Kind::Report(r)),
            })
            .expect("sending a report");
    }

    pub fn finish(&self, op: String, warm_keys: Vec<String>) {
        self.send(Finished {
            operation_name: op,
            warm_keys,
            ..Default::default()
        });
    }
}
