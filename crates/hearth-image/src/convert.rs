//! Staging directory → ext4 disk image, with `mkfs.ext4 -d` (e2fsprogs): no mount, no
//! root privileges needed for the image itself, ownership and modes copied from the tree.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// Size of an unpacked tree, as ext4 will need it.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeStats {
    /// Data blocks: file contents rounded up to 4 KiB, a block per directory and per
    /// symlink too long to live in its inode.
    pub bytes: u64,
    pub inodes: u64,
}

/// Walks `root` without following symlinks; hardlinked files count once.
pub fn measure(root: &Path) -> io::Result<TreeStats> {
    let mut stats = TreeStats::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        stats.inodes += 1;
        stats.bytes += BLOCK;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let m = entry.metadata()?; // DirEntry::metadata does not follow symlinks
            if m.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            stats.inodes += 1;
            if m.is_file() {
                stats.bytes += m.len().div_ceil(BLOCK) * BLOCK;
            } else if m.file_type().is_symlink() && m.len() >= 60 {
                stats.bytes += BLOCK;
            }
        }
    }
    Ok(stats)
}

/// Image size and inode count for a tree: ×1.2 + 64 MiB headroom (journal, metadata,
/// a little free space), at least 64 MiB, whole MiB.
pub fn plan(stats: TreeStats) -> (u64, u64) {
    let inodes = (stats.inodes + stats.inodes / 4 + 1024).max(4096);
    let size = stats.bytes + stats.bytes / 5 + inodes * INODE_SIZE + 64 * MIB;
    let size = size.max(64 * MIB).div_ceil(MIB) * MIB;
    // mke2fs's default is one inode per 16 KiB; never ask for fewer than that.
    (size, inodes.max(size / 16384))
}

/// Finds an e2fsprogs tool: on PATH, else in the sbin directories it lives in.
pub fn tool(name: &str) -> PathBuf {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `mkfs.ext4 -q -F -d STAGING -L hearth-image -N INODES -m 0 IMG SIZE`, creating
/// `image`. If the tree does not fit, tries once more at twice the size. Returns the size.
pub fn make_ext4(staging: &Path, image: &Path, stats: TreeStats) -> Result<u64, String> {
    let (mut size, inodes) = plan(stats);
    let mut last_err = String::new();
    for _attempt in 0..2 {
        let _ = fs::remove_file(image);
        let out = Command::new(tool("mkfs.ext4"))
            .args(["-q", "-F", "-L", "hearth-image", "-m", "0"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(staging)
            .arg(image)
            .arg(format!("{}k", size / 1024))
            .output()
            .map_err(|e| format!("running mkfs.ext4 (is e2fsprogs installed?): {e}"))?;
        if out.status.success() {
            return Ok(size);
        }
        last_err = format!(
            "mkfs.ext4 of {} MiB with {inodes} inodes exited with {}: {}",
            size / MIB,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        tracing::warn!("{last_err}; retrying larger");
        size *= 2;
    }
    let _ = fs::remove_file(image);
    Err(last_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_has_headroom_and_a_floor() {
        let (size, inodes) = plan(TreeStats {
            bytes: 0,
            inodes: 1,
        });
        assert_eq!(size, 65 * MIB); // 64 MiB + the inode tables of the minimum 4096 inodes
        assert!(inodes >= 4096);
        let (size, inodes) = plan(TreeStats {
            bytes: 1000 * MIB,
            inodes: 100_000,
        });
        assert!((1264 * MIB..1300 * MIB).contains(&size), "{size}");
        assert!(inodes >= 125_000);
    }

    #[test]
    fn mkfs_failures_carry_its_stderr_and_leave_no_image() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("x.ext4");
        let err = make_ext4(&d.path().join("missing"), &image, TreeStats::default()).unwrap_err();
        assert!(
            err.contains("mkfs.ext4") && err.contains("while populating file system"),
            "{err}"
        );
        assert!(!image.exists());
    }

    #[test]
    fn measure_counts_hardlinks_once() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a"), vec![1u8; 5000]).unwrap();
        fs::hard_link(d.path().join("a"), d.path().join("b")).unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("sub/l")).unwrap();
        let s = measure(d.path()).unwrap();
        assert_eq!(s.inodes, 4); // root, sub, a(=b), l
        assert_eq!(s.bytes, 2 * BLOCK + 2 * BLOCK);
    }
}
