//! Which tenant may read which blob: a tenant reads a blob only if it
//! uploaded it (proving it had the bytes) or an execution of its own
//! produced it. The bytes themselves are stored once whoever uploads them
//! (content addressing still deduplicates on disk); this index only says
//! who may see them.
//!
//! Kept in memory, one set per tenant, and appended to one log per tenant
//! under `DIR/owners/` (40-byte records: hash, size) by a background thread,
//! so that granting never blocks the caller on disk. A grant lost in a crash
//! only makes the blob look missing to that tenant, which uploads it again:
//! losing a record can hide a blob, never reveal one. Blobs evicted from the
//! store keep their records (the store's own answer still says they are
//! missing); the logs are compacted to what the sets hold at each start.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest as _, Sha256};

use crate::error::IoContext;
use crate::{Digest, StoreResult};

const RECORD: usize = 40;

fn log_name(tenant: &str) -> String {
    format!("{}.log", hex::encode(Sha256::digest(tenant.as_bytes())))
}

enum Msg {
    Append(String, Vec<Digest>),
    #[cfg(test)]
    Flush(mpsc::Sender<()>),
}

pub struct Owners {
    sets: Mutex<HashMap<String, HashSet<Digest>>>,
    writer: Mutex<mpsc::Sender<Msg>>,
}

fn record(d: &Digest) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..32].copy_from_slice(d.hash());
    r[32..].copy_from_slice(&d.size().to_le_bytes());
    r
}

fn read_log(path: &Path) -> StoreResult<HashSet<Digest>> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .ctx(|| format!("reading {}", path.display()))?;
    // A record cut short by a crash is dropped.
    Ok(bytes
        .chunks_exact(RECORD)
        .map(|r| {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&r[..32]);
            let mut size = [0u8; 8];
            size.copy_from_slice(&r[32..]);
            Digest::new(hash, u64::from_le_bytes(size))
        })
        .collect())
}

/// The one rule: a tenant reads the empty blob and what its set holds.
fn readable(set: Option<&HashSet<Digest>>, d: &Digest) -> bool {
    *d == Digest::empty() || set.is_some_and(|s| s.contains(d))
}

impl Owners {
    /// Loads (and compacts) the logs under `dir/owners`. Each log starts
    /// with its tenant's name on one line.
    pub fn open(dir: &Path) -> StoreResult<Owners> {
        let dir = dir.join("owners");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut sets = HashMap::new();
        let names = fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))?;
        for entry in names {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tenant") {
                let tenant =
                    fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
                let log = dir.join(log_name(&tenant));
                let set = if log.exists() {
                    read_log(&log)?
                } else {
                    HashSet::new()
                };
                let mut out = BufWriter::new(
                    fs::File::create(&log).ctx(|| format!("compacting {}", log.display()))?,
                );
                for d in &set {
                    out.write_all(&record(d))
                        .ctx(|| format!("compacting {}", log.display()))?;
                }
                out.flush()
                    .ctx(|| format!("compacting {}", log.display()))?;
                sets.insert(tenant, set);
            }
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("hearth-owners".into())
            .spawn(move || write_logs(&dir, rx))
            .ctx(|| "starting the ownership log writer".into())?;
        Ok(Owners {
            sets: Mutex::new(sets),
            writer: Mutex::new(tx),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashSet<Digest>>> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `tenant` may read `d` (everyone may read the empty blob).
    pub fn owns(&self, tenant: &str, d: &Digest) -> bool {
        readable(self.lock().get(tenant), d)
    }

    /// `digests` split into those `tenant` may read and those it may not,
    /// in one pass under the lock.
    pub fn partition(&self, tenant: &str, digests: &[Digest]) -> (Vec<Digest>, Vec<Digest>) {
        let sets = self.lock();
        let set = sets.get(tenant);
        digests.iter().partition(|d| readable(set, d))
    }

    /// Lets `tenant` read `digests` from now on.
    pub fn grant(&self, tenant: &str, digests: &[Digest]) {
        let fresh: Vec<Digest> = {
            let mut sets = self.lock();
            let set = sets.entry(tenant.to_string()).or_default();
            digests
                .iter()
                .filter(|d| set.insert(**d))
                .copied()
                .collect()
        };
        if !fresh.is_empty() {
            let tx = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(Msg::Append(tenant.to_string(), fresh));
        }
    }

    /// Waits until every grant so far is written.
    #[cfg(test)]
    fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        let _ = self.writer.lock().unwrap().send(Msg::Flush(tx));
        let _ = rx.recv();
    }
}

/// Which tenant may read which blob, wherever that is kept: [`Owners`] on
/// the local disk, or `RedisOwners` shared by every replica.
#[async_trait::async_trait]
pub trait Ownership: Send + Sync {
    /// `digests` split into those `tenant` may read and those it may not.
    async fn partition(
        &self,
        tenant: &str,
        digests: &[Digest],
    ) -> StoreResult<(Vec<Digest>, Vec<Digest>)>;

    /// Lets `tenant` read `digests` from now on.
    async fn grant(&self, tenant: &str, digests: &[Digest]) -> StoreResult<()>;

    /// Whether `tenant` may read `d`.
    async fn owns(&self, tenant: &str, d: &Digest) -> StoreResult<bool> {
        Ok(self.partition(tenant, &[*d]).await?.1.is_empty())
    }
}

#[async_trait::async_trait]
impl Ownership for Owners {
    async fn partition(
        &self,
        tenant: &str,
        digests: &[Digest],
    ) -> StoreResult<(Vec<Digest>, Vec<Digest>)> {
        Ok(Owners::partition(self, tenant, digests))
    }

    async fn grant(&self, tenant: &str, digests: &[Digest]) -> StoreResult<()> {
        Owners::grant(self, tenant, digests);
        Ok(())
    }

    async fn owns(&self, tenant: &str, d: &Digest) -> StoreResult<bool> {
        Ok(Owners::owns(self, tenant, d))
    }
}

/// The writer thread: appends each grant to its tenant's log.
fn write_logs(dir: &Path, rx: mpsc::Receiver<Msg>) {
    let mut logs: HashMap<String, fs::File> = HashMap::new();
    let open = |tenant: &str| -> std::io::Result<fs::File> {
        let marker: PathBuf = dir.join(format!("{}.tenant", &log_name(tenant)[..64]));
        if !marker.exists() {
            fs::write(&marker, tenant)?;
        }
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(log_name(tenant)))
    };
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Append(tenant, digests) => {
                if !logs.contains_key(&tenant) {
                    match open(&tenant) {
                        Ok(f) => {
                            logs.insert(tenant.clone(), f);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot open an ownership log; grants are kept in memory only");
                            continue;
                        }
                    }
                }
                let bytes: Vec<u8> = digests.iter().flat_map(record).collect();
                if let Some(f) = logs.get_mut(&tenant) {
                    if let Err(e) = f.write_all(&bytes) {
                        tracing::error!(error = %e, "cannot append to an ownership log");
                    }
                }
            }
            #[cfg(test)]
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_per_tenant_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        {
            let owners = Owners::open(dir.path()).unwrap();
            owners.grant("team-a", &[a]);
            owners.grant("team-b", &[b]);
            owners.grant("team-a", &[a]);
            assert!(owners.owns("team-a", &a));
            assert!(!owners.owns("team-a", &b));
            assert!(owners.owns("team-x", &Digest::empty()));
            assert_eq!(owners.partition("team-b", &[a, b]), (vec![b], vec![a]));
            owners.flush();
        }
        let owners = Owners::open(dir.path()).unwrap();
        assert!(owners.owns("team-a", &a) && owners.owns("team-b", &b));
        assert!(!owners.owns("team-b", &a));
        // Compacted: the duplicate grant was written once.
        let log = dir.path().join("owners").join(log_name("team-a"));
        assert_eq!(fs::metadata(log).unwrap().len(), RECORD as u64);
    }
}
