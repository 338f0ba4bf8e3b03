//! Container images as microVM root filesystems.
//!
//! [`ImageStore::resolve`] takes an image reference (`alpine`, `ghcr.io/o/r:tag`,
//! `127.0.0.1:5000/x@sha256:…`), asks the registry for its manifest digest (a `HEAD`, on
//! every call, so a moved tag is noticed), and returns an ext4 disk image of that
//! manifest's root filesystem from `cache_dir/<stem>.ext4`. The first time a registry
//! and repository serve a digest the image is pulled from there (layers verified against
//! their sha256), its layers are applied in order to a staging directory with whiteouts
//! honoured ([`unpack`]), and `mkfs.ext4 -d` turns the directory into the image
//! (`convert.rs`), which is renamed into place atomically next to `<stem>.json` (Env,
//! WorkingDir, User, Entrypoint, Cmd). Multi-arch indexes resolve to their linux/amd64
//! image, whose digest is the one cached and reported.
//!
//! # Private images stay private
//!
//! The cache is keyed by (registry, repository, manifest digest), not by digest alone:
//! a digest names content, it grants no access, and any registry can answer a `HEAD`
//! with another's private digest. A conversion is reused only for a request naming the
//! same registry and repository it was pulled from, and only after that registry has
//! just answered the manifest `HEAD` (or `GET`) for this request's credentials or
//! anonymously; a refusal there is the request's answer, never a cache hit. The same
//! digest from another registry or repository is pulled from there and converted on
//! its own (`key.rs`). Passwords are never formatted: [`Credentials`]' `Debug` redacts
//! them and errors name the user only.
//!
//! # Cache directory
//!
//! `<stem>` is `<digest hex>-<source id>`, the source id being 32 hex digits of
//! sha256(`registry/repository`).
//!
//! - `<stem>.ext4`: the image, `mkfs.ext4 -q -F -m 0 -N <inodes> -d STAGING -L
//!   hearth-image`, sized ×1.2 + 64 MiB over the unpacked tree (at least 64 MiB).
//!   Its presence is the commit point; share it read-only.
//! - `<stem>.json`: digest, registry, repository, reference and
//!   [`ImageRuntimeConfig`]; written first. Its registry and repository must match the
//!   request's for the image to be used.
//! - `<index stem>.index`: the linux/amd64 manifest digest an index resolved to, so a
//!   cached multi-arch image costs one `HEAD` too.
//! - `<64 hex>.ext4`, `.json`, `.index`: left by versions that keyed by digest alone;
//!   [`ImageStore::new`] deletes them (they cannot be reused safely), and those images
//!   are converted again when next requested.
//! - `tmp/<pid>-<n>/`: work trees (downloaded layers, staging, the image being built);
//!   those of dead processes are removed by [`ImageStore::new`].
//!
//! Above [`ImageConfig::max_bytes`] (bytes allocated on disk) the least recently
//! resolved images are deleted, `.ext4` first, then `.json`, except those held by an
//! [`ImageLease`] (every [`DiskImage`] carries one); with only held images left the
//! cache may stay over the bound until one is released. The use order survives a
//! restart: each use sets the `.json` record's modification time, and the store
//! orders what it finds by it when it opens. One store per cache directory: the
//! index is in memory.
//!
//! # Errors
//!
//! [`ImageError`] has one variant per gRPC code an executor should answer with
//! ([`ImageError::grpc_code`]): malformed reference → INVALID_ARGUMENT, missing
//! repository/tag/digest → NOT_FOUND, refused or missing credentials →
//! PERMISSION_DENIED, registry unreachable or failing → UNAVAILABLE, unusable image
//! (other platform, bad digest, tar-slip, schema 1) → FAILED_PRECONDITION, local failure
//! (disk, `mkfs.ext4`, with its stderr) → INTERNAL.
//!
//! # Why a hand-written registry client
//!
//! `oci-client` (0.18) was the first choice and was read closely. It does not fit a
//! multi-tenant executor: it stores the first credentials it sees per registry for the
//! client's lifetime (`store_auth_if_needed`) and caches tokens per repository, so
//! after one action pulls a private image with credentials, another action without
//! them would be authorized too, unless we built a client per credential set. It also
//! swallows token-service errors (a wrong password becomes an anonymous request), and
//! its errors don't separate "not found" from "denied" from "down" the way gRPC codes
//! need. It pulls in `oci-spec`, `chrono`, `regex` and reqwest 0.13 with aws-lc by
//! default. What we need of the distribution API is small: manifest HEAD/GET, blob GET,
//! and the basic/bearer auth dance, so `registry.rs` and `auth.rs` implement just that
//! on `reqwest` with tokens cached per (registry, repository, credentials).
//!
//! TLS is `reqwest`'s `native-tls`, i.e. Debian's OpenSSL (`libssl-dev`, `pkg-config`
//! at build time) and the system CA store: no C build of a TLS stack (aws-lc needs
//! a long C build; ring would be fine too). Plain HTTP is used only for registries
//! listed in [`ImageConfig::insecure_registries`].
//!
//! Layers: gzip (`flate2`, pure Rust), zstd (`ruzstd`, pure Rust, no libzstd build)
//! and uncompressed tar (`tar`), told apart by their magic bytes.

mod auth;
mod build;
mod cache;
mod convert;
mod decompress;
mod error;
mod key;
mod manifest;
mod reference;
mod registry;
mod store;
pub mod unpack;

use std::path::PathBuf;

pub use cache::ImageLease;
pub use error::ImageError;
pub use manifest::ImageRuntimeConfig;
pub use reference::Reference;
pub use store::ImageStore;

/// Where and how the store works.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    /// Holds `<digest hex>-<source id>.ext4` and `.json` per image and source, and a
    /// `tmp/` work area (same file system, so finished images are renamed into place).
    pub cache_dir: PathBuf,
    /// `HOST:PORT` registries spoken to over plain HTTP; every other one over HTTPS.
    pub insecure_registries: Vec<String>,
    /// Most bytes (allocated on disk) the cached images may take; above it the least
    /// recently resolved images that no [`ImageLease`] holds are deleted. 0: unbounded.
    pub max_bytes: u64,
}

/// Registry credentials (basic auth, or exchanged for a bearer token). `Debug` prints
/// `<redacted>` for the password, so logging a struct that holds these is safe.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An ext4 image of a container image's root filesystem. Use it read-only: it is
/// shared by every VM booted from that digest pulled from that registry and repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    /// `sha256:…` of the (linux/amd64) image manifest.
    pub manifest_digest: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    /// Env (PATH…), WorkingDir, User, Entrypoint, Cmd from the image config.
    pub config: ImageRuntimeConfig,
    /// Keeps the image from being evicted while this (or a clone) lives: hold it
    /// until the VM booted from it is gone.
    pub lease: ImageLease,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Credentials travel in structs that get logged and in errors; the password must
    /// never be printed, however they are formatted.
    #[test]
    fn credentials_never_print_their_password() {
        let secret = "pw-5d2e-never-printed";
        let c = Credentials {
            username: "alice".into(),
            password: secret.into(),
        };
        #[derive(Debug)]
        #[allow(dead_code)] // read only through Debug
        struct Request<'a> {
            reference: &'a str,
            credentials: Option<&'a Credentials>,
        }
        let request = Request {
            reference: "registry.example/private/img:v1",
            credentials: Some(&c),
        };
        for text in [
            format!("{c:?}"),
            format!("{c:#?}"),
            format!("{:?}", Some(c.clone())),
            format!("{request:?}"),
            format!("{request:#?}"),
        ] {
            assert!(!text.contains(secret), "{text}");
            assert!(
                text.contains("alice") && text.contains("<redacted>"),
                "{text}"
            );
        }
    }
}
