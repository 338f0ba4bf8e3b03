//! Disk images for a VM, made and read with e2fsprogs: an empty scratch disk,
//! the workspace disk built from the action's input directory, and copying
//! the outputs back out with debugfs (no mount needed on the host).

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

/// Copies directory `guest_dir` of the image into `dest` (which must not
/// exist; it is created with that directory's contents).
pub async fn extract_dir(image: &Path, guest_dir: &str, dest: &Path) -> Result<(), VmError> {
    let staging = dest.with_extension("extract");
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(|e| VmError::io(format!("creating {}", staging.display()), e))?;
    let req = format!("rdump {guest_dir} {}", staging.display());
    let stderr = run(
        Command::new("debugfs").arg("-R").arg(&req).arg(image),
        "debugfs rdump",
    )
    .await?;
    let name = Path::new(guest_dir)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("root");
    let dumped = staging.join(name);
    if !dumped.is_dir() {
        return Err(VmError::Setup(format!(
            "debugfs could not extract {guest_dir}: {}",
            stderr.trim()
        )));
    }
    tokio::fs::rename(&dumped, dest)
        .await
        .map_err(|e| VmError::io(format!("moving outputs to {}", dest.display()), e))?;
    let _ = tokio::fs::remove_dir_all(&staging).await;
    Ok(())
}

/// Copies one file out of the image (missing file: `dest` is left absent).
pub async fn extract_file(image: &Path, guest_path: &str, dest: &Path) -> Result<(), VmError> {
    let req = format!("dump {guest_path} {}", dest.display());
    run(
        Command::new("debugfs").arg("-R").arg(&req).arg(image),
        "debugfs dump",
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn workspace_round_trip_through_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ws");
        std::fs::create_dir_all(src.join("root/pkg")).unwrap();
        std::fs::write(src.join("root/pkg/in.txt"), b"input").unwrap();
        std::os::unix::fs::symlink("pkg/in.txt", src.join("root/link")).unwrap();
        std::fs::write(src.join("stdout"), b"printed").unwrap();
        let img = dir.path().join("ws.img");
        mkfs(&img, 64 << 20, Some(&src)).await.unwrap();
        let out = dir.path().join("out");
        extract_dir(&img, "/root", &out).await.unwrap();
        assert_eq!(std::fs::read(out.join("pkg/in.txt")).unwrap(), b"input");
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            Path::new("pkg/in.txt")
        );
        let so = dir.path().join("stdout");
        extract_file(&img, "/stdout", &so).await.unwrap();
        assert_eq!(std::fs::read(&so).unwrap(), b"printed");
    }
}
