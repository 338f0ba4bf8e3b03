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

#[cfg(test)]
mod tests {
    use super::*;

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
