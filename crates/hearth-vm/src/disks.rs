//! Disk images for a VM, made with e2fsprogs: an empty scratch disk and the
//! workspace disk built from the action's input directory. The host never
//! reads a filesystem the guest could have written (outputs come back
//! through the raw output disk, see outputs.rs).

use std::path::Path;

use tokio::process::Command;

use crate::VmError;

async fn run(cmd: &mut Command, what: &str) -> Result<String, VmError> {
    let out = cmd
        .output()
        .await
        .map_err(|e| VmError::io(format!("running {what}"), e))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(VmError::Setup(format!(
            "{what} failed ({}): {}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(stderr)
}

/// A sparse ext4 image of `size_bytes`, populated from `from` when given.
pub async fn mkfs(path: &Path, size_bytes: u64, from: Option<&Path>) -> Result<(), VmError> {
    let mut cmd = Command::new("mkfs.ext4");
    // No journal: these disks live as long as one VM. No blocks reserved for
    // growing the filesystem (they never grow), which halves mkfs's time;
    // lazy init keeps it fast too.
    cmd.args([
        "-q",
        "-F",
        "-O",
        "^has_journal,^resize_inode",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1",
    ]);
    if let Some(dir) = from {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(path)
        .arg(format!("{}k", size_bytes.div_ceil(1024).max(16 * 1024)));
    run(&mut cmd, &format!("mkfs.ext4 {}", path.display()))
        .await
        .map(|_| ())
}

/// A qcow2 overlay at `path` whose reads fall through to the raw `base`
/// until written: a clone's private view of a snapshot's disk. `base` must
/// not change while the overlay lives (the snapshot's files are immutable).
pub async fn overlay(base: &Path, path: &Path) -> Result<(), VmError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(path);
    run(
        &mut cmd,
        &format!("qemu-img create (overlay of {})", base.display()),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes through the overlay land in it, never in the base; reads of
    /// untouched blocks see the base.
    #[tokio::test]
    async fn an_overlay_reads_its_base_and_keeps_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let mut content = vec![0x11u8; 1 << 20];
        content[4096..8192].fill(0x22);
        std::fs::write(&base, &content).unwrap();
        let top = dir.path().join("clone.qcow2");
        overlay(&base, &top).await.unwrap();
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 0 4096"])
            .arg(&top)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            std::fs::read(&base).unwrap(),
            content,
            "the base is untouched"
        );
        let flat = dir.path().join("flat.img");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&top)
            .arg(&flat)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let seen = std::fs::read(&flat).unwrap();
        assert!(seen[..4096].iter().all(|b| *b == 0xab), "the write");
        assert!(
            seen[4096..8192].iter().all(|b| *b == 0x22),
            "the base shows through"
        );
        assert_eq!(seen.len(), content.len());
        let e = overlay(&dir.path().join("missing.img"), &dir.path().join("x.qcow2"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("qemu-img create"), "{e}");
    }

    #[tokio::test]
    async fn workspace_image_is_built_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ws");
        std::fs::create_dir_all(src.join("root/pkg")).unwrap();
        std::fs::write(src.join("root/pkg/in.txt"), b"input").unwrap();
        let img = dir.path().join("ws.img");
        mkfs(&img, 64 << 20, Some(&src)).await.unwrap();
        assert!(std::fs::metadata(&img).unwrap().len() >= 16 << 20);
        let e = mkfs(&img, 64 << 20, Some(&dir.path().join("missing")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("mkfs.ext4"), "{e}");
    }
}
