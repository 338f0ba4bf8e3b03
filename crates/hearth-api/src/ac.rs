//! ActionCache: results are served only while every blob they reference is
//! still in the CAS, so a client never gets a hit it cannot download.

use hearth_proto::reapi::{
    action_cache_server::ActionCache as ActionCacheApi, ActionResult, GetActionResultRequest, Tree,
    UpdateActionResultRequest,
};
use hearth_storage::{action_key, BlobStore, Digest};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::error::{missing_blobs_status, store_status};
use crate::Context;

pub struct ActionCacheService {
    ctx: Context,
}

impl ActionCacheService {
    pub fn new(ctx: Context) -> Self {
        ActionCacheService { ctx }
    }
}

/// Every blob an ActionResult points at, including the files inside output
/// directory trees. Blobs that can't be parsed count as referenced-and-missing.
pub(crate) async fn referenced_blobs(
    cas: &dyn BlobStore,
    result: &ActionResult,
) -> Result<Vec<Digest>, Status> {
    let mut out = Vec::new();
    let mut add = |d: &Option<hearth_proto::reapi::Digest>, what: &str| -> Result<(), Status> {
        if let Some(d) = d {
            out.push(
                Digest::from_proto(d)
                    .map_err(|e| Status::invalid_argument(format!("{what}: {e}")))?,
            );
        }
        Ok(())
    };
    add(&result.stdout_digest, "stdout_digest")?;
    add(&result.stderr_digest, "stderr_digest")?;
    for f in &result.output_files {
        add(&f.digest, &format!("output file {:?}", f.path))?;
    }
    let mut trees = Vec::new();
    for dir in &result.output_directories {
        add(
            &dir.tree_digest,
            &format!("output directory {:?}", dir.path),
        )?;
        if let Some(t) = &dir.tree_digest {
            trees.push(Digest::from_proto(t).map_err(|e| Status::invalid_argument(e.to_string()))?);
        }
    }
    for t in trees {
        let Ok(data) = cas.read(&t, 0, None).await else {
            continue;
        };
        let tree = Tree::decode(data).map_err(|e| {
            Status::invalid_argument(format!("output tree {t} is not a Tree message: {e}"))
        })?;
        for dir in tree.root.iter().chain(&tree.children) {
            for f in &dir.files {
                add(&f.digest, &format!("file {:?} in output tree {t}", f.name))?;
            }
        }
    }
    Ok(out)
}

async fn inline(
    cas: &dyn BlobStore,
    digest: &Option<hearth_proto::reapi::Digest>,
    max: usize,
) -> Vec<u8> {
    let Some(d) = digest.as_ref().and_then(|d| Digest::from_proto(d).ok()) else {
        return vec![];
    };
    if d.size() as usize > max {
        return vec![];
    }
    cas.read(&d, 0, None)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl ActionCacheApi for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let who = self.ctx.caller(&request)?;
        let store = self.ctx.store_for(&who);
        let req = request.into_inner();
        self.ctx.check_instance(&req.instance_name)?;
        let action = Digest::from_field(req.action_digest.as_ref(), "action_digest")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = action_key(&who.tenant, &req.instance_name, &action);
        let not_found = || Status::not_found(format!("no cached result for action {action}"));
        let Some(mut result) = self
            .ctx
            .ac
            .get(&key)
            .await
            .map_err(|e| store_status(e, "GetActionResult"))?
        else {
            self.ctx.usage.lookup(&who.tenant, false);
            return Err(not_found());
        };
        let cas = store.as_ref();
        let blobs = referenced_blobs(cas, &result).await?;
        let missing = cas
            .find_missing(&blobs)
            .await
            .map_err(|e| store_status(e, "GetActionResult"))?;
        if !missing.is_empty() {
            // Gone from the store itself, the result is dead for everyone;
            // merely hidden from this tenant (its ownership record is on
            // another replica, say), it stays for the others.
            let gone = self
                .ctx
                .cas
                .find_missing(&missing)
                .await
                .map_err(|e| store_status(e, "GetActionResult"))?;
            if !gone.is_empty() {
                tracing::info!(action = %action, missing = gone.len(), "dropping cached result whose outputs were evicted");
                let _ = self.ctx.ac.remove(&key).await;
            }
            self.ctx.usage.lookup(&who.tenant, false);
            return Err(not_found());
        }
        self.ctx.usage.lookup(&who.tenant, true);
        let max = self.ctx.limits.max_inline_bytes;
        if req.inline_stdout {
            result.stdout_raw = inline(cas, &result.stdout_digest, max).await;
        }
        if req.inline_stderr {
            result.stderr_raw = inline(cas, &result.stderr_digest, max).await;
        }
        let wanted = |path: &str| req.inline_output_files.iter().any(|p| p == path);
        for f in result.output_files.iter_mut().filter(|f| wanted(&f.path)) {
            f.contents = inline(cas, &f.digest, max).await;
        }
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let who = self.ctx.caller(&request)?;
        let store = self.ctx.store_for(&who);
        let req = request.into_inner();
        self.ctx.check_instance(&req.instance_name)?;
        let action = Digest::from_field(req.action_digest.as_ref(), "action_digest")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Written into the caller's own partition only; and every blob it
        // points at must be the caller's to read.
        let key = action_key(&who.tenant, &req.instance_name, &action);
        let result = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("action_result is missing"))?;
        let cas = store.as_ref();
        let blobs = referenced_blobs(cas, &result).await?;
        let missing = cas
            .find_missing(&blobs)
            .await
            .map_err(|e| store_status(e, "UpdateActionResult"))?;
        if !missing.is_empty() {
            return Err(missing_blobs_status(
                "UpdateActionResult: the result references blobs",
                &missing,
            ));
        }
        self.ctx
            .ac
            .put(&key, &result)
            .await
            .map_err(|e| store_status(e, "UpdateActionResult"))?;
        self.ctx.usage.write(&who.tenant);
        Ok(Response::new(result))
    }
}
