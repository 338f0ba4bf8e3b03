//! What the scheduler knows about one connected executor, and matching an
//! action's platform against it.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::platform::{Platform, ARCH, ISOLATION, OS_FAMILY, POOL};

/// What an executor announced when it connected.
#[derive(Debug, Clone)]
pub struct ExecutorInfo {
    pub id: String,
    pub description: String,
    /// Lowercase names → values (Pool, OSFamily, Arch, …).
    pub properties: BTreeMap<String, String>,
    pub isolation_types: Vec<String>,
    pub capacity: u32,
    /// Why it offers no microVMs; empty when it does.
    pub vm_unavailable: String,
}

impl ExecutorInfo {
    /// Why this executor can never run an action with `platform`, or `None`
    /// if it can. The reason names the property.
    pub fn mismatch(&self, platform: &Platform) -> Option<String> {
        let iso = platform.isolation();
        if !self.isolation_types.iter().any(|t| t == iso) {
            let why_no_vms = if iso == "firecracker" && !self.vm_unavailable.is_empty() {
                format!(
                    "; microVMs unavailable on {}: {}",
                    self.id, self.vm_unavailable
                )
            } else {
                String::new()
            };
            return Some(format!(
                "{ISOLATION}={iso} (executors support: {}{why_no_vms})",
                self.isolation_types.join(", ")
            ));
        }
        for (key, label) in [(POOL, "Pool"), (OS_FAMILY, "OSFamily"), (ARCH, "Arch")] {
            let wanted = platform.get(key).unwrap_or("");
            let have = self.properties.get(key).map(String::as_str).unwrap_or("");
            // An action without a Pool goes to the default pool only; OSFamily
            // and Arch constrain only when the action names them.
            let matches = if key == POOL {
                wanted == have
            } else {
                wanted.is_empty() || wanted.eq_ignore_ascii_case(have)
            };
            if !matches {
                return Some(format!(
                    "{label}={wanted:?} (executors have {label}={have:?})"
                ));
            }
        }
        None
    }
}

/// Live state of a connected executor inside the scheduler.
pub(crate) struct Executor {
    pub info: ExecutorInfo,
    /// The key it authenticated with (empty without API keys).
    pub owner: String,
    /// It refused an assignment as over its capacity: it gets nothing more
    /// until one of its actions ends.
    pub saturated: bool,
    /// It said it is shutting down.
    pub leaving: bool,
    pub session: u64,
    /// Operations it runs for a live job → the sequence number of their
    /// assignment (0 once the executor itself has reported them).
    pub running: HashMap<String, u64>,
    /// Operations it still runs whose job is gone (cancelled, or given to
    /// another executor while this one was away) → sequence as above. They
    /// hold their slots until the executor confirms they ended; their
    /// results are ignored.
    pub draining: HashMap<String, u64>,
    /// The last assignment sequence number of this session.
    pub sequence: u64,
    pub connected_at: Instant,
    /// When it last sent anything.
    pub last_heard: Instant,
    /// Its session broke at this time: it gets no work, and its running
    /// jobs wait out the reconnect grace period before they are re-queued.
    pub disconnected_at: Option<Instant>,
    pub sender: tokio::sync::mpsc::UnboundedSender<hearth_proto::worker::ServerMessage>,
    /// Affinity keys of its warm runners → how many it holds, as of its
    /// last report, less those the scheduler has since sent work to.
    pub warm: HashMap<String, u32>,
}

impl Executor {
    pub fn new(
        info: ExecutorInfo,
        owner: &str,
        session: u64,
        sender: tokio::sync::mpsc::UnboundedSender<hearth_proto::worker::ServerMessage>,
    ) -> Self {
        let now = Instant::now();
        Executor {
            info,
            owner: owner.to_string(),
            saturated: false,
            leaving: false,
            session,
            running: HashMap::new(),
            draining: HashMap::new(),
            sequence: 0,
            connected_at: now,
            last_heard: now,
            disconnected_at: None,
            sender,
            warm: HashMap::new(),
        }
    }

    /// Slots taken: by live jobs and by work still draining.
    pub fn busy(&self) -> u32 {
        (self.running.len() + self.draining.len()) as u32
    }

    pub fn free_slots(&self) -> u32 {
        if self.saturated || self.leaving || self.disconnected_at.is_some() {
            return 0;
        }
        self.info.capacity.saturating_sub(self.busy())
    }

    /// Whether it can take an action with `platform` now: a free slot, and
    /// nothing in the platform it lacks.
    pub fn can_take(&self, platform: &crate::Platform) -> bool {
        self.free_slots() > 0 && self.info.mismatch(platform).is_none()
    }

    /// Replaces the warm set with a report (one entry per warm runner).
    pub fn set_warm(&mut self, keys: Vec<String>) {
        self.warm.clear();
        for k in keys {
            *self.warm.entry(k).or_default() += 1;
        }
    }

    pub fn holds_warm(&self, key: &str) -> bool {
        self.warm.contains_key(key)
    }

    /// Counts one warm runner with `key` as taken by work just sent.
    pub fn take_warm(&mut self, key: &str) {
        if let Some(n) = self.warm.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.warm.remove(key);
            }
        }
    }

    pub fn warm_runners(&self) -> u32 {
        self.warm.values().sum()
    }
}

/// Warm runners (pooled or saved) of one affinity key on an executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmKey {
    pub affinity_key: String,
    pub count: u32,
    /// A snapshot of the key is shared through the CAS too.
    pub shared: bool,
}

/// A copy of an executor's state for `hearth status`.
#[derive(Debug, Clone)]
pub struct ExecutorSnapshot {
    pub info: ExecutorInfo,
    pub running: u32,
    pub connected_seconds: u64,
    /// Warm runners it holds, as the scheduler believes.
    pub warm_runners: u32,
    /// The same by affinity key, most first.
    pub warm_keys: Vec<WarmKey>,
    /// Its session broke; the scheduler waits for it to come back.
    pub reconnecting: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(props: &[(&str, &str)], iso: &[&str]) -> ExecutorInfo {
        ExecutorInfo {
            id: "e".into(),
            description: String::new(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_lowercase(), v.to_string()))
                .collect(),
            isolation_types: iso.iter().map(|s| s.to_string()).collect(),
            capacity: 1,
            vm_unavailable: String::new(),
        }
    }

    #[test]
    fn matching_rules() {
        let linux = exec(&[("OSFamily", "Linux"), ("Arch", "x86_64")], &["none"]);
        assert!(linux.mismatch(&Platform::default()).is_none());
        assert!(linux
            .mismatch(&Platform::from_pairs([("OSFamily", "linux")]))
            .is_none());
        let why = linux
            .mismatch(&Platform::from_pairs([(
                "workload-isolation-type",
                "firecracker",
            )]))
            .unwrap();
        assert!(why.contains("workload-isolation-type=firecracker"), "{why}");
        let no_kvm = ExecutorInfo {
            vm_unavailable: "no guest kernel in /k".into(),
            ..linux.clone()
        };
        let why = no_kvm
            .mismatch(&Platform::from_pairs([(
                "workload-isolation-type",
                "firecracker",
            )]))
            .unwrap();
        assert!(
            why.contains("microVMs unavailable on e: no guest kernel in /k"),
            "the reason says why there are no VMs: {why}"
        );
        let why = linux
            .mismatch(&Platform::from_pairs([("Pool", "gpu")]))
            .unwrap();
        assert!(why.contains("Pool"), "{why}");
        let gpu = exec(&[("Pool", "gpu")], &["none"]);
        assert!(
            gpu.mismatch(&Platform::default()).is_some(),
            "default-pool work stays off named pools"
        );
        assert!(gpu
            .mismatch(&Platform::from_pairs([("pool", "gpu")]))
            .is_none());
    }
}
