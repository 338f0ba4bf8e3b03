//! The newest runner snapshot each affinity key has in the CAS, as
//! executors report them (issue 11): handed out with the key's jobs, so an
//! executor with no warm runner of its own for the key can start from it.
//! Bounded; an executor's word is trusted as far as its results are, but
//! its sizes are checked.

use std::collections::HashMap;

use hearth_proto::worker::SharedSnapshot;

/// Most affinity keys remembered (the least recently reported go first).
const MAX_KEYS: usize = 10_000;
/// Longest key accepted (affinity keys are a hash, runner keys one more).
const MAX_KEY_LEN: usize = 1024;

#[derive(Default)]
pub(crate) struct SnapshotIndex {
    by_key: HashMap<String, (SharedSnapshot, u64)>,
    clock: u64,
}

impl SnapshotIndex {
    /// Takes in a reported snapshot (one without a manifest withdraws the
    /// key's); false if it is malformed (ignored).
    pub fn note(&mut self, s: SharedSnapshot) -> bool {
        let well_formed = !s.affinity_key.is_empty()
            && s.affinity_key.len() <= MAX_KEY_LEN
            && s.runner_key.len() <= MAX_KEY_LEN
            && s.runner_key.starts_with(&format!("{}.", s.affinity_key))
            && s.manifest
                .as_ref()
                .is_none_or(|d| d.size_bytes > 0 && d.hash.len() == 64);
        if !well_formed {
            return false;
        }
        if s.manifest.is_none() {
            self.by_key.remove(&s.affinity_key);
            return true;
        }
        self.clock += 1;
        self.by_key.insert(s.affinity_key.clone(), (s, self.clock));
        if self.by_key.len() > MAX_KEYS {
            if let Some(oldest) = self
                .by_key
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                self.by_key.remove(&oldest);
            }
        }
        true
    }

    pub fn get(&self, affinity_key: &str) -> Option<&SharedSnapshot> {
        self.by_key.get(affinity_key).map(|(s, _)| s)
    }

    /// The `n` most recently reported.
    pub fn newest(&self, n: usize) -> Vec<SharedSnapshot> {
        let mut all: Vec<&(SharedSnapshot, u64)> = self.by_key.values().collect();
        all.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
        all.into_iter().take(n).map(|(s, _)| s.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::worker::Digest;

    fn snap(affinity: &str, runner: &str, hash: char) -> SharedSnapshot {
        SharedSnapshot {
            affinity_key: affinity.into(),
            runner_key: runner.into(),
            manifest: Some(Digest {
                hash: hash.to_string().repeat(64),
                size_bytes: 10,
            }),
        }
    }

    #[test]
    fn the_newest_report_of_a_key_wins_and_malformed_ones_are_ignored() {
        let mut idx = SnapshotIndex::default();
        assert!(idx.note(snap("k", "k.1", 'a')));
        assert!(idx.note(snap("k", "k.2", 'b')));
        assert_eq!(idx.get("k").unwrap().runner_key, "k.2");
        assert!(
            !idx.note(snap("k", "other.1", 'c')),
            "runner key of another affinity key"
        );
        assert!(!idx.note(snap("", ".1", 'c')));
        assert!(!idx.note(snap(
            &"x".repeat(2000),
            &format!("{}.1", "x".repeat(2000)),
            'c'
        )));
        let mut bad_digest = snap("j", "j.1", 'c');
        if let Some(d) = bad_digest.manifest.as_mut() {
            d.hash = "short".into();
        }
        assert!(!idx.note(bad_digest));
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.get("k").unwrap().runner_key, "k.2");
        assert!(idx.note(snap("j", "j.1", 'd')));
        let newest: Vec<String> = idx.newest(5).into_iter().map(|s| s.affinity_key).collect();
        assert_eq!(newest, ["j", "k"]);
        let mut withdrawn = snap("j", "j.1", 'd');
        withdrawn.manifest = None;
        assert!(idx.note(withdrawn));
        assert!(idx.get("j").is_none(), "withdrawn");
        assert!(idx.get("k").is_some());
    }

    #[test]
    fn the_index_is_bounded() {
        let mut idx = SnapshotIndex::default();
        for i in 0..MAX_KEYS + 5 {
            assert!(idx.note(snap(&format!("k{i}"), &format!("k{i}.x"), 'a')));
        }
        assert_eq!(idx.len(), MAX_KEYS);
        assert!(idx.get("k0").is_none(), "the least recent went");
        assert!(idx.get(&format!("k{}", MAX_KEYS + 4)).is_some());
    }
}
