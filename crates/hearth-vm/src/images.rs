//! Which disk image a VM boots (`container-image`) and how big it is
//! (`EstimatedCPU`, `EstimatedMemory`, `EstimatedFreeDiskBytes`).

use std::path::PathBuf;

use async_trait::async_trait;
use hearth_executor::{ExecError, RunSpec};
use hearth_scheduler::platform::{parse_bytes, parse_cpu};
use tonic::Code;

/// A container image ready to boot: a read-only ext4 disk image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub path: PathBuf,
    /// `NAME=VALUE` entries from the image config (PATH and the like).
    pub env: Vec<String>,
    /// How messages name it (the reference, or "the default image").
    pub name: String,
}

/// Where `container-image` references are turned into disk images.
#[async_trait]
pub trait ImageSource: Send + Sync + 'static {
    async fn resolve(
        &self,
        reference: &str,
        credentials: Option<(&str, &str)>,
    ) -> Result<ResolvedImage, ExecError>;
}

/// The VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

pub(crate) async fn resolve(
    spec: &RunSpec,
    default_image: &std::path::Path,
    images: Option<&dyn ImageSource>,
) -> Result<ResolvedImage, ExecError> {
    let p = &spec.platform;
    let reference = match p.get("container-image") {
        None | Some("") | Some("none") => {
            return Ok(ResolvedImage {
                path: default_image.to_path_buf(),
                env: vec![],
                name: "the default image".into(),
            })
        }
        Some(r) => r.strip_prefix("docker://").ok_or_else(|| {
            ExecError::InvalidInput(format!(
                "container-image={r:?}: expected docker://REFERENCE or none"
            ))
        })?,
    };
    let images = images.ok_or_else(|| ExecError::Coded {
        code: Code::FailedPrecondition,
        message: format!("container-image={reference:?}: this executor cannot pull images"),
    })?;
    let creds = match (
        p.get("container-registry-username"),
        p.get("container-registry-password"),
    ) {
        (Some(u), Some(pw)) => Some((u, pw)),
        _ => None,
    };
    images.resolve(reference, creds).await
}

pub(crate) fn size(spec: &RunSpec, default: VmSize, max_vcpus: u32) -> Result<VmSize, ExecError> {
    let p = &spec.platform;
    let vcpus = match p.get("estimatedcpu") {
        Some(v) => parse_cpu(v).map_err(ExecError::InvalidInput)?.ceil() as u32,
        None => default.vcpus,
    }
    .clamp(1, max_vcpus.max(1));
    let memory_mib = match p.get("estimatedmemory") {
        Some(v) => (parse_bytes(v).map_err(ExecError::InvalidInput)? / (1024 * 1024)).max(256),
        None => default.memory_mib,
    };
    let disk_bytes = match p.get("estimatedfreediskbytes") {
        Some(v) => parse_bytes(v)
            .map_err(ExecError::InvalidInput)?
            .max(64 << 20),
        None => default.disk_bytes,
    };
    Ok(VmSize {
        vcpus,
        memory_mib,
        disk_bytes,
    })
}
