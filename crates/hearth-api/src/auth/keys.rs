//! The API keys file (`--auth-keys FILE`), in the TOML shape operators'
//! tooling writes:
//!
//! ```toml
//! [[key]]
//! sha256 = "<hex SHA-256 of the key>"   # or: key = "<the key itself>"
//! tenant = "team-a"
//! capabilities = ["cas-read", "cas-write", "execute"]
//! ```
//!
//! With `--tls-client-ca`, an entry may name a client certificate's subject
//! instead (`client_cert_subject = "CN=team-a-ci"`): a call on a connection
//! that presented that certificate, and no key, is that entry's.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{Capability, Principal};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    key: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    sha256: Option<String>,
    key: Option<String>,
    client_cert_subject: Option<String>,
    tenant: String,
    capabilities: Vec<String>,
}

/// The SHA-256 of an API key: what the keys file and the key set hold.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Every configured key, by the SHA-256 of the key.
#[derive(Debug, Default, Clone)]
pub struct KeySet {
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
    /// Client certificate subjects (as RFC 4514 strings) standing for keys.
    by_subject: HashMap<String, Arc<Principal>>,
}

impl KeySet {
    pub fn load(path: &Path) -> Result<KeySet, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the keys file {}: {e}", path.display()))?;
        KeySet::parse(&text).map_err(|e| format!("the keys file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<KeySet, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut set = KeySet::default();
        for (i, entry) in file.key.into_iter().enumerate() {
            let which = format!("key #{}", i + 1);
            let hash = match (&entry.sha256, &entry.key, &entry.client_cert_subject) {
                (Some(hex), None, None) => hex::decode(hex.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| format!("{which}: sha256 is not 64 hex digits"))?,
                (None, Some(key), None) if !key.is_empty() => key_hash(key),
                (None, Some(_), None) => return Err(format!("{which}: key is empty")),
                (None, None, Some(subject)) if !subject.trim().is_empty() => {
                    key_hash(&format!("client certificate {}", subject.trim()))
                }
                _ => {
                    return Err(format!(
                        "{which}: give exactly one of sha256, key and client_cert_subject"
                    ))
                }
            };
            if entry.tenant.trim().is_empty() {
                return Err(format!("{which}: tenant is empty"));
            }
            let capabilities = entry
                .capabilities
                .iter()
                .map(|c| {
                    Capability::parse(c).ok_or_else(|| {
                        format!(
                            "{which}: unknown capability {c:?} (known: {})",
                            Capability::names()
                        )
                    })
                })
                .collect::<Result<BTreeSet<_>, _>>()?;
            let principal = Arc::new(Principal::new(entry.tenant.trim(), capabilities, &hash));
            let duplicate = match &entry.client_cert_subject {
                Some(subject) => set
                    .by_subject
                    .insert(subject.trim().to_string(), principal)
                    .is_some(),
                None => set.by_hash.insert(hash, principal).is_some(),
            };
            if duplicate {
                return Err(format!("{which}: the same key appears twice"));
            }
        }
        Ok(set)
    }

    /// Adds a key (the local executor's in `hearth up`).
    pub fn insert(&mut self, key: &str, tenant: &str, capabilities: BTreeSet<Capability>) {
        let hash = key_hash(key);
        self.by_hash
            .insert(hash, Arc::new(Principal::new(tenant, capabilities, &hash)));
    }

    pub fn get(&self, key: &str) -> Option<Arc<Principal>> {
        self.by_hash.get(&key_hash(key)).cloned()
    }

    /// The entry a client certificate with this subject stands for.
    pub fn for_subject(&self, subject: &str) -> Option<Arc<Principal>> {
        self.by_subject.get(subject).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len() + self.by_subject.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hashed_and_plain_keys() {
        let hashed = hex::encode(key_hash("s3cret"));
        let set = KeySet::parse(&format!(
            r#"
            [[key]]
            sha256 = "{hashed}"
            tenant = "team-a"
            capabilities = ["cas-read", "cas-write", "execute"]

            [[key]]
            key = "plain"
            tenant = "team-b"
            capabilities = ["cas-read"]
            "#
        ))
        .unwrap();
        assert_eq!(set.len(), 2);
        let a = set.get("s3cret").unwrap();
        assert_eq!(a.tenant, "team-a");
        assert!(a.has(Capability::Execute));
        assert!(!a.has(Capability::AcWrite));
        assert_eq!(set.get("plain").unwrap().tenant, "team-b");
        assert!(set.get("other").is_none());
    }

    #[test]
    fn a_client_certificate_subject_may_stand_for_a_key() {
        let set = KeySet::parse(
            r#"
            [[key]]
            client_cert_subject = "CN=team-a-ci"
            tenant = "team-a"
            capabilities = ["execute"]
            "#,
        )
        .unwrap();
        assert_eq!(set.for_subject("CN=team-a-ci").unwrap().tenant, "team-a");
        assert!(set.for_subject("CN=team-b-ci").is_none());
        assert!(set.get("CN=team-a-ci").is_none(), "a subject is not a key");
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                r#"[[key]]
                key = "k"
                tenant = "t"
                capabilities = ["cas-reed"]"#,
                "unknown capability \"cas-reed\"",
            ),
            (
                r#"[[key]]
                key = "k"
                sha256 = "00"
                tenant = "t"
                capabilities = []"#,
                "exactly one of",
            ),
            (
                r#"[[key]]
                sha256 = "abc"
                tenant = "t"
                capabilities = []"#,
                "64 hex digits",
            ),
            (
                r#"[[key]]
                key = "k"
                tenant = " "
                capabilities = []"#,
                "tenant is empty",
            ),
            (
                r#"[[key]]
                key = "k"
                tenant = "a"
                capabilities = []
                [[key]]
                key = "k"
                tenant = "b"
                capabilities = []"#,
                "twice",
            ),
            (
                r#"[[key]]
                key = "k"
                tenant = "a"
                capabilty = []"#,
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let err = KeySet::parse(text).unwrap_err();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }
}
