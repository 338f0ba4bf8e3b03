//! Unix sockets anywhere, whatever the length of their directory's path.
//!
//! A socket address holds at most 108 bytes (`sun_path`), and a VM's run
//! directory under a long `--data-dir` or `--work-dir` is longer than that.
//! A directory held open as a descriptor gives its sockets a short name,
//! `/proc/self/fd/N/NAME`, that reaches the same directory entry: the kernel
//! follows the descriptor, not the path. QEMU, which binds the VM's sockets
//! itself, inherits the descriptor under the same number and is given the
//! same short names. The sockets stay in the (private, 0700) directory,
//! and go with it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A directory held open so that sockets in it have short names.
#[derive(Debug)]
pub struct SocketDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl SocketDir {
    /// Creates the directory (and its parents) accessible to this user
    /// only, or makes an existing one so, and opens it.
    pub fn create_private(path: &Path) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)?;
        // `recursive` leaves an existing directory's mode alone.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        Self::open(path)
    }

    /// Opens an existing directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        // std opens with O_CLOEXEC: only children told to inherit it get it.
        let dir = std::fs::File::open(path)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(SocketDir {
            path: path.to_path_buf(),
            fd: dir.into(),
        })
    }

    /// The directory's real path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name`'s real path, for messages and for files that aren't sockets.
    pub fn real(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `name`'s short path: valid in this process, and in a child that
    /// [`inherit`]s [`Self::raw_fd`].
    pub fn short(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Connects to the socket `name` in this directory.
    pub async fn connect(&self, name: &str) -> io::Result<tokio::net::UnixStream> {
        tokio::net::UnixStream::connect(self.short(name)).await
    }

    /// Binds the socket `name` in this directory, replacing a stale one.
    pub fn bind(&self, name: &str) -> io::Result<tokio::net::UnixListener> {
        if let Err(e) = std::fs::remove_file(self.real(name)) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        tokio::net::UnixListener::bind(self.short(name))
    }
}

/// For a `pre_exec` hook: keeps `fd` open, under the same number, in the
/// program about to be executed. Async-signal-safe (one fcntl).
pub fn inherit(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor number; no memory is touched.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to the Unix socket at `path`, however long the path is.
pub fn connect_std(path: &Path) -> io::Result<std::os::unix::net::UnixStream> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a socket", path.display()),
        )
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = SocketDir::open(parent)?;
    std::os::unix::net::UnixStream::connect(dir.short(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A directory whose sockets' real paths are far beyond sun_path.
    fn deep(root: &Path) -> PathBuf {
        let mut p = root.to_path_buf();
        for i in 0..6 {
            p.push(format!("{i}-{}", "d".repeat(40)));
        }
        p
    }

    #[tokio::test]
    async fn sockets_deeper_than_sun_path_bind_and_connect() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = deep(tmp.path()).join("run");
        assert!(dir.join("agent.sock").as_os_str().len() > 200);
        let sd = SocketDir::create_private(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "the directory is private"
        );
        let listener = sd.bind("agent.sock").unwrap();
        assert!(
            std::fs::symlink_metadata(dir.join("agent.sock")).is_ok(),
            "the socket is in the real directory"
        );
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"hi").await.unwrap();
        });
        let mut buf = [0u8; 2];
        sd.connect("agent.sock")
            .await
            .unwrap()
            .read_exact(&mut buf)
            .await
            .unwrap();
        assert_eq!(&buf, b"hi");
        // As `hearth forward-unix` does, from the path alone.
        let path = dir.join("agent.sock");
        let again = sd.bind("agent.sock").unwrap();
        let t = tokio::spawn(async move { again.accept().await.map(|_| ()) });
        tokio::task::spawn_blocking(move || connect_std(&path))
            .await
            .unwrap()
            .unwrap();
        t.await.unwrap().unwrap();
    }

    #[test]
    fn an_existing_directory_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        SocketDir::create_private(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[tokio::test]
    async fn only_a_child_told_to_inherits_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = deep(tmp.path());
        let sd = SocketDir::create_private(&dir).unwrap();
        let fd = sd.raw_fd();
        // The short names lead into the directory in the child too (QEMU
        // binds the VM's sockets there).
        let probe = || {
            let mut cmd = tokio::process::Command::new("sh");
            cmd.args(["-c", "test -d \"$0\""]).arg(sd.short("."));
            cmd
        };
        let mut cmd = probe();
        // SAFETY: inherit only calls fcntl.
        unsafe {
            cmd.pre_exec(move || inherit(fd));
        }
        assert!(cmd.status().await.unwrap().success());
        assert!(
            !probe().status().await.unwrap().success(),
            "the descriptor is close-on-exec otherwise"
        );
    }
}
