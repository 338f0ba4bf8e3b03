//! Container images as microVM root filesystems.
//!
//! [`ImageStore::resolve`] takes an image reference (`alpine`, `ghcr.io/o/r:tag`,
//! `127.0.0.1:5000/x@sha256:…`), asks the registry for its manifest digest (a `HEAD`, on
//! every call, so a moved tag is noticed), and returns an ext4 disk image of that
//! manifest's root filesystem from `cache_dir/<digest hex>.ext4`. The first time a digest
//! is seen the image is pulled (layers verified against their sha256), its layers are
//! applied in order to a staging directory with whiteouts honoured ([`unpack`]), and
//! `mkfs.ext4 -d` turns the directory into the image (`convert.rs`), which is renamed
//! into place atomically next to `<digest hex>.json` (Env, WorkingDir, User, Entrypoint,
//! Cmd). Multi-arch indexes resolve to their linux/amd64 image, whose digest is the one
//! cached and reported.
//!
//! # Cache directory
//!
//! - `<hex>.ext4`: the image, `mkfs.ext4 -q -F -m 0 -N <inodes> -d STAGING -L
//!   hearth-image`, sized ×1.2 + 64 MiB over the unpacked tree (at least 64 MiB).
//!   Its presence is the commit point; share it read-only.
//! - `<hex>.json`: digest, reference and [`ImageRuntimeConfig`]; written first.
//! - `<index hex>.index`: the linux/amd64 manifest digest an index resolved to, so a
//!   cached multi-arch image costs one `HEAD` too.
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
    /// Holds `<digest hex>.ext4` and `.json` per image, and a `tmp/` work area (same
    /// file system, so finished images are renamed into place).
    pub cache_dir: PathBuf,
    /// `HOST:PORT` registries spoken to over plain HTTP; every other one over HTTPS.
    pub insecure_registries: Vec<String>,
    /// Most bytes (allocated on disk) the cached images may take; above it the least
    /// recently resolved images that no [`ImageLease`] holds are deleted. 0: unbounded.
    pub max_bytes: u64,
}

/// Registry credentials (basic auth, or exchanged for a bearer token).
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
/// shared by every VM booted from that digest.
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
