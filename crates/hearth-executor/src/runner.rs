//! The seam between the executor and where a command actually runs. The host
//! runner runs it on this machine; a VM runner boots a microVM. The contract:
//! when `run` returns, the workspace holds the outputs and the stdout/stderr
//! files hold what the command printed.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use hearth_scheduler::Platform;
use tokio_util::sync::CancellationToken;

use crate::error::ExecResult;

/// What to run and where.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The action's input root, with inputs in place and output parents made.
    pub input_root: PathBuf,
    /// Relative to `input_root`.
    pub working_directory: String,
    /// Every declared output (output_files, output_directories and
    /// output_paths), normalized beneath `input_root`: `/`-joined
    /// components, no `.` or `..`; empty for the root itself. A runner that
    /// must copy outputs back (a VM) copies these.
    pub output_paths: Vec<String>,
    pub arguments: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub timeout: Duration,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub platform: Platform,
    /// The REAPI instance name (part of a recycled runner's key).
    pub instance_name: String,
    /// Who asked for it (part of a recycled runner's key; empty on a
    /// server without API keys).
    pub tenant: String,
    /// The newest runner snapshot of the action's affinity key that an
    /// executor shared, if the server knows one.
    pub shared_snapshot: Option<SharedSnapshot>,
}

/// A warm runner's snapshot in the CAS (see `hearth.worker.v1.SharedSnapshot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSnapshot {
    pub affinity_key: String,
    pub runner_key: String,
    /// None: withdrawn (its runner failed an action; no one should start
    /// from its line).
    pub manifest: Option<hearth_storage::Digest>,
}

impl SharedSnapshot {
    pub fn to_proto(&self) -> hearth_proto::worker::SharedSnapshot {
        hearth_proto::worker::SharedSnapshot {
            affinity_key: self.affinity_key.clone(),
            runner_key: self.runner_key.clone(),
            manifest: self.manifest.map(|m| hearth_proto::worker::Digest {
                hash: m.hash_hex(),
                size_bytes: m.size() as i64,
            }),
        }
    }

    /// None if the manifest digest is missing or malformed.
    pub fn from_proto(s: &hearth_proto::worker::SharedSnapshot) -> Option<Self> {
        let d = s.manifest.as_ref()?;
        Some(SharedSnapshot {
            affinity_key: s.affinity_key.clone(),
            runner_key: s.runner_key.clone(),
            manifest: Some(hearth_storage::Digest::parse(&d.hash, d.size_bytes).ok()?),
        })
    }
}

/// How the command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOutcome {
    pub exit_code: i32,
    pub timed_out: bool,
    /// How the runner started, for runners with more than one way.
    pub start: Option<RunnerStart>,
}

impl RunOutcome {
    /// The command exited (or was killed by a signal: 128 + its number).
    pub fn exited(exit_code: i32) -> Self {
        RunOutcome {
            exit_code,
            ..Default::default()
        }
    }

    /// The action's timeout ended it; `exit_code` is what killing it gave.
    pub fn timed_out(exit_code: i32) -> Self {
        RunOutcome {
            exit_code,
            timed_out: true,
            start: None,
        }
    }
}

/// How a runner got ready for the command (reported in the result's
/// `auxiliary_metadata` as `hearth.worker.v1.RunnerStart`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerStart {
    pub kind: StartKind,
    /// From the action's start in the runner until it could take the
    /// command.
    pub ready: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// Booted from nothing.
    Cold,
    /// A copy-on-write clone of a snapshot (a clean one, or a warm
    /// runner's).
    Clone,
    /// A paused runner woken.
    Resume,
    /// A runner saved to disk, restored (consumed).
    Restore,
    /// A clone of a runner snapshot another executor shared, fetched from
    /// the CAS.
    Fetched,
}

impl StartKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Cold => "cold",
            StartKind::Clone => "clone",
            StartKind::Resume => "resume",
            StartKind::Restore => "restore",
            StartKind::Fetched => "fetched",
        }
    }
}

#[async_trait]
pub trait Runner: Send + Sync + 'static {
    /// The `workload-isolation-type` this runner provides.
    fn isolation_type(&self) -> &'static str;

    /// Runs the command to completion, timeout or cancellation.
    async fn run(&self, spec: &RunSpec, cancel: CancellationToken) -> ExecResult<RunOutcome>;

    /// Affinity keys (see [`hearth_scheduler::affinity_key`]) of the warm
    /// runners this runner holds (paused or snapshotted), for the scheduler's
    /// preference. One entry per warm runner: a key may repeat.
    fn warm_keys(&self) -> Vec<String> {
        Vec::new()
    }

    /// Runner snapshots this runner stored in the CAS since the last call,
    /// for the server to hand to other executors.
    fn take_published(&self) -> Vec<SharedSnapshot> {
        Vec::new()
    }

    /// Called once when the executor stops, after the last action: a
    /// runner that keeps warm state saves it here.
    async fn shutdown(&self) {}
}
