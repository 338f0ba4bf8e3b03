//! What a cached conversion is keyed by: the registry and repository it was pulled from
//! and its manifest digest. A digest says what an image is, not who may read it: any
//! registry can answer a `HEAD` with someone else's private digest, and one registry
//! holds public and private repositories. So a conversion is only ever handed to a
//! request for the same registry and repository, after that registry has just let the
//! request's credentials (or anonymous access) read the manifest there
//! ([`crate::ImageStore::resolve`] does that `HEAD` first, on every call).

use sha2::{Digest, Sha256};

use crate::Reference;

/// (registry, repository, manifest digest), normalized as [`Reference::parse`] does
/// (`alpine` is `docker.io`, `library/alpine`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CacheKey {
    pub(crate) registry: String,
    pub(crate) repository: String,
    /// `sha256:<64 hex>`.
    pub(crate) digest: String,
}

impl CacheKey {
    pub(crate) fn new(reference: &Reference, digest: &str) -> Self {
        CacheKey {
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            digest: digest.to_string(),
        }
    }

    /// The file name stem of this entry: `<digest hex>-<source id>`, where the source id
    /// is 32 hex digits of sha256(`registry/repository`) (a registry name has no `/`, so
    /// the pair is unambiguous). The record next to the image names the registry and
    /// repository in full and is compared on every use, so not even a collision of
    /// these 128 bits could hand an image to another source.
    pub(crate) fn stem(&self) -> String {
        let source = Sha256::digest(format!("{}/{}", self.registry, self.repository));
        format!("{}-{}", hex_of(&self.digest), hex::encode(&source[..16]))
    }
}

pub(crate) fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Whether `name` is a cache file of the versions before entries were keyed by source:
/// `<64 hex>.ext4`, `.json` or `.index`. Those cannot be told apart by where they came
/// from, so they are never reused; [`crate::ImageStore::new`] deletes them (rather than
/// leave them taking disk outside the bound), and such images are converted again, from
/// the registry asked, when next requested.
pub(crate) fn is_unkeyed_cache_file(name: &str) -> bool {
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    matches!(ext, "ext4" | "json" | "index")
        && stem.len() == 64
        && stem
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(reference: &str, digest: &str) -> CacheKey {
        CacheKey::new(&Reference::parse(reference).unwrap(), digest)
    }

    #[test]
    fn stems_differ_by_registry_and_repository_not_by_tag() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let base = key("ghcr.io/org/app:v1", &d).stem();
        assert!(base.starts_with(&format!("{}-", "ab".repeat(32))), "{base}");
        assert_eq!(base.len(), 64 + 1 + 32);
        assert_eq!(base, key("ghcr.io/org/app:v2", &d).stem());
        assert_eq!(base, key(&format!("ghcr.io/org/app@{d}"), &d).stem());
        for other in [
            "ghcr.io/org/other:v1",
            "evil.example/org/app:v1",
            "ghcr.io:443/org/app:v1",
            "ghcr.io/org/app/sub:v1",
        ] {
            assert_ne!(base, key(other, &d).stem(), "{other}");
        }
        // Docker Hub's short names are the same source as the long ones.
        assert_eq!(
            key("alpine", &d).stem(),
            key("docker.io/library/alpine:3", &d).stem()
        );
    }

    #[test]
    fn recognizes_cache_files_of_older_versions() {
        let hex = "0f".repeat(32);
        for ext in ["ext4", "json", "index"] {
            assert!(is_unkeyed_cache_file(&format!("{hex}.{ext}")));
            assert!(!is_unkeyed_cache_file(&format!(
                "{hex}-{}.{ext}",
                "1".repeat(32)
            )));
        }
        for name in ["tmp", &format!("{hex}.txt"), &format!("{}.ext4", &hex[1..])] {
            assert!(!is_unkeyed_cache_file(name), "{name}");
        }
        assert!(!is_unkeyed_cache_file(&format!(
            "{}.ext4",
            hex.to_uppercase()
        )));
    }
}
