//! Test support shared by Hearth's crates: a real `docker-registry` (Debian's
//! distribution 2.8) on a free local port, layers built here as tar.gz (or zstd), a push
//! client on plain HTTP, and a minimal bootable image made from the host's busybox-static.
//!
//! Dev-only (`publish = false`): helpers panic on failure instead of returning errors.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

mod busybox;
mod push;
mod servers;
pub use busybox::{push_busybox_image, push_busybox_image_with_auth, BUSYBOX};
pub use push::Pusher;
pub use servers::{Redis, SeaweedFs};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` process with its storage in a temp dir; killed on drop.
pub struct Registry {
    pub host: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    /// `auth_yaml`: the `auth:` section's body (indented by 2), or "" for none.
    pub fn start(auth_yaml: &str) -> Registry {
        Self::start_with(auth_yaml, "", tempfile::tempdir().unwrap())
    }

    /// `http_yaml`: more of the `http:` section (e.g. `tls:`), indented by 2.
    pub fn start_with(auth_yaml: &str, http_yaml: &str, dir: tempfile::TempDir) -> Registry {
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let auth = if auth_yaml.is_empty() {
            String::new()
        } else {
            format!("auth:\n{auth_yaml}")
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{http_yaml}{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry) must be installed");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start: {}",
                std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { host, dir, child }
    }

    /// Writes `dir/htpasswd` for one user; returns the `auth:` body for [`Registry::start`].
    pub fn htpasswd_yaml(dir: &Path, user: &str, password: &str) -> String {
        let hash = bcrypt::hash_with_result(password, 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        let path = dir.join("htpasswd");
        std::fs::write(&path, format!("{user}:{hash}\n")).unwrap();
        format!(
            "  htpasswd:\n    realm: hearth-test\n    path: {}\n",
            path.display()
        )
    }

    /// Where the registry keeps a blob's bytes (to corrupt it in a test).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sha256:<hex>` of `data`, as registries name blobs and manifests.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Builds a layer tar entry by entry; names are written raw (so `../x` is possible).
/// Names and link targets go in the old header fields: at most 100 bytes each.
#[derive(Default)]
pub struct LayerBuilder {
    tar: Vec<u8>,
}

impl LayerBuilder {
    fn raw(
        mut self,
        name: &str,
        kind: EntryType,
        data: &[u8],
        link: &str,
        mode: u32,
        owner: u64,
    ) -> Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_mtime(1_600_000_000);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        // Raw blocks: header, data, padding (a Builder would end the archive on finish).
        self.tar.extend_from_slice(h.as_bytes());
        self.tar.extend_from_slice(data);
        self.tar.resize(self.tar.len().div_ceil(512) * 512, 0);
        self
    }
    pub fn dir(self, name: &str) -> Self {
        self.raw(name, EntryType::Directory, b"", "", 0o755, 0)
    }
    /// A directory with its own mode (e.g. 0o1777) and owner (uid = gid).
    pub fn dir_mode(self, name: &str, mode: u32, owner: u64) -> Self {
        self.raw(name, EntryType::Directory, b"", "", mode, owner)
    }
    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.raw(name, EntryType::Regular, data, "", 0o644, 0)
    }
    pub fn file_mode(self, name: &str, data: &[u8], mode: u32, owner: u64) -> Self {
        self.raw(name, EntryType::Regular, data, "", mode, owner)
    }
    /// A file with an extended attribute, carried as a PAX `SCHILY.xattr.` record.
    pub fn file_xattr(self, name: &str, data: &[u8], key: &str, value: &str) -> Self {
        let body = format!(" SCHILY.xattr.{key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        let record = format!("{len}{body}");
        self.raw(
            "PaxHeaders/x",
            EntryType::XHeader,
            record.as_bytes(),
            "",
            0o644,
            0,
        )
        .file(name, data)
    }
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(name, EntryType::Symlink, b"", target, 0o777, 0)
    }
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(name, EntryType::Link, b"", target, 0o644, 0)
    }
    /// The finished tar, gzip-compressed.
    pub fn gz(self) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&self.tar()).unwrap();
        enc.finish().unwrap()
    }
    /// The finished tar, zstd-compressed.
    pub fn zstd(self) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(
            &self.tar()[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        )
    }
    /// The finished tar, uncompressed.
    pub fn tar(&self) -> Vec<u8> {
        let mut tar = self.tar.clone();
        tar.extend_from_slice(&[0u8; 1024]);
        tar
    }
}

/// An image config JSON as `docker build` writes it.
pub fn config_json(arch: &str, env: &[&str], workdir: &str, user: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": env, "WorkingDir": workdir, "User": user, "Cmd": ["/bin/sh"], "Entrypoint": null},
        "rootfs": {"type": "layers", "diff_ids": []},
    })
}
