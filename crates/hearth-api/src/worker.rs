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
use hearth_scheduler::{ExecutorInfo, ExecutorReport};
use hearth_storage::{action_key, Digest};
use prost::Message;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ac::referenced_blobs;
use crate::error::missing_blobs_rpc;
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

/// Every blob `result` points at, if the store holds them all.
async fn stored_outputs(ctx: &Context, result: &ActionResult) -> Result<Vec<Digest>, String> {
    let blobs = referenced_blobs(ctx.cas.as_ref(), result)
        .await
        .map_err(|s| s.message().to_string())?;
    let missing = ctx
        .cas
        .find_missing(&blobs)
        .await
        .map_err(|e| format!("checking its outputs: {e}"))?;
    match missing.as_slice() {
        [] => Ok(blobs),
        [first, ..] => Err(format!(
            "{} of its {} output blobs are not in the CAS (the first: {first})",
            missing.len(),
            blobs.len()
        )),
    }
}

/// Most operations an executor of `capacity` may say it holds: those it
/// runs plus results of its last session still to send. A longer list is
/// made up, and would only make the server hold more.
fn max_held(capacity: u32) -> usize {
    capacity as usize * 2 + 8
}

/// Most shared snapshots taken from one message (an executor publishes a
/// key at most every half minute; more is made up).
const MAX_SHARED_PER_MESSAGE: usize = 64;

/// Takes in the runner snapshots an executor shared: the scheduler's
/// index, and the action cache behind it.
async fn note_shared(ctx: &Context, executor: &str, mut s: Vec<wp::SharedSnapshot>) {
    if s.is_empty() {
        return;
    }
    s.truncate(MAX_SHARED_PER_MESSAGE);
    let kept = ctx.scheduler.note_shared_snapshots(executor, s);
    crate::runner_snapshots::remember(ctx, &kept).await;
}

fn executor_report(
    executor: &str,
    capacity: u32,
    state: Option<wp::ExecutorState>,
) -> Option<ExecutorReport> {
    state.map(|mut s| {
        if s.running_operations.len() > max_held(capacity) {
            tracing::warn!(
                executor,
                listed = s.running_operations.len(),
                "executor reports more operations than it could hold; the rest are ignored"
            );
            s.running_operations.truncate(max_held(capacity));
        }
        ExecutorReport {
            running: s.running_operations,
            assignments_received: s.assignments_received,
            leaving: s.leaving,
        }
    })
}

/// Stores an executor's result and completes the operation.
async fn finished(ctx: &Context, executor: &str, capacity: u32, session: u64, mut f: wp::Finished) {
    ctx.scheduler
        .report_warm(executor, session, std::mem::take(&mut f.warm_keys));
    note_shared(ctx, executor, std::mem::take(&mut f.shared_snapshots)).await;
    let report = executor_report(executor, capacity, f.state.take());
    let job = if f.refused {
        tracing::warn!(executor, operation = %f.operation_name, reason = %f.status_message, "executor refused an assignment; re-queued");
        ctx.scheduler.refused(executor, session, &f.operation_name);
        None
    } else {
        ctx.scheduler.finish(executor, session, &f.operation_name)
    };
    // Reconciled only after the end it reports is taken in.
    if let Some(report) = &report {
        ctx.scheduler.report(executor, session, report);
    }
    if f.refused {
        return;
    }
    let Some(job) = job else {
        if f.status_code == tonic::Code::Cancelled as i32 {
            tracing::debug!(executor, operation = %f.operation_name, "cancelled action confirmed gone");
        } else {
            tracing::warn!(executor, operation = %f.operation_name, "result for an operation this executor does not hold, or that already ended; ignored");
        }
        return;
    };
    let missing: Vec<Digest> = f
        .missing_blobs
        .iter()
        .filter_map(|d| Digest::parse(&d.hash, d.size_bytes).ok())
        .collect();
    let mut status =
        if f.status_code == tonic::Code::FailedPrecondition as i32 && !missing.is_empty() {
            // What Bazel acts on: it re-uploads these and retries.
            missing_blobs_rpc(
                &format!("executor {executor} could not fetch inputs of the action"),
                &missing,
            )
        } else {
            rpc::Status {
                code: f.status_code,
                message: f.status_message,
                details: vec![],
            }
        };
    let mut result = if f.action_result.is_empty() {
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
        // An executor's word is checked: every blob the result points at
        // must be in the store before anyone is told of it.
        match stored_outputs(ctx, r).await {
            Ok(blobs) => {
                if let Err(e) = ctx.grant(&job.tenant, &blobs).await {
                    // Its outputs would be missing to the tenant: a result
                    // it cannot use, so an error it can retry.
                    tracing::error!(action = %job.action_digest, error = %e, "could not record who may read the outputs");
                    status = rpc::Status {
                        code: tonic::Code::Unavailable as i32,
                        message: format!("recording the outputs' ownership: {e}"),
                        details: vec![],
                    };
                    result = None;
                } else if status.code == 0 && r.exit_code == 0 && !job.do_not_cache {
                    let key = action_key(&job.tenant, &job.instance_name, &job.action_digest);
                    match ctx.ac.put(&key, r).await {
                        Ok(()) => ctx.usage.write(&job.tenant),
                        Err(e) => {
                            tracing::error!(action = %job.action_digest, error = %e, "could not store the action result")
                        }
                    }
                }
            }
            Err(why) => {
                tracing::warn!(executor, operation = %job.operation_name, %why, "refused an executor's result");
                status = rpc::Status {
                    code: tonic::Code::Internal as i32,
                    message: format!(
                        "executor {executor} reported a result that does not check out: {why}"
                    ),
                    details: vec![],
                };
                result = None;
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
        let who = self.ctx.caller(&request)?;
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
        let holding = std::mem::take(&mut hello.running_operations);
        let info = executor_info(hello)?;
        if holding.len() > max_held(info.capacity) {
            return Err(Status::invalid_argument(format!(
                "hello lists {} running operations; an executor of capacity {} holds at most {}",
                holding.len(),
                info.capacity,
                max_held(info.capacity)
            )));
        }
        let id = info.id.clone();
        let capacity = info.capacity;
        let (session, rx) = self
            .ctx
            .queue
            .connect_executor(info, warm_keys, &holding, &who.key_id)
            .await
            .map_err(|e| Status::already_exists(e.to_string()))?;
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Finished(f)),
                    })) => finished(&ctx, &id, capacity, session, f).await,
                    Ok(Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Report(r)),
                    })) => {
                        ctx.scheduler.report_warm(&id, session, r.warm_keys);
                        note_shared(&ctx, &id, r.shared_snapshots).await;
                        if let Some(report) = executor_report(&id, capacity, r.state) {
                            ctx.scheduler.report(&id, session, &report);
                        }
                    }
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

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        // Queue counts are the caller's tenant's own unless it is an admin.
        let who = self.ctx.caller(&request)?;
        let stats = self.ctx.scheduler.stats(Context::tenant_filter(&who));
        let cas = self.ctx.cas_stats();
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
                    reconnecting: e.reconnecting,
                })
                .collect(),
            operations: stats
                .jobs
                .into_iter()
                .map(|j| wp::OperationStatus {
                    operation_name: j.operation_name,
                    action_digest: Some(wp::Digest {
                        hash: j.action_digest.hash_hex(),
                        size_bytes: j.action_digest.size() as i64,
                    }),
                    stage: if j.executor.is_some() {
                        "executing"
                    } else {
                        "queued"
                    }
                    .into(),
                    executor_id: j.executor.unwrap_or_default(),
                    attempts: j.attempts,
                    queued_seconds: j.queued_for.as_secs(),
                })
                .collect(),
            requeued_actions: stats.requeued,
            shared_snapshots: stats.shared_snapshots,
            queued_actions: stats.queued,
            running_actions: stats.running,
            cas_bytes: cas.bytes,
            cas_blobs: cas.blobs,
            cas_limit_bytes: cas.limit_bytes,
            completed_actions: stats.completed,
            // Every tenant's, as `completed_actions` is.
            cache_hits: self.ctx.usage.totals(None).hits,
            uptime_seconds: self.ctx.started.elapsed().as_secs(),
        }))
    }
}
