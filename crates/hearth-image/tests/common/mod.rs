//! Test support: hearth-testkit (a real `docker-registry` on a free local port, layers
//! built as tar.gz, a push client on plain HTTP), re-exported, plus debugfs readers and
//! hearth-image's own helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_image::{ImageConfig, ImageStore};
pub use hearth_testkit::*;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::{X509Builder, X509NameBuilder};

/// A fresh P-256 key and a builder for a self-signed certificate with
/// this common name, valid from today for two days; the caller adds any
/// extensions and signs.
pub fn self_signed(common_name: &str) -> (PKey<Private>, X509Builder) {
    let key = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
    )
    .unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    let name = name.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    (key, b)
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

/// An image store caching in `cache` that speaks plain HTTP to `reg`.
pub fn store(cache: &Path, reg: &Registry) -> ImageStore {
    store_with(cache, &[&reg.host])
}

/// An image store caching in `cache` with these insecure registries.
pub fn store_with(cache: &Path, insecure: &[&str]) -> ImageStore {
    store_bounded(cache, insecure, 0)
}

/// An image store whose cache is bounded to `max_bytes` (0 = unbounded).
pub fn store_bounded(cache: &Path, insecure: &[&str], max_bytes: u64) -> ImageStore {
    ImageStore::new(ImageConfig {
        cache_dir: cache.to_path_buf(),
        insecure_registries: insecure.iter().map(|h| h.to_string()).collect(),
        max_bytes,
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
