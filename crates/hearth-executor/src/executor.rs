//! One action, start to finish: decode, materialize, run, collect, report.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hearth_proto::protobuf::Timestamp;
use hearth_proto::reapi::{Action, ActionResult, Command, ExecutedActionMetadata};
use hearth_proto::worker::{Assignment, Finished};
use hearth_scheduler::Platform;
use hearth_storage::Digest;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::error::{ExecError, ExecResult, IoContext};
use crate::materialize::materialize;
use crate::outputs;
use crate::runner::{RunSpec, Runner, SharedSnapshot};
use crate::LocalCas;

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub id: String,
    /// Workspaces live under `work_dir/actions`.
    pub work_dir: PathBuf,
    /// Applied when the Action sets no timeout.
    pub default_timeout: Duration,
    /// No action may run longer than this.
    pub max_timeout: Duration,
    /// The user and group that own the directories of each workspace (the
    /// user host actions run as), so that actions can write their outputs
    /// but never the input files, which stay the store's. None: the
    /// executor's own user.
    pub action_owner: Option<(u32, u32)>,
}

pub struct Executor {
    config: ExecutorConfig,
    cas: LocalCas,
    runners: HashMap<&'static str, Arc<dyn Runner>>,
    actions_dir: PathBuf,
    exec_cache: PathBuf,
}

fn timestamp(t: SystemTime) -> Option<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// Removes a workspace when the action is done with it, whatever happened.
struct Workspace(PathBuf);

impl Drop for Workspace {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.0);
        // Deleting a big input tree takes long; on a runtime thread it would
        // stall every task there (in `hearth up`, the server's too). So on a
        // runtime it goes to the blocking pool; the next action need not
        // wait for it, and a removal cut short by shutdown is redone by
        // `Executor::new`, which clears the actions directory.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || remove_workspace(&path))),
            Err(_) => remove_workspace(&path),
        }
    }
}

fn remove_workspace(path: &std::path::Path) {
    // Inputs are read-only hardlinks; removal only needs the directories writable.
    let _ = std::fs::remove_dir_all(path).or_else(|_| {
        make_dirs_writable(path);
        std::fs::remove_dir_all(path)
    });
}

fn make_dirs_writable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_dirs_writable(&e.path());
            }
        }
    }
}

impl Executor {
    pub fn new(
        config: ExecutorConfig,
        cas: LocalCas,
        runners: Vec<Arc<dyn Runner>>,
    ) -> ExecResult<Self> {
        let actions_dir = config.work_dir.join("actions");
        let exec_cache = config.work_dir.join("exec-cache");
        for dir in [&actions_dir, &exec_cache] {
            if dir.exists() {
                make_dirs_writable(dir);
                std::fs::remove_dir_all(dir).ctx(|| format!("clearing {}", dir.display()))?;
            }
            std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        Ok(Executor {
            runners: runners
                .into_iter()
                .map(|r| (r.isolation_type(), r))
                .collect(),
            config,
            cas,
            actions_dir,
            exec_cache,
        })
    }

    /// Lets every runner save its warm state; called once at shutdown,
    /// after the last action.
    pub async fn shutdown(&self) {
        for runner in self.runners.values() {
            runner.shutdown().await;
        }
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The isolation types this executor can run, for its hello.
    pub fn isolation_types(&self) -> Vec<String> {
        let mut v: Vec<String> = self.runners.keys().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    /// Affinity keys of the warm runners of all its runners (one entry per
    /// warm runner), for its hello and every Finished.
    /// Runner snapshots shared since the last call (for the next Finished
    /// or Report).
    pub fn take_published(&self) -> Vec<hearth_proto::worker::SharedSnapshot> {
        self.runners
            .values()
            .flat_map(|r| r.take_published())
            .map(|s| s.to_proto())
            .collect()
    }

    pub fn warm_keys(&self) -> Vec<String> {
        let mut v: Vec<String> = self.runners.values().flat_map(|r| r.warm_keys()).collect();
        v.sort();
        v
    }

    /// Runs an assignment; never fails, errors become the Finished status.
    /// The Finished carries the warm keys as they are once the action is done.
    pub async fn execute(&self, a: Assignment, cancel: CancellationToken) -> Finished {
        let op = a.operation_name.clone();
        let mut meta = ExecutedActionMetadata {
            worker: self.config.id.clone(),
            queued_timestamp: a.queued_at.as_ref().map(|t| Timestamp {
                seconds: t.seconds,
                nanos: t.nanos,
            }),
            worker_start_timestamp: timestamp(SystemTime::now()),
            // Which attempt produced this result (queued_timestamp is its
            // enqueue, not the first one's).
            auxiliary_metadata: vec![hearth_proto::protobuf::Any {
                type_url: hearth_proto::ATTEMPT_TYPE_URL.into(),
                value: hearth_proto::worker::Attempt {
                    number: a.attempt,
                    executor_id: self.config.id.clone(),
                }
                .encode_to_vec(),
            }],
            ..Default::default()
        };
        let outcome = self.run(&a, &mut meta, cancel).await;
        meta.worker_completed_timestamp = timestamp(SystemTime::now());
        match outcome {
            Ok((mut result, status)) => {
                result.execution_metadata = Some(meta);
                let (code, message) = status.unwrap_or((Code::Ok, String::new()));
                Finished {
                    operation_name: op,
                    action_result: result.encode_to_vec(),
                    status_code: code as i32,
                    status_message: message,
                    warm_keys: self.warm_keys(),
                    shared_snapshots: self.take_published(),
                    ..Default::default()
                }
            }
            Err(e) => {
                tracing::warn!(operation = %op, error = %e, "action failed");
                Finished {
                    operation_name: op,
                    action_result: vec![],
                    status_code: e.code() as i32,
                    status_message: e.to_string(),
                    warm_keys: self.warm_keys(),
                    shared_snapshots: self.take_published(),
                    missing_blobs: e
                        .missing_blobs()
                        .iter()
                        .map(|d| hearth_proto::worker::Digest {
                            hash: d.hash_hex(),
                            size_bytes: d.size() as i64,
                        })
                        .collect(),
                    ..Default::default()
                }
            }
        }
    }

    async fn run(
        &self,
        a: &Assignment,
        meta: &mut ExecutedActionMetadata,
        cancel: CancellationToken,
    ) -> ExecResult<(ActionResult, Option<(Code, String)>)> {
        let action = Action::decode(a.action.as_slice())
            .map_err(|e| ExecError::InvalidInput(format!("the Action does not decode: {e}")))?;
        let command = Command::decode(a.command.as_slice())
            .map_err(|e| ExecError::InvalidInput(format!("the Command does not decode: {e}")))?;
        let platform = Platform::from_protos(command.platform.as_ref(), action.platform.as_ref())
            .map_err(|e| ExecError::InvalidInput(e.to_string()))?;
        let runner = self.runners.get(platform.isolation()).ok_or_else(|| {
            ExecError::Precondition(format!(
                "this executor cannot run workload-isolation-type={} (it runs: {})",
                platform.isolation(),
                self.isolation_types().join(", ")
            ))
        })?;
        let root_digest =
            Digest::from_field(action.input_root_digest.as_ref(), "input_root_digest")
                .map_err(|e| ExecError::InvalidInput(e.to_string()))?;

        let ws = Workspace(self.actions_dir.join(uuid::Uuid::new_v4().to_string()));
        let input_root = ws.0.join("root");

        meta.input_fetch_start_timestamp = timestamp(SystemTime::now());
        let (root, cmd, owner) = (
            input_root.clone(),
            command.clone(),
            self.config.action_owner,
        );
        materialize(
            &self.cas,
            root_digest,
            &input_root,
            &self.exec_cache,
            self.config.action_owner,
            move || outputs::prepare(&root, &cmd, owner),
        )
        .await?;
        meta.input_fetch_completed_timestamp = timestamp(SystemTime::now());

        let timeout = action
            .timeout
            .as_ref()
            .map(|t| Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(self.config.default_timeout)
            .min(self.config.max_timeout);
        let spec = RunSpec {
            instance_name: a.instance_name.clone(),
            tenant: a.tenant.clone(),
            input_root: input_root.clone(),
            // Normalized (no `.` or `..`); prepare made every component a real
            // directory, so the runner may use it as a plain path.
            working_directory: outputs::working_directory(&command)?.join("/"),
            output_paths: outputs::declared_paths(&command)
                .map(|p| outputs::resolve(&command, p).map(|parts| parts.join("/")))
                .collect::<ExecResult<_>>()?,
            arguments: command.arguments.clone(),
            environment: command
                .environment_variables
                .iter()
                .map(|v| (v.name.clone(), v.value.clone()))
                .collect(),
            timeout,
            stdout_path: ws.0.join("stdout"),
            stderr_path: ws.0.join("stderr"),
            platform,
            shared_snapshot: a
                .shared_snapshot
                .as_ref()
                .and_then(SharedSnapshot::from_proto),
        };
        meta.execution_start_timestamp = timestamp(SystemTime::now());
        let outcome = runner.run(&spec, cancel).await?;
        meta.execution_completed_timestamp = timestamp(SystemTime::now());
        if let Some(start) = &outcome.start {
            meta.auxiliary_metadata.push(hearth_proto::protobuf::Any {
                type_url: hearth_proto::RUNNER_START_TYPE_URL.into(),
                value: hearth_proto::worker::RunnerStart {
                    kind: start.kind.as_str().into(),
                    ready_millis: start.ready.as_millis().min(u64::MAX as u128) as u64,
                }
                .encode_to_vec(),
            });
        }

        meta.output_upload_start_timestamp = timestamp(SystemTime::now());
        let collected = outputs::collect(
            self.cas.local().clone(),
            input_root.clone(),
            command,
            spec.stdout_path.clone(),
            spec.stderr_path.clone(),
            outcome.timed_out,
        )
        .await?;
        self.cas.push(&collected.stored).await?;
        let result = ActionResult {
            exit_code: outcome.exit_code,
            ..collected.result
        };
        meta.output_upload_completed_timestamp = timestamp(SystemTime::now());

        let status = outcome.timed_out.then(|| {
            (
                Code::DeadlineExceeded,
                format!(
                    "the action timed out after {:.1}s and was killed",
                    timeout.as_secs_f64()
                ),
            )
        });
        Ok((result, status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::RunOutcome;
    use async_trait::async_trait;
    use hearth_storage::DiskStore;

    /// A runner that only reports warm keys.
    struct Warm(&'static str, Vec<String>);

    #[async_trait]
    impl Runner for Warm {
        fn isolation_type(&self) -> &'static str {
            self.0
        }
        async fn run(&self, _: &RunSpec, _: CancellationToken) -> ExecResult<RunOutcome> {
            Err(ExecError::Internal("not used".into()))
        }
        fn warm_keys(&self) -> Vec<String> {
            self.1.clone()
        }
    }

    fn test_config(dir: &std::path::Path) -> ExecutorConfig {
        ExecutorConfig {
            id: "e".into(),
            work_dir: dir.join("work"),
            default_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(10),
            action_owner: None,
        }
    }

    #[tokio::test]
    async fn finished_reports_the_warm_keys_of_every_runner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(&dir.path().join("cas"), 0).unwrap());
        let runners: Vec<Arc<dyn Runner>> = vec![
            Arc::new(Warm("none", vec![])),
            Arc::new(Warm(
                "firecracker",
                vec!["k2".into(), "k1".into(), "k2".into()],
            )),
        ];
        let config = test_config(dir.path());
        let exec = Executor::new(config, LocalCas::shared(store), runners).unwrap();
        assert_eq!(exec.warm_keys(), ["k1", "k2", "k2"]);
        let bad = Assignment {
            operation_name: "op".into(),
            action: b"\xff".to_vec(),
            ..Default::default()
        };
        let f = exec.execute(bad, CancellationToken::new()).await;
        assert_ne!(f.status_code, 0, "the undecodable action fails");
        assert_eq!(f.warm_keys, ["k1", "k2", "k2"]);
    }

    fn workspace_with_read_only_inputs(dir: &std::path::Path) -> Workspace {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("ws");
        std::fs::create_dir_all(path.join("root/sub")).unwrap();
        std::fs::write(path.join("root/sub/input"), b"x").unwrap();
        std::fs::set_permissions(
            path.join("root/sub"),
            std::fs::Permissions::from_mode(0o555),
        )
        .unwrap();
        Workspace(path)
    }

    /// On a runtime, a dropped workspace is removed on the blocking pool,
    /// read-only directories and all.
    #[tokio::test(flavor = "current_thread")]
    async fn a_dropped_workspace_is_removed_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ws");
        drop(workspace_with_read_only_inputs(dir.path()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while path.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "workspace not removed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Outside a runtime (no blocking pool), it is removed at once.
    #[test]
    fn a_workspace_dropped_outside_a_runtime_is_removed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        drop(workspace_with_read_only_inputs(dir.path()));
        assert!(!dir.path().join("ws").exists());
    }

    /// An input that is not in the CAS (evicted, or never uploaded) comes
    /// back named, so the server can tell the client what to upload.
    #[tokio::test]
    async fn a_missing_input_is_reported_by_digest() {
        use hearth_proto::reapi::{Action, Command as ReCommand};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(&dir.path().join("cas"), 0).unwrap());
        let config = test_config(dir.path());
        let runners: Vec<Arc<dyn Runner>> = vec![Arc::new(Warm("none", vec![]))];
        let exec = Executor::new(config, LocalCas::shared(store), runners).unwrap();
        let root = Digest::of(b"a Directory nobody uploaded");
        let action = Action {
            input_root_digest: Some(root.to_proto()),
            ..Default::default()
        };
        let command = ReCommand {
            arguments: vec!["true".into()],
            ..Default::default()
        };
        let a = Assignment {
            operation_name: "op".into(),
            action: action.encode_to_vec(),
            command: command.encode_to_vec(),
            ..Default::default()
        };
        let f = exec.execute(a, CancellationToken::new()).await;
        assert_eq!(
            f.status_code,
            Code::FailedPrecondition as i32,
            "{}",
            f.status_message
        );
        assert_eq!(
            f.missing_blobs,
            [hearth_proto::worker::Digest {
                hash: root.hash_hex(),
                size_bytes: root.size() as i64
            }]
        );
    }
}
