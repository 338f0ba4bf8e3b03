//! Image references, parsed and normalized the way Docker does
//! (`alpine` → `docker.io/library/alpine:latest`).

use std::fmt;

/// Docker Hub's name in references, and the host its registry API really lives on.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `HOST[:PORT]`, e.g. `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// e.g. `library/alpine`.
    pub repository: String,
    /// The tag; `latest` when the reference names neither tag nor digest.
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when the reference pins a digest (it then wins over the tag).
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `[docker://][HOST[:PORT]/]PATH[:TAG][@sha256:HEX]`.
    pub fn parse(input: &str) -> Result<Reference, String> {
        let s = input.trim();
        let s = s.strip_prefix("docker://").unwrap_or(s);
        if s.is_empty() {
            return Err("empty reference".into());
        }
        if s.len() > 4096 {
            return Err("reference too long".into());
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(parse_digest(d)?)),
            None => (s, None),
        };
        let (registry, rest) = match name_tag.split_once('/') {
            Some((first, rest)) if is_domain(first) => (first.to_string(), rest),
            _ => (DOCKER_HUB.to_string(), name_tag),
        };
        let (path, tag) = match rest.rsplit_once(':') {
            Some((p, t)) => (p, Some(t.to_string())),
            None => (rest, None),
        };
        validate_domain(&registry)?;
        if let Some(t) = &tag {
            validate_tag(t)?;
        }
        if path.is_empty() {
            return Err("missing repository name".into());
        }
        for component in path.split('/') {
            validate_path_component(component)?;
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if repository.len() > 255 {
            return Err("repository name longer than 255 characters".into());
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Host (and port) to send registry API requests to.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to put after `/manifests/`: the digest if pinned, else the tag.
    pub fn target(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d,
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Docker's rule: the first component is a registry if it has a `.` or `:`, or is
/// `localhost`, and has no upper-case letters.
fn is_domain(first: &str) -> bool {
    (first.contains('.') || first.contains(':') || first == "localhost")
        && !first.chars().any(|c| c.is_ascii_uppercase())
}

fn validate_domain(domain: &str) -> Result<(), String> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid port in registry {domain:?}"));
        }
    }
    let ok = !host.is_empty()
        && host.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid registry host {domain:?}"))
    }
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let mut bytes = tag.bytes();
    let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if first_ok && rest_ok && tag.len() <= 128 {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?}"))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn validate_path_component(c: &str) -> Result<(), String> {
    let bad = || {
        Err(format!("invalid repository path component {c:?} (lower-case letters, digits and separators . _ __ - only)"))
    };
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return bad();
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_digit() || ch.is_ascii_lowercase() {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+".
        let start = i;
        while i < b.len() && !(b[i].is_ascii_digit() || b[i].is_ascii_lowercase()) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return bad();
        }
    }
    Ok(())
}

/// `sha256:` followed by 64 lower-case hex digits: safe to use in file names.
pub(crate) fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn parse_digest(d: &str) -> Result<String, String> {
    if !d.starts_with("sha256:") {
        Err(format!(
            "unsupported digest {d:?} (only sha256:<64 hex> is accepted)"
        ))
    } else if is_sha256_digest(d) {
        Ok(d.to_string())
    } else {
        Err(format!(
            "malformed digest {d:?} (want sha256:<64 lower-case hex>)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn normalizes_docker_hub_names() {
        assert_eq!(p("alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            p("docker://alpine:3").to_string(),
            "docker.io/library/alpine:3"
        );
        assert_eq!(
            p("docker.io/library/alpine:3").to_string(),
            "docker.io/library/alpine:3"
        );
        assert_eq!(
            p("index.docker.io/foo/bar").to_string(),
            "docker.io/foo/bar:latest"
        );
        assert_eq!(p("foo/bar").api_host(), "registry-1.docker.io");
    }

    #[test]
    fn parses_registries_ports_tags_digests() {
        let r = p("127.0.0.1:5000/library/ubuntu:20.04");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "library/ubuntu");
        assert_eq!(r.target(), "20.04");
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("localhost/x/y@{d}"));
        assert_eq!(
            (r.registry.as_str(), r.tag.clone(), r.target()),
            ("localhost", None, d.as_str())
        );
        let r = p(&format!("ghcr.io/a/b-c__d.e:v1.2@{d}"));
        assert_eq!(r.target(), d);
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(p("registry:5000/x").registry, "registry:5000");
    }

    #[test]
    fn rejects_malformed_references() {
        for bad in [
            "",
            "Upper/Case",
            "foo:bar:baz",
            "foo:",
            "a//b",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "foo@sha256:abc",
            "foo@md5:0123",
            "host:port/x",
            "ex ample/x",
            "foo:.tag",
            "127.0.0.1:5000/",
            "a/B",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
