//! Assembles the guest initramfs: `/init` is the `hearth-guest` agent,
//! `/modules/*.ko` the kernel modules it loads (in the order of
//! `/modules/order`). Written in the cpio "newc" format the kernel unpacks,
//! cached under a name derived from the content, so it is built once per
//! agent and kernel.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::VmError;

/// Modules the guest needs, in load order, relative to the kernel's
/// `modules/<release>/kernel` directory.
pub const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/virtio_console.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "fs/overlayfs/overlay.ko",
];

/// A cpio "newc" archive being written.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    pub fn file(&mut self, name: &str, executable: bool, data: &[u8]) {
        self.entry(name, if executable { 0o100755 } else { 0o100644 }, data);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

fn read(path: &Path) -> Result<Vec<u8>, VmError> {
    std::fs::read(path).map_err(|e| VmError::io(format!("reading {}", path.display()), e))
}

/// Builds (or finds in `cache_dir`) the initramfs for this agent binary and
/// kernel module tree (`.../modules/<release>`). Returns its path.
pub fn build(agent: &Path, modules_dir: &Path, cache_dir: &Path) -> Result<PathBuf, VmError> {
    let agent_bytes = read(agent)?;
    let mut modules = Vec::new();
    for m in MODULES {
        let path = modules_dir.join("kernel").join(m);
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(m)
            .to_string();
        modules.push((name, read(&path)?));
    }
    let mut hash = Sha256::new();
    hash.update(&agent_bytes);
    for (name, data) in &modules {
        hash.update(name.as_bytes());
        hash.update(data);
    }
    let key = hex::encode(hash.finalize());
    let target = cache_dir.join(format!("initramfs-{}.cpio", &key[..16]));
    if target.exists() {
        return Ok(target);
    }
    let mut cpio = Cpio::default();
    for d in [
        "dev", "proc", "sys", "lower", "scratch", "newroot", "modules",
    ] {
        cpio.dir(d);
    }
    cpio.file("init", true, &agent_bytes);
    let order: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    cpio.file("modules/order", false, order.join("\n").as_bytes());
    for (name, data) in &modules {
        cpio.file(&format!("modules/{name}"), false, data);
    }
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| VmError::io(format!("creating {}", cache_dir.display()), e))?;
    let tmp = cache_dir.join(format!(".initramfs-{}", uuid::Uuid::new_v4()));
    std::fs::write(&tmp, cpio.finish())
        .map_err(|e| VmError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &target)
        .map_err(|e| VmError::io(format!("placing {}", target.display()), e))?;
    tracing::info!(path = %target.display(), "built guest initramfs");
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_archive_is_readable_by_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cpio::default();
        c.dir("modules");
        c.file("init", true, b"#!/bin/sh\necho hi\n");
        c.file("modules/order", false, b"a.ko");
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, c.finish()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-i", "-d", "--quiet", "-F"])
            .arg(&archive)
            .current_dir(dir.path())
            .output()
            .expect("cpio is installed by scripts/install-vm.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(dir.path().join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("modules/order")).unwrap(),
            b"a.ko"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
