//! `init-dockerd=true`: starting dockerd in a VM through the agent, with
//! the operator's registry mirrors and insecure registries.

use hearth_executor::ExecError;
use hearth_guest::protocol::Request;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::images::ResolvedImage;
use crate::runner::{vm_error, VmRunner};
use crate::{QemuVm, VmError};

impl VmRunner {
    /// dockerd's flags in the VMs.
    pub(crate) fn dockerd_args(&self) -> Vec<String> {
        let mirrors = self
            .config
            .docker_mirrors
            .iter()
            .map(|m| format!("--registry-mirror={m}"));
        let insecure = self
            .config
            .insecure_registries
            .iter()
            .map(|r| format!("--insecure-registry={r}"));
        mirrors.chain(insecure).collect()
    }

    /// Has the agent start dockerd, waiting the agent's own bound plus a
    /// control call's for its answer.
    pub(crate) async fn start_dockerd(
        &self,
        vm: &mut QemuVm,
        image: &ResolvedImage,
        cancel: &CancellationToken,
    ) -> Result<(), ExecError> {
        let args = self.dockerd_args();
        let timeout = self.config.dockerd_timeout;
        let req = Request::StartDockerd {
            args,
            timeout_secs: timeout.as_secs().max(1),
        };
        let agent = vm.agent();
        let limit = timeout + agent.control();
        let started = tokio::select! {
            r = agent.call_within(&req, limit) => r,
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
        };
        match started {
            Ok(_) => Ok(()),
            Err(e @ VmError::Timeout { .. }) => Err(vm_error(e)),
            Err(VmError::Agent(msg)) if msg.contains("has no dockerd") => Err(ExecError::Coded {
                code: Code::FailedPrecondition,
                message: format!("init-dockerd=true, but {} has no dockerd", image.name),
            }),
            Err(e) => Err(ExecError::Coded {
                code: Code::Unavailable,
                message: format!("init-dockerd=true: dockerd did not start in the VM: {e}"),
            }),
        }
    }
}
