use hearth_proto::reapi::{
    capabilities_server::Capabilities, digest_function, symlink_absolute_path_strategy,
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
    GetCapabilitiesRequest, ServerCapabilities,
};
use hearth_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::Context;

pub struct CapabilitiesService {
    ctx: Context,
}

impl CapabilitiesService {
    pub fn new(ctx: Context) -> Self {
        CapabilitiesService { ctx }
    }
}

fn version(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        self.ctx.check_instance(&request.get_ref().instance_name)?;
        let sha256 = digest_function::Value::Sha256 as i32;
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: vec![sha256],
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: self.ctx.limits.max_batch_bytes as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Disallowed
                    as i32,
                ..Default::default()
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: sha256,
                exec_enabled: true,
                digest_functions: vec![sha256],
                execution_priority_capabilities: None,
                ..Default::default()
            }),
            // Bazel 2.1 refuses servers whose low version is above 2.0.
            low_api_version: version(2, 0),
            high_api_version: version(2, 3),
            deprecated_api_version: None,
        }))
    }
}
