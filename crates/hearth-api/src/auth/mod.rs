//! API keys and tenants. With a keys file, every call carries a key
//! (`x-hearth-api-key`, `x-buildbuddy-api-key` or `authorization: Bearer`);
//! [`AuthLayer`] looks it up, refuses the call if the key is unknown
//! (UNAUTHENTICATED) or lacks the capability the method needs
//! (PERMISSION_DENIED, naming it), and hands the services the caller's
//! [`Principal`]. Without one, Hearth is single-tenant and every caller is
//! [`Principal::anonymous`], as before keys existed.
//!
//! Keys are never logged: a principal shows the first 8 hex digits of its
//! key's SHA-256 as its id.

mod keys;
mod layer;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tonic::Status;

pub use keys::{key_hash, KeySet};
pub use layer::AuthLayer;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    CasRead,
    CasWrite,
    AcWrite,
    Execute,
    /// Connect as an executor; implies reading and writing every tenant's
    /// blobs (an executor fetches inputs and uploads outputs for all).
    Executor,
    /// `hearth status` across tenants.
    Admin,
}

const ALL: [Capability; 6] = [
    Capability::CasRead,
    Capability::CasWrite,
    Capability::AcWrite,
    Capability::Execute,
    Capability::Executor,
    Capability::Admin,
];

impl Capability {
    pub fn name(self) -> &'static str {
        match self {
            Capability::CasRead => "cas-read",
            Capability::CasWrite => "cas-write",
            Capability::AcWrite => "ac-write",
            Capability::Execute => "execute",
            Capability::Executor => "executor",
            Capability::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Capability> {
        ALL.into_iter().find(|c| c.name() == s.trim())
    }

    fn names() -> String {
        ALL.map(|c| c.name()).join(", ")
    }
}

/// Who is calling: a tenant and what its key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Empty for the anonymous caller of a server without keys.
    pub tenant: String,
    pub capabilities: BTreeSet<Capability>,
    /// The first 8 hex digits of the key's SHA-256 (never the key).
    pub key_id: String,
}

impl Principal {
    fn new(tenant: &str, capabilities: BTreeSet<Capability>, hash: &[u8; 32]) -> Principal {
        Principal {
            tenant: tenant.to_string(),
            capabilities,
            key_id: hex::encode(&hash[..4]),
        }
    }

    /// The caller of a server without keys: one tenant, every capability.
    pub fn anonymous() -> Principal {
        Principal {
            tenant: String::new(),
            capabilities: ALL.into_iter().collect(),
            key_id: "anonymous".into(),
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.key_id == "anonymous"
    }

    pub fn has(&self, c: Capability) -> bool {
        self.capabilities.contains(&c)
            || (self.capabilities.contains(&Capability::Executor)
                && matches!(c, Capability::CasRead | Capability::CasWrite))
    }

    /// Reads and writes every tenant's blobs (executors; the anonymous
    /// caller of a single-tenant server).
    pub fn sees_all_blobs(&self) -> bool {
        self.is_anonymous() || self.capabilities.contains(&Capability::Executor)
    }

    /// Sees every tenant's operations and executors (`hearth status`).
    pub fn sees_all_tenants(&self) -> bool {
        self.is_anonymous() || self.capabilities.contains(&Capability::Admin)
    }

    pub fn require(&self, c: Capability) -> Result<(), Status> {
        if self.has(c) {
            return Ok(());
        }
        Err(self.denied(c))
    }

    fn denied(&self, c: Capability) -> Status {
        Status::permission_denied(format!(
            "this API key (tenant {:?}, key {}) lacks the {:?} capability",
            self.tenant,
            self.key_id,
            c.name()
        ))
    }
}

/// What a method needs: one of these capabilities (none: any valid key).
fn required(path: &str) -> &'static [Capability] {
    use Capability::*;
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match (service, method) {
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "FindMissingBlobs") => {
            &[CasRead, CasWrite]
        }
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "BatchUpdateBlobs") => {
            &[CasWrite]
        }
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", _) => &[CasRead],
        ("google.bytestream.ByteStream", "Read") => &[CasRead],
        ("google.bytestream.ByteStream", _) => &[CasWrite],
        ("build.bazel.remote.execution.v2.ActionCache", "UpdateActionResult") => &[AcWrite],
        ("build.bazel.remote.execution.v2.ActionCache", _) => &[CasRead],
        ("build.bazel.remote.execution.v2.Execution", _) => &[Execute],
        ("google.longrunning.Operations", _) => &[Execute],
        ("hearth.worker.v1.WorkerService", "Session") => &[Executor],
        _ => &[],
    }
}

/// Methods any caller may use without a key: health checks, and what the
/// server supports (it names no tenant's data; Bazel 2.1 asks for it
/// without the headers of `--remote_header`).
fn open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path == "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"
}

/// The keys in force (none: single-tenant, anonymous), reloadable.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    inner: Option<Arc<Keys>>,
}

#[derive(Debug)]
struct Keys {
    file: Option<PathBuf>,
    from_file: RwLock<Arc<KeySet>>,
    /// Keys no file holds (the local executor's in `hearth up`).
    internal: RwLock<Arc<KeySet>>,
}

const KEY_HEADERS: [&str; 2] = ["x-hearth-api-key", "x-buildbuddy-api-key"];

/// What a call presents to prove who it is.
pub struct Presented<'a> {
    pub headers: &'a http::HeaderMap,
    /// The user part of the URL's authority (`grpc://KEY@host:port`).
    pub userinfo: Option<&'a str>,
    /// The subject of the client certificate the connection presented.
    pub subject: Option<String>,
}

fn read(lock: &RwLock<Arc<KeySet>>) -> Arc<KeySet> {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write(lock: &RwLock<Arc<KeySet>>, set: KeySet) {
    *lock.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
}

impl Auth {
    /// No keys: every caller is anonymous.
    pub fn anonymous() -> Auth {
        Auth::default()
    }

    pub fn with_keys(keys: KeySet) -> Auth {
        Auth::build(None, keys)
    }

    /// Keys from a file, which [`Auth::reload`] reads again.
    pub fn from_file(path: PathBuf) -> Result<Auth, String> {
        let keys = KeySet::load(&path)?;
        Ok(Auth::build(Some(path), keys))
    }

    fn build(file: Option<PathBuf>, keys: KeySet) -> Auth {
        Auth {
            inner: Some(Arc::new(Keys {
                file,
                from_file: RwLock::new(Arc::new(keys)),
                internal: RwLock::default(),
            })),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Reads the keys file again and returns how many keys it holds; on
    /// error the keys in force stay.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(keys) = &self.inner else {
            return Ok(0);
        };
        let Some(file) = &keys.file else {
            return Ok(read(&keys.from_file).len());
        };
        let fresh = KeySet::load(file)?;
        let n = fresh.len();
        write(&keys.from_file, fresh);
        Ok(n)
    }

    /// Adds a key that no keys file holds (the local executor's).
    pub fn add_internal_key(&self, key: &str, tenant: &str, capabilities: BTreeSet<Capability>) {
        if let Some(keys) = &self.inner {
            let mut set = (*read(&keys.internal)).clone();
            set.insert(key, tenant, capabilities);
            write(&keys.internal, set);
        }
    }

    /// Who is calling `path` with these credentials, if they may.
    pub fn check(&self, path: &str, creds: &Presented<'_>) -> Result<Arc<Principal>, Status> {
        let Some(keys) = &self.inner else {
            return Ok(Arc::new(Principal::anonymous()));
        };
        if open(path) {
            return Ok(Arc::new(Principal {
                tenant: String::new(),
                capabilities: BTreeSet::new(),
                key_id: "none".into(),
            }));
        }
        let header = |name: &str| creds.headers.get(name).and_then(|v| v.to_str().ok());
        let presented = KEY_HEADERS
            .iter()
            .find_map(|h| header(h))
            .or_else(|| header("authorization").and_then(|v| v.trim().strip_prefix("Bearer ")))
            .or(creds.userinfo)
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let principal = match (presented, creds.subject.as_deref()) {
            (Some(key), _) => read(&keys.from_file)
                .get(key)
                .or_else(|| read(&keys.internal).get(key))
                .ok_or_else(|| {
                    Status::unauthenticated("the API key is not valid on this server")
                })?,
            (None, Some(subject)) => {
                read(&keys.from_file).for_subject(subject).ok_or_else(|| {
                    Status::unauthenticated(format!(
                    "no API key was sent, and the client certificate {subject:?} stands for none"
                ))
                })?
            }
            (None, None) => {
                return Err(Status::unauthenticated(
                    "this server requires an API key: send it in the x-hearth-api-key or \
                     x-buildbuddy-api-key header (Bazel: --remote_header=x-buildbuddy-api-key=KEY), \
                     or in the server URL (grpc://KEY@host:port)",
                ))
            }
        };
        match required(path) {
            [] => Ok(principal),
            needs if needs.iter().any(|c| principal.has(*c)) => Ok(principal),
            [one] => Err(principal.denied(*one)),
            needs => {
                Err(Status::permission_denied(format!(
                "this API key (tenant {:?}, key {}) lacks a capability {path} needs (any of: {})",
                principal.tenant,
                principal.key_id,
                needs.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
            )))
            }
        }
    }
}
