//! MicroVM execution for `workload-isolation-type=firecracker`.
//!
//! - [`Vmm`] is the small backend trait (boot a VM from a [`VmSpec`]);
//!   [`QemuVmm`] implements it with QEMU's `microvm` machine, under KVM or
//!   software emulation ([`Accel`]).
//! - [`initramfs`] assembles the guest's initramfs (the `hearth-guest` agent
//!   as `/init` plus the kernel modules it needs), cached by content hash.
//! - [`VmRunner`] implements the executor's `Runner` seam: one action, one VM.
//! - [`deadline`]: every wait for a guest agent or QEMU is bounded.

mod accel;
mod agent;
pub mod clean;
mod content_id;
pub mod deadline;
mod disks;
mod dockerd;
mod error;
mod fetched;
pub mod forward;
mod fresh;
mod images;
pub mod initramfs;
mod outputs;
mod park;
mod pool;
mod qemu;
mod qmp;
mod runner;
mod share;
mod snapshots;
pub mod sockdir;
mod warm;

pub use accel::{detect_accel, host_tsc_khz, Accel};
pub use agent::AgentClient;
pub use content_id::hash_file;
pub use deadline::{CONTROL_TIMEOUT, DOCKERD_TIMEOUT};
pub use error::VmError;
pub use images::{ImageHold, ImageSource, ResolvedImage, VmSize};
pub use qemu::{file_identity, kill_stale, qemu_version, QemuVm, QemuVmm};
pub use runner::{VmRunner, VmRunnerConfig};

use std::path::PathBuf;

use async_trait::async_trait;

/// A disk attached to the VM; the guest finds it by `serial`.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
    pub format: DiskFormat,
}

/// How a disk's file holds its blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskFormat {
    /// The blocks themselves (sparse).
    #[default]
    Raw,
    /// A qcow2 copy-on-write overlay over a raw backing file (a clone's
    /// view of a snapshot's disk; see [`disks::overlay`]).
    Qcow2,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskSpec>,
    /// Outbound networking (QEMU user networking inside a private network
    /// namespace, so the guest can't reach the host's own services) or none.
    pub network: bool,
    /// Host-loopback services the guest may reach at 127.0.0.1:PORT, each
    /// through a Unix socket the executor serves (see [`forward`]).
    pub forwards: Vec<(u16, PathBuf)>,
    /// Private directory for the VM's sockets and console log.
    pub run_dir: PathBuf,
    /// Guest RAM in this file, mapped shared, so that saving the VM writes
    /// only device state (see [`QemuVm::save`]). None: anonymous memory.
    pub memory_file: Option<PathBuf>,
    /// Map `memory_file` privately (copy-on-write): the VM is one of many
    /// clones of a snapshot, and the file is never written. Such a VM
    /// cannot be saved cheaply.
    pub memory_private: bool,
    /// Restore from this device-state file (written by [`QemuVm::save`]
    /// with the same spec) instead of booting.
    pub incoming: Option<PathBuf>,
}

/// The kernel and initramfs every VM of a backend boots.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// A VMM backend.
#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// Boots a VM and waits until its agent says hello; or, with
    /// `spec.incoming`, restores a saved one and waits until its agent
    /// answers.
    async fn boot(&self, spec: &VmSpec) -> Result<QemuVm, VmError>;
    fn accel(&self) -> Accel;
    /// What every VM of this backend has in common (VMM, kernel, initramfs,
    /// accelerator): part of runner and snapshot keys.
    fn identity(&self) -> String;
}
