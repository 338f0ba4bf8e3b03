//! Hearth's executor protocol, server side: executors connect, receive
//! assignments, report results; results are cached here and published to
//! the operation's watchers.

use futures::stream::{BoxStream, StreamExt};
use hearth_proto::reapi::{ActionResult, ExecuteResponse};
use hearth_proto::rpc;
use hearth_proto::worker::{
    self as wp, worker_message, worker_service_server::WorkerService as WorkerApi, ServerMessage,
    StatusRequest, StatusResponse, WorkerMessage,
};
use hearth_scheduler::ExecutorInfo;
use prost::Message;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Context;

pub struct WorkerService {
    ctx: Context,
}

impl WorkerService {
    pub fn new(ctx: Context) -> Self {
        WorkerService { ctx }
    }
}

fn executor_info(hello: wp::Hello) -> Result<ExecutorInfo, Status> {
    if hello.executor_id.is_empty() {
        return Err(Status::invalid_argument("hello.executor_id is empty"));
    }
    if hello.capacity == 0 {
        return Err(Status::invalid_argument("hello.capacity is 0"));
    }
    Ok(ExecutorInfo {
        id: hello.executor_id,
        description: hello.description,
        properties: hello
            .properties
            .into_iter()
            .map(|p| {
                (
                    p.name.trim().to_ascii_lowercase(),
                    p.value.trim().to_string(),
                )
            })
            .collect(),
        isolation_types: hello.isolation_types,
        capacity: hello.capacity,
        vm_unavailable: hello.vm_unavailable,
    })
}

/// Stores an executor's result and completes the operation.
async fn finished(ctx: &Context, executor: &str, session: u64, mut f: wp::Finished) {
    ctx.scheduler
        .report_warm(executor, session, std::mem::take(&mut f.warm_keys));
    let Some(job) = ctx.scheduler.finish(executor, session, &f.operation_name) else {
        tracing::warn!(executor, operation = %f.operation_name, "result for an operation this executor does not hold; ignored");
        return;
    };
    let mut status = rpc::Status {
        code: f.status_code,
        message: f.status_message,
        details: vec![],
    };
    let result = if f.action_result.is_empty() {
        None
    } else {
        match ActionResult::decode(f.action_result.as_slice()) {
            Ok(r) => Some(r),
            Err(e) => {
                status = rpc::Status {
                    code: tonic::Code::Internal as i32,
                    message: format!("executor {executor} sent an undecodable ActionResult: {e}"),
                    details: vec![],
                };
                None
            }
        }
    };
    if let Some(r) = &result {
        if status.code == 0 && r.exit_code == 0 && !job.do_not_cache {
            if let Err(e) = ctx.ac.put(&job.action_digest, r).await {
                tracing::error!(action = %job.action_digest, error = %e, "could not store the action result");
            }
        }
    }
    ctx.scheduler.complete(
        &job.operation_name,
        ExecuteResponse {
            result,
            cached_result: false,
            status: Some(status),
            ..Default::default()
        },
    );
}

#[tonic::async_trait]
impl WorkerApi for WorkerService {
    type SessionStream = BoxStream<'static, Result<ServerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let mut hello = match inbound.message().await? {
            Some(WorkerMessage {
                kind: Some(worker_message::Kind::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be hello",
                ))
            }
        };
        let warm_keys = std::mem::take(&mut hello.warm_keys);
        let info = executor_info(hello)?;
        let id = info.id.clone();
        let (session, rx) = self.ctx.scheduler.connect(info, warm_keys);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Finished(f)),
                    })) => finished(&ctx, &id, session, f).await,
                    Ok(Some(_)) => {
                        tracing::warn!(executor = %id, "unexpected message from executor; ignored")
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(executor = %id, error = %e, "executor stream failed");
                        break;
                    }
                }
            }
            ctx.scheduler.disconnect(&id, session);
        });
        Ok(Response::new(
            UnboundedReceiverStream::new(rx).map(Ok).boxed(),
        ))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let stats = self.ctx.scheduler.stats();
        let cas = self.ctx.cas.stats();
        Ok(Response::new(StatusResponse {
            executors: stats
                .executors
                .into_iter()
                .map(|e| wp::ExecutorStatus {
                    executor_id: e.info.id,
                    description: e.info.description,
                    properties: e
                        .info
                        .properties
                        .into_iter()
                        .map(|(name, value)| wp::Property { name, value })
                        .collect(),
                    isolation_types: e.info.isolation_types,
                    capacity: e.info.capacity,
                    running: e.running,
                    connected_seconds: e.connected_seconds,
                    warm_runners: e.warm_runners,
                    vm_unavailable: e.info.vm_unavailable,
                })
                .collect(),
            queued_actions: stats.queued,
            running_actions: stats.running,
            cas_bytes: cas.bytes,
            cas_blobs: cas.blobs,
            cas_limit_bytes: cas.limit_bytes,
            completed_actions: stats.completed,
            cache_hits: stats.cache_hits,
            uptime_seconds: self.ctx.started.elapsed().as_secs(),
        }))
    }
}
