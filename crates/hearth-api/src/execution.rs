//! Execution: cache lookup, validation, queueing, and streaming the operation.

use futures::stream::{self, BoxStream, StreamExt};
use hearth_proto::longrunning::Operation;
use hearth_proto::reapi::{
    execution_server::Execution, ExecuteRequest, ExecuteResponse, WaitExecutionRequest,
};
use hearth_scheduler::{
    affinity_key, ExecutionRecord, Job, OpSnapshot, Platform, RecordBase, Stage,
};
use hearth_storage::{action_key, Digest, PinGuard};
use tonic::{Request, Response, Status};

use crate::ac::referenced_blobs;
use crate::error::{store_status, submit_status};
use crate::operations::{to_operation, watch_stream};
use crate::validate::check_action;
use crate::Context;

pub struct ExecutionService {
    ctx: Context,
}

impl ExecutionService {
    pub fn new(ctx: Context) -> Self {
        ExecutionService { ctx }
    }

    /// A cached result whose outputs are all still present (to `cas`, the
    /// caller's view of the store).
    async fn cached(
        &self,
        cas: &dyn hearth_storage::BlobStore,
        key: &Digest,
    ) -> Result<Option<ExecuteResponse>, Status> {
        let Some(result) = self
            .ctx
            .ac
            .get(key)
            .await
            .map_err(|e| store_status(e, "action cache"))?
        else {
            return Ok(None);
        };
        let blobs = referenced_blobs(cas, &result).await?;
        if !cas
            .find_missing(&blobs)
            .await
            .map_err(|e| store_status(e, "CAS"))?
            .is_empty()
        {
            return Ok(None);
        }
        Ok(Some(ExecuteResponse {
            result: Some(result),
            cached_result: true,
            status: Some(Default::default()),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = BoxStream<'static, Result<Operation, Status>>;
    type WaitExecutionStream = BoxStream<'static, Result<Operation, Status>>;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let who = self.ctx.caller(&request)?;
        let store = self.ctx.store_for(&who);
        let req = request.into_inner();
        self.ctx.check_instance(&req.instance_name)?;
        let key = Digest::from_field(req.action_digest.as_ref(), "action_digest")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !req.skip_cache_lookup {
            let scoped = action_key(&who.tenant, &req.instance_name, &key);
            let cached = self.cached(store.as_ref(), &scoped).await?;
            self.ctx.usage.lookup(&who.tenant, cached.is_some());
            if let Some(response) = cached {
                let name = format!("operations/cached-{}", uuid::Uuid::new_v4());
                self.ctx.scheduler.history().record(ExecutionRecord::new(
                    RecordBase {
                        operation_name: name.clone(),
                        tenant: who.tenant.clone(),
                        instance_name: req.instance_name.clone(),
                        action_digest: key,
                        // A cache hit reads neither the Action nor the Command.
                        arguments: vec![],
                        platform: vec![],
                        isolation: String::new(),
                        executor: None,
                        attempts: 0,
                        queued_at: std::time::SystemTime::now(),
                    },
                    &response,
                ));
                let snap = OpSnapshot {
                    name,
                    action_digest: key,
                    stage: Stage::Completed,
                    response: Some(response),
                };
                return Ok(Response::new(
                    stream::iter([Ok(to_operation(&snap))]).boxed(),
                ));
            }
        }
        // Inputs the caller's tenant may not read are missing to it.
        let checked = check_action(
            store.as_ref(),
            &key,
            self.ctx.limits.max_metadata_blob_bytes,
        )
        .await?;
        let platform = Platform::from_protos(
            checked.command.platform.as_ref(),
            checked.action.platform.as_ref(),
        )
        .map_err(|e| Status::invalid_argument(format!("platform: {e}")))?;
        if platform.flag("recycle-runner") {
            let affinity = affinity_key(&who.tenant, &req.instance_name, &platform);
            crate::runner_snapshots::recall(&self.ctx, &affinity).await;
        }
        let job = Job {
            tenant: who.tenant.clone(),
            instance_name: req.instance_name.clone(),
            action_digest: key,
            do_not_cache: checked.action.do_not_cache,
            shareable: !req.skip_cache_lookup && !checked.action.do_not_cache,
            platform,
            pins: self
                .ctx
                .pins
                .clone()
                .map(|p| PinGuard::new(p, checked.blobs)),
            action: checked.action_bytes,
            command: checked.command_bytes,
        };
        let rx = self.ctx.queue.submit(job).await.map_err(submit_status)?;
        Ok(Response::new(watch_stream(rx)))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let who = self.ctx.caller(&request)?;
        let name = &request.get_ref().name;
        let tenant = Context::tenant_filter(&who);
        let rx = self
            .ctx
            .queue
            .subscribe(name, tenant)
            .await
            .map_err(submit_status)?
            .ok_or_else(|| {
                Status::not_found(format!("operation {name:?} is unknown or expired"))
            })?;
        Ok(Response::new(watch_stream(rx)))
    }
}
