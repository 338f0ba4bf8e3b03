//! Recent executions, newest first, for operators (the web view): a ring
//! of at most [`HISTORY_CAPACITY`] records, each bounded in size, so a busy
//! server holds a fixed amount however many actions it runs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_proto::protobuf::Timestamp;
use hearth_proto::reapi::{ActionResult, Command, ExecuteResponse};
use hearth_proto::worker::RunnerStart;
use hearth_storage::Digest;
use prost::Message;

/// How many executions are kept.
pub const HISTORY_CAPACITY: usize = 10_000;
/// Most output files and directories a record keeps (the rest are counted).
pub const MAX_KEPT_OUTPUTS: usize = 100;
/// Most bytes of the command line a record keeps.
pub const MAX_KEPT_ARGUMENT_BYTES: usize = 2048;

/// One finished operation as an operator sees it.
#[derive(Debug, Clone)]
pub struct ExecutionRecord {
    /// What was known of it before it finished.
    pub base: RecordBase,
    pub finished_at: SystemTime,
    /// Answered from the action cache without running.
    pub cached: bool,
    /// The gRPC code of the operation's status (0 when it ran to an exit
    /// code) and its message.
    pub status_code: i32,
    pub status_message: String,
    /// The result, its outputs cut to [`MAX_KEPT_OUTPUTS`].
    pub result: Option<ActionResult>,
    /// Outputs (files, symlinks, directories) the result had in all.
    pub outputs_total: usize,
}

/// A protobuf timestamp as a time, if it is a real one (after 1970).
pub fn to_system(t: &Timestamp) -> Option<SystemTime> {
    if t.seconds <= 0 {
        return None;
    }
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(u64::try_from(t.seconds).ok()?, nanos))
}

/// From `a` to `b`, when both are set and in order.
fn span(a: Option<&Timestamp>, b: Option<&Timestamp>) -> Option<Duration> {
    to_system(b?)?.duration_since(to_system(a?)?).ok()
}

/// The stages of ExecutedActionMetadata; any may be unknown (a cache hit,
/// or an executor that did not say).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    /// Queued until a worker took it.
    pub queued: Option<Duration>,
    pub input_fetch: Option<Duration>,
    /// The runner's whole run, its start (VM boot, clone, resume) included.
    pub execution: Option<Duration>,
    pub output_upload: Option<Duration>,
    /// The executor's whole handling, from taking the job to its result:
    /// the three stages above and what lies between them (the workspace
    /// made, the result assembled).
    pub worker: Option<Duration>,
}

impl Stages {
    /// Each stage by its `/metrics` label.
    pub fn named(&self) -> [(&'static str, Option<Duration>); 5] {
        [
            ("queued", self.queued),
            ("input_fetch", self.input_fetch),
            ("execution", self.execution),
            ("output_upload", self.output_upload),
            ("worker", self.worker),
        ]
    }
}

impl ExecutionRecord {
    /// Where its time went, from the result's metadata.
    pub fn stages(&self) -> Stages {
        let Some(m) = self
            .result
            .as_ref()
            .and_then(|r| r.execution_metadata.as_ref())
        else {
            return Stages::default();
        };
        Stages {
            queued: span(
                m.queued_timestamp.as_ref(),
                m.worker_start_timestamp.as_ref(),
            ),
            input_fetch: span(
                m.input_fetch_start_timestamp.as_ref(),
                m.input_fetch_completed_timestamp.as_ref(),
            ),
            execution: span(
                m.execution_start_timestamp.as_ref(),
                m.execution_completed_timestamp.as_ref(),
            ),
            output_upload: span(
                m.output_upload_start_timestamp.as_ref(),
                m.output_upload_completed_timestamp.as_ref(),
            ),
            worker: span(
                m.worker_start_timestamp.as_ref(),
                m.worker_completed_timestamp.as_ref(),
            ),
        }
    }

    pub fn exit_code(&self) -> Option<i32> {
        self.result.as_ref().map(|r| r.exit_code)
    }

    /// How the runner started (cold, clone, resume, restore, fetched) and
    /// how long it took to be ready, when the executor said.
    pub fn runner_start(&self) -> Option<RunnerStart> {
        let meta = self.result.as_ref()?.execution_metadata.as_ref()?;
        meta.auxiliary_metadata
            .iter()
            .find(|a| a.type_url == hearth_proto::RUNNER_START_TYPE_URL)
            .and_then(|a| RunnerStart::decode(a.value.as_slice()).ok())
    }

    /// Whether it ended well: an exit code of 0 with an OK status.
    pub fn succeeded(&self) -> bool {
        self.status_code == 0 && self.exit_code() == Some(0)
    }

    // The deprecated symlink lists are still sent by older executors.
    #[allow(deprecated)]
    pub fn new(base: RecordBase, response: &ExecuteResponse) -> Self {
        let status = response.status.clone().unwrap_or_default();
        let mut result = response.result.clone();
        let mut outputs_total = 0;
        if let Some(r) = result.as_mut() {
            outputs_total = r.output_files.len()
                + r.output_symlinks.len()
                + r.output_directories.len()
                + r.output_file_symlinks.len()
                + r.output_directory_symlinks.len();
            r.output_files.truncate(MAX_KEPT_OUTPUTS);
            r.output_symlinks.truncate(MAX_KEPT_OUTPUTS);
            r.output_directories.truncate(MAX_KEPT_OUTPUTS);
            r.output_file_symlinks.truncate(MAX_KEPT_OUTPUTS);
            r.output_directory_symlinks.truncate(MAX_KEPT_OUTPUTS);
            r.stdout_raw.clear();
            r.stderr_raw.clear();
        }
        ExecutionRecord {
            base,
            finished_at: SystemTime::now(),
            cached: response.cached_result,
            status_code: status.code,
            status_message: status.message,
            result,
            outputs_total,
        }
    }
}

/// What is known of an operation before its response.
#[derive(Debug, Clone)]
pub struct RecordBase {
    pub operation_name: String,
    pub tenant: String,
    pub instance_name: String,
    pub action_digest: Digest,
    /// The command line, cut to [`MAX_KEPT_ARGUMENT_BYTES`]; empty for a
    /// cache hit (its Command is not read).
    pub arguments: Vec<String>,
    /// The action's platform properties as it named them, secrets redacted.
    pub platform: Vec<(String, String)>,
    pub isolation: String,
    /// The executor of its last attempt, if it ran.
    pub executor: Option<String>,
    pub attempts: u32,
    pub queued_at: SystemTime,
}

/// The arguments of an encoded Command, cut to [`MAX_KEPT_ARGUMENT_BYTES`].
pub(crate) fn arguments_of(command: &[u8]) -> Vec<String> {
    let Ok(cmd) = Command::decode(command) else {
        return vec![];
    };
    let mut kept = Vec::new();
    let mut bytes = 0;
    for arg in cmd.arguments {
        if bytes + arg.len() > MAX_KEPT_ARGUMENT_BYTES {
            let room = MAX_KEPT_ARGUMENT_BYTES.saturating_sub(bytes);
            let mut cut = room.min(arg.len());
            while !arg.is_char_boundary(cut) {
                cut -= 1;
            }
            kept.push(format!("{}…", &arg[..cut]));
            break;
        }
        bytes += arg.len();
        kept.push(arg);
    }
    kept
}

/// Which records a reader wants.
#[derive(Debug, Default, Clone)]
pub struct HistoryFilter {
    /// Only this tenant's (None: every tenant's).
    pub tenant: Option<String>,
    pub instance_name: Option<String>,
    /// `ok`, `failed` or `cached`.
    pub status: Option<String>,
}

impl HistoryFilter {
    fn admits(&self, r: &ExecutionRecord) -> bool {
        self.tenant.as_ref().is_none_or(|t| &r.base.tenant == t)
            && self
                .instance_name
                .as_ref()
                .is_none_or(|i| &r.base.instance_name == i)
            && match self.status.as_deref() {
                Some("ok") => r.succeeded(),
                Some("failed") => !r.succeeded(),
                Some("cached") => r.cached,
                _ => true,
            }
    }
}

/// The ring of recent executions.
pub struct History {
    ring: Mutex<VecDeque<Arc<ExecutionRecord>>>,
    capacity: usize,
}

impl Default for History {
    fn default() -> Self {
        History::with_capacity(HISTORY_CAPACITY)
    }
}

impl History {
    pub fn with_capacity(capacity: usize) -> Self {
        History {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<ExecutionRecord>>> {
        // A panic while holding it leaves a consistent ring (each change is
        // one push or pop): keep using it.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record(&self, record: ExecutionRecord) {
        let mut ring = self.lock();
        if ring.len() == self.capacity {
            ring.pop_back();
        }
        ring.push_front(Arc::new(record));
    }

    /// The newest records the filter admits, at most `limit`, skipping the
    /// first `skip` of them; and how many it admits in all.
    pub fn recent(
        &self,
        filter: &HistoryFilter,
        skip: usize,
        limit: usize,
    ) -> (Vec<Arc<ExecutionRecord>>, usize) {
        let ring = self.lock();
        let mut total = 0;
        let mut page = Vec::with_capacity(limit.min(ring.len()));
        for r in ring.iter().filter(|r| filter.admits(r)) {
            if total >= skip && page.len() < limit {
                page.push(r.clone());
            }
            total += 1;
        }
        (page, total)
    }

    /// The record of one operation, if kept and the tenant's (None: anyone's).
    pub fn find(&self, name: &str, tenant: Option<&str>) -> Option<Arc<ExecutionRecord>> {
        self.lock()
            .iter()
            .find(|r| r.base.operation_name == name && tenant.is_none_or(|t| r.base.tenant == t))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::reapi::OutputFile;

    fn base(name: &str, tenant: &str) -> RecordBase {
        RecordBase {
            operation_name: name.into(),
            tenant: tenant.into(),
            instance_name: String::new(),
            action_digest: Digest::of(name.as_bytes()),
            arguments: vec!["/bin/true".into()],
            platform: vec![],
            isolation: "none".into(),
            executor: Some("e1".into()),
            attempts: 1,
            queued_at: SystemTime::now(),
        }
    }

    fn ran(exit_code: i32) -> ExecuteResponse {
        ExecuteResponse {
            result: Some(ActionResult {
                exit_code,
                ..Default::default()
            }),
            status: Some(Default::default()),
            ..Default::default()
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_filters() {
        let h = History::with_capacity(3);
        for (i, code) in [0, 1, 0, 2].into_iter().enumerate() {
            let tenant = if i % 2 == 0 { "a" } else { "b" };
            h.record(ExecutionRecord::new(
                base(&format!("op{i}"), tenant),
                &ran(code),
            ));
        }
        let (all, n) = h.recent(&HistoryFilter::default(), 0, 10);
        assert_eq!(n, 3, "the oldest fell out");
        let names: Vec<_> = all.iter().map(|r| r.base.operation_name.as_str()).collect();
        assert_eq!(names, ["op3", "op2", "op1"]);
        let failed = HistoryFilter {
            status: Some("failed".into()),
            ..Default::default()
        };
        let (f, n) = h.recent(&failed, 0, 10);
        assert_eq!(n, 2);
        assert!(f.iter().all(|r| r.exit_code() != Some(0)));
        let mine = HistoryFilter {
            tenant: Some("a".into()),
            ..Default::default()
        };
        let (a, _) = h.recent(&mine, 0, 10);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].base.operation_name, "op2");
        assert!(
            h.find("op1", Some("a")).is_none(),
            "b's record, hidden from a"
        );
        assert!(h.find("op1", Some("b")).is_some());
        let (page, total) = h.recent(&HistoryFilter::default(), 1, 1);
        assert_eq!((page[0].base.operation_name.as_str(), total), ("op2", 3));
    }

    #[test]
    fn stages_need_both_ends_in_order() {
        let at = |s: i64, ms: i32| {
            Some(Timestamp {
                seconds: s,
                nanos: ms * 1_000_000,
            })
        };
        let mut response = ran(0);
        response.result.as_mut().unwrap().execution_metadata =
            Some(hearth_proto::reapi::ExecutedActionMetadata {
                queued_timestamp: at(100, 0),
                worker_start_timestamp: at(100, 250),
                input_fetch_start_timestamp: at(101, 0),
                input_fetch_completed_timestamp: at(100, 0),
                execution_start_timestamp: at(0, 0),
                execution_completed_timestamp: at(102, 0),
                output_upload_start_timestamp: at(102, 0),
                worker_completed_timestamp: at(102, 500),
                ..Default::default()
            });
        let stages = ExecutionRecord::new(base("op", "a"), &response).stages();
        assert_eq!(
            stages,
            Stages {
                queued: Some(Duration::from_millis(250)),
                input_fetch: None,   // ends before it starts
                execution: None,     // no start
                output_upload: None, // no end
                worker: Some(Duration::from_millis(2250)),
            }
        );
        assert_eq!(
            ExecutionRecord::new(base("op", "a"), &ran(0)).stages(),
            Stages::default()
        );
    }

    #[test]
    fn a_record_is_bounded_whatever_the_action_sent() {
        let huge = Command {
            arguments: vec!["x".repeat(10_000), "y".into()],
            ..Default::default()
        };
        let args = arguments_of(&huge.encode_to_vec());
        assert_eq!(args.len(), 1);
        assert!(args[0].len() <= MAX_KEPT_ARGUMENT_BYTES + '…'.len_utf8());
        assert!(arguments_of(b"\xff not a command").is_empty());
        let mut response = ran(0);
        let files = (0..1000)
            .map(|i| OutputFile {
                path: format!("f{i}"),
                ..Default::default()
            })
            .collect();
        response.result.as_mut().unwrap().output_files = files;
        response.result.as_mut().unwrap().stdout_raw = vec![b'o'; 1 << 20];
        let r = ExecutionRecord::new(base("op", "a"), &response);
        let kept = r.result.as_ref().unwrap();
        assert_eq!(kept.output_files.len(), MAX_KEPT_OUTPUTS);
        assert!(kept.stdout_raw.is_empty(), "inline stdout is not kept");
        assert_eq!(r.outputs_total, 1000);
    }
}
