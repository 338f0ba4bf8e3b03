//! Manifests, indexes and image configs: Docker v2 schema 2 and OCI, parsed with serde.

use serde::{Deserialize, Serialize};

use crate::reference::is_sha256_digest;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Sent as `Accept` on manifest requests.
pub const ACCEPTED_MANIFEST_TYPES: [&str; 4] =
    [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

#[derive(Debug, Deserialize)]
struct Raw {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub enum Parsed {
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index(Vec<Descriptor>),
}

/// Parses a manifest or index; `content_type` is the response's Content-Type.
pub fn parse(body: &[u8], content_type: &str) -> Result<Parsed, String> {
    let raw: Raw =
        serde_json::from_slice(body).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    let header_type = content_type.split(';').next().unwrap_or("").trim();
    let media_type = raw.media_type.as_deref().unwrap_or(header_type);
    if raw.schema_version != 2 {
        return Err(format!(
            "unsupported manifest schema version {} (media type {media_type:?}); only Docker v2 schema 2 and OCI are supported",
            raw.schema_version
        ));
    }
    // Digests become file names and URLs: only well-formed sha256 ones are accepted.
    let check_digest = |d: &Descriptor| {
        if is_sha256_digest(&d.digest) {
            Ok(())
        } else {
            Err(format!("digest {:?} is not sha256:<64 hex>", d.digest))
        }
    };
    if let Some(manifests) = raw.manifests {
        manifests.iter().try_for_each(check_digest)?;
        return Ok(Parsed::Index(manifests));
    }
    match (raw.config, raw.layers) {
        (Some(config), Some(layers)) => {
            for l in &layers {
                check_layer_type(&l.media_type)?;
                check_digest(l)?;
            }
            check_digest(&config)?;
            Ok(Parsed::Image { config, layers })
        }
        _ => Err(format!(
            "manifest of type {media_type:?} has neither layers nor manifests"
        )),
    }
}

/// The linux/amd64 entry of an index.
pub fn pick_linux_amd64(entries: &[Descriptor]) -> Result<&Descriptor, String> {
    entries
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .ok_or_else(|| {
            let have: Vec<String> = entries
                .iter()
                .filter_map(|d| {
                    d.platform
                        .as_ref()
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                })
                .collect();
            format!(
                "the image index has no linux/amd64 image (it has: {})",
                have.join(", ")
            )
        })
}

/// Accepts the filesystem-layer media types (tar, gzip, zstd; Docker and OCI). The
/// compression itself is detected from the blob's bytes when it is unpacked.
pub fn check_layer_type(media_type: &str) -> Result<(), String> {
    match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.diff.tar"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd"
        | "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(()),
        other => Err(format!("unsupported layer media type {other:?}")),
    }
}

/// What the VM runner needs from the image config (`config` in the image's config blob).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRuntimeConfig {
    /// `KEY=VALUE` entries, e.g. `PATH=/usr/local/sbin:…`.
    pub env: Vec<String>,
    /// Empty when the image sets none.
    pub working_dir: String,
    /// Empty when the image sets none (root).
    pub user: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// The image config blob: the part we use, and the platform it claims.
pub fn parse_config(body: &[u8]) -> Result<(ImageRuntimeConfig, String, String), String> {
    #[derive(Deserialize, Default)]
    struct Inner {
        #[serde(rename = "Env", default)]
        env: Option<Vec<String>>,
        #[serde(rename = "WorkingDir", default)]
        working_dir: Option<String>,
        #[serde(rename = "User", default)]
        user: Option<String>,
        #[serde(rename = "Entrypoint", default)]
        entrypoint: Option<Vec<String>>,
        #[serde(rename = "Cmd", default)]
        cmd: Option<Vec<String>>,
    }
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        architecture: String,
        #[serde(default)]
        os: String,
        #[serde(default)]
        config: Option<Inner>,
    }
    let f: File =
        serde_json::from_slice(body).map_err(|e| format!("image config is not valid JSON: {e}"))?;
    let c = f.config.unwrap_or_default();
    Ok((
        ImageRuntimeConfig {
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
        },
        f.os,
        f.architecture,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_manifest_and_rejects_schema1_and_foreign_layers() {
        let d = format!("sha256:{}", "0".repeat(64));
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{d}","size":2}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{d}","size":3}}]}}"#
        );
        assert!(
            matches!(parse(m.as_bytes(), ""), Ok(Parsed::Image { layers, .. }) if layers.len() == 1)
        );
        let z = m.replace(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        );
        assert!(parse(z.as_bytes(), "").unwrap_err().contains("foreign"));
        assert!(parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, "")
            .unwrap_err()
            .contains("schema version 1"));
    }

    #[test]
    fn picks_linux_amd64_from_an_index() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"digest":"sha256:{a}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"digest":"sha256:{b}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Ok(Parsed::Index(entries)) = parse(i.as_bytes(), OCI_INDEX) else {
            panic!()
        };
        assert_eq!(
            pick_linux_amd64(&entries).unwrap().digest,
            format!("sha256:{b}")
        );
        let bad = i.replace(&a, "../../etc");
        assert!(parse(bad.as_bytes(), OCI_INDEX)
            .unwrap_err()
            .contains("not sha256"));
        let err = pick_linux_amd64(&entries[..1]).unwrap_err();
        assert!(err.contains("linux/arm64"), "{err}");
    }
}
