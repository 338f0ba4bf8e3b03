//! Which disk image a VM boots (`container-image`) and how big it is
//! (`EstimatedCPU`, `EstimatedMemory`, `EstimatedFreeDiskBytes`).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use hearth_executor::{ExecError, RunSpec};
use hearth_scheduler::platform::{parse_bytes, parse_cpu, Platform};
use tonic::Code;

/// A container image ready to boot: a read-only ext4 disk image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub path: PathBuf,
    /// `NAME=VALUE` entries from the image config (PATH and the like).
    pub env: Vec<String>,
    /// How messages name it (the reference, or "the default image").
    pub name: String,
    /// Keeps the image file from being evicted from its cache while the
    /// action that resolved it runs.
    pub hold: ImageHold,
}

/// Whatever the [`ImageSource`] wants kept alive while the image is in use
/// (for registry images, the image cache's lease); nothing for the default image.
#[derive(Clone, Default)]
pub struct ImageHold(Option<Arc<dyn std::any::Any + Send + Sync>>);

impl ImageHold {
    pub fn new(hold: impl std::any::Any + Send + Sync) -> Self {
        ImageHold(Some(Arc::new(hold)))
    }
}

impl std::fmt::Debug for ImageHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ImageHold(held)"
        } else {
            "ImageHold(none)"
        })
    }
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
                hold: ImageHold::default(),
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

/// The VM size the platform asks for (`EstimatedCPU` rounded up to whole
/// vCPUs, `EstimatedMemory` at least 256 MiB, `EstimatedFreeDiskBytes` at
/// least 64 MiB; `default` for what it leaves out). Asking for more than `max`
/// (the operator's `--vm-max-*` caps) is INVALID_ARGUMENT naming the property
/// and the cap: the VM is never silently made smaller than asked.
pub(crate) fn size(p: &Platform, default: VmSize, max: VmSize) -> Result<VmSize, ExecError> {
    // The value asked for under `prop` (looked up as `key`), read by
    // `parse`, or `default`; more than `cap` is refused naming `--flag`.
    let asked = |key: &str,
                 prop: &str,
                 flag: &str,
                 cap: u64,
                 default: u64,
                 parse: &dyn Fn(&str) -> Result<u64, String>|
     -> Result<u64, ExecError> {
        let Some(v) = p.get(key) else {
            return Ok(default);
        };
        let n = parse(v).map_err(ExecError::InvalidInput)?;
        if n > cap {
            return Err(ExecError::InvalidInput(format!(
                "{prop}={v} exceeds this executor's cap --{flag}={cap}"
            )));
        }
        Ok(n)
    };
    let vcpus = asked(
        "estimatedcpu",
        "EstimatedCPU",
        "vm-max-cpus",
        max.vcpus.into(),
        default.vcpus.into(),
        // Whole vCPUs, rounded up (the cast saturates).
        &|v| parse_cpu(v).map(|n| n.ceil() as u64),
    )?;
    let memory_mib = asked(
        "estimatedmemory",
        "EstimatedMemory",
        "vm-max-memory-mib",
        max.memory_mib,
        default.memory_mib,
        &|v| parse_bytes(v).map(|b| (b / (1024 * 1024)).max(256)),
    )?;
    let disk_bytes = asked(
        "estimatedfreediskbytes",
        "EstimatedFreeDiskBytes",
        "vm-max-disk-bytes",
        max.disk_bytes,
        default.disk_bytes,
        &|v| parse_bytes(v).map(|b| b.max(64 << 20)),
    )?;
    Ok(VmSize {
        // Within the cap, so it fits a u32.
        vcpus: (vcpus as u32).max(1),
        memory_mib,
        disk_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: VmSize = VmSize {
        vcpus: 1,
        memory_mib: 1024,
        disk_bytes: 4 << 30,
    };
    const MAX: VmSize = VmSize {
        vcpus: 4,
        memory_mib: 8192,
        disk_bytes: 64 << 30,
    };

    fn size_of(pairs: &[(&str, &str)]) -> Result<VmSize, ExecError> {
        size(&Platform::from_pairs(pairs.iter().copied()), DEFAULT, MAX)
    }

    #[test]
    fn sizes_within_the_caps_are_given_as_asked() {
        assert_eq!(size_of(&[]).unwrap(), DEFAULT);
        let s = size_of(&[
            ("EstimatedCPU", "3.5"),
            ("EstimatedMemory", "8GiB"),
            ("EstimatedFreeDiskBytes", "64GiB"),
        ])
        .unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 4,
                memory_mib: 8192,
                disk_bytes: 64 << 30
            }
        );
        assert_eq!(size_of(&[("EstimatedCPU", "500m")]).unwrap().vcpus, 1);
    }

    #[test]
    fn sizes_over_the_caps_are_invalid_argument_naming_the_cap() {
        for (prop, value, flag) in [
            ("EstimatedCPU", "5", "--vm-max-cpus=4"),
            ("EstimatedCPU", "4.1", "--vm-max-cpus=4"),
            ("EstimatedMemory", "64GB", "--vm-max-memory-mib=8192"),
            ("EstimatedMemory", "8193MiB", "--vm-max-memory-mib=8192"),
            (
                "EstimatedFreeDiskBytes",
                "65GiB",
                "--vm-max-disk-bytes=68719476736",
            ),
        ] {
            let e = size_of(&[(prop, value)]).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{prop}={value}: {e}");
            assert_eq!(
                e.to_string(),
                format!("{prop}={value} exceeds this executor's cap {flag}")
            );
        }
    }
}
