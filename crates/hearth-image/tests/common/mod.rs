//! Test support: a real `docker-registry` (Debian's distribution 2.8) on a free local
//! port, layers built here as tar.gz, a push client on plain HTTP, and debugfs readers.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use hearth_image::{ImageConfig, ImageStore};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

mod push;
pub use push::Pusher;

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

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Builds a layer tar entry by entry; names are written raw (so `../x` is possible).
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

/// `debugfs -R CMD IMAGE` (read-only), its stdout.
pub fn debugfs(image: &Path, cmd: &str) -> String {
    let tool = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("debugfs");
    let out = Command::new(tool)
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert!(
        out.status.success(),
        "debugfs {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names in a directory of the image (from `debugfs ls`).
pub fn ls(image: &Path, dir: &str) -> Vec<String> {
    let out = debugfs(image, &format!("ls -l {dir}"));
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// `debugfs stat` of a path (inode, type, mode, owner, links, symlink target).
pub fn stat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("stat {path}"))
}

pub fn store(cache: &Path, reg: &Registry) -> ImageStore {
    ImageStore::new(ImageConfig {
        cache_dir: cache.to_path_buf(),
        insecure_registries: vec![reg.host.clone()],
    })
    .unwrap()
}

/// One layer with `/etc/version` holding `content`.
pub fn small_layer(content: &str) -> Vec<u8> {
    LayerBuilder::default()
        .dir("etc/")
        .file("etc/version", content.as_bytes())
        .gz()
}

/// Files under `dir` once the store's background clean-up of work trees is done
/// (polls for up to 10 s while any remain).
pub fn settled_files(dir: &Path) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let files = walk(dir);
        if files.is_empty() || Instant::now() > deadline {
            return files;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file (not directory) under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}
