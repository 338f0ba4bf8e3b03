//! google.longrunning Operations over the scheduler's operations, and the
//! conversion of scheduler snapshots into Operation messages.

use futures::stream::{self, BoxStream, StreamExt};
use hearth_proto::longrunning::{
    operation, operations_server::Operations, CancelOperationRequest, DeleteOperationRequest,
    GetOperationRequest, ListOperationsRequest, ListOperationsResponse, Operation,
    WaitOperationRequest,
};
use hearth_proto::protobuf::{Any, Empty};
use hearth_proto::reapi::{execution_stage, ExecuteOperationMetadata, ExecuteResponse};
use hearth_scheduler::{OpSnapshot, Stage};
use prost::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::error::submit_status;
use crate::Context;

const REAPI: &str = "type.googleapis.com/build.bazel.remote.execution.v2";

pub fn to_operation(snap: &OpSnapshot) -> Operation {
    let stage = match snap.stage {
        Stage::Queued => execution_stage::Value::Queued,
        Stage::Executing => execution_stage::Value::Executing,
        Stage::Completed => execution_stage::Value::Completed,
    };
    let metadata = ExecuteOperationMetadata {
        stage: stage as i32,
        action_digest: Some(snap.action_digest.to_proto()),
        ..Default::default()
    };
    Operation {
        name: snap.name.clone(),
        metadata: Some(Any {
            type_url: format!("{REAPI}.ExecuteOperationMetadata"),
            value: metadata.encode_to_vec(),
        }),
        done: snap.stage == Stage::Completed,
        result: snap.response.as_ref().map(response_result),
    }
}

pub fn response_result(resp: &ExecuteResponse) -> operation::Result {
    operation::Result::Response(Any {
        type_url: format!("{REAPI}.ExecuteResponse"),
        value: resp.encode_to_vec(),
    })
}

/// Streams an operation's states until it completes: the current state
/// first, then each change.
pub fn watch_stream(
    rx: watch::Receiver<OpSnapshot>,
) -> BoxStream<'static, Result<Operation, Status>> {
    stream::unfold(Some((rx, true)), |state| async move {
        let (mut rx, first) = state?;
        if !first && rx.changed().await.is_err() {
            return Some((
                Err(Status::unavailable("the server dropped the operation")),
                None,
            ));
        }
        let snap = rx.borrow_and_update().clone();
        let next = if snap.stage == Stage::Completed {
            None
        } else {
            Some((rx, false))
        };
        Some((Ok(to_operation(&snap)), next))
    })
    .boxed()
}

pub struct OperationsService {
    ctx: Context,
}

impl OperationsService {
    pub fn new(ctx: Context) -> Self {
        OperationsService { ctx }
    }

    /// The operation, if it is the caller's (another tenant's is NOT_FOUND,
    /// as an unknown one).
    async fn subscribe<T>(
        &self,
        request: &Request<T>,
        name: &str,
    ) -> Result<watch::Receiver<OpSnapshot>, Status> {
        let who = self.ctx.caller(request)?;
        self.ctx
            .queue
            .subscribe(name, Context::tenant_filter(&who))
            .await
            .map_err(submit_status)?
            .ok_or_else(|| Status::not_found(format!("operation {name:?} is unknown or expired")))
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        Err(Status::unimplemented(
            "ListOperations is not supported; use `hearth status`",
        ))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let rx = self.subscribe(&request, &request.get_ref().name).await?;
        let snap = rx.borrow().clone();
        Ok(Response::new(to_operation(&snap)))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.subscribe(&request, &request.get_ref().name).await?;
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let who = self.ctx.caller(&request)?;
        let name = &request.get_ref().name;
        if !self
            .ctx
            .queue
            .cancel(name, Context::tenant_filter(&who))
            .await
            .map_err(submit_status)?
        {
            return Err(Status::not_found(format!(
                "operation {name:?} is unknown or expired"
            )));
        }
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let mut rx = self.subscribe(&request, &request.get_ref().name).await?;
        let snap = rx
            .wait_for(|s| s.stage == Stage::Completed)
            .await
            .map_err(|_| Status::unavailable("the server dropped the operation"))?
            .clone();
        Ok(Response::new(to_operation(&snap)))
    }
}
