//! Walking an action's directory without ever following a symlink. The
//! action (or a guest) controls everything beneath its root: any component
//! may have been replaced by a symlink to `/`. Every lookup here starts from
//! a directory file descriptor and opens one component at a time with
//! `O_NOFOLLOW`, so a path can only mean what its components are, beneath
//! the root. The last component is reported as what it is (a symlink is a
//! symlink), and nothing is opened in a way that could block (FIFOs) or
//! reach a device.
//!
//! A hand-written component walk rather than `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`: it needs no kernel ≥ 5.6 fallback, and it tells a
//! symlinked parent apart from a missing one, which the error messages use.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};

/// What a name in a directory is, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File { executable: bool, size: u64 },
    Directory,
    Symlink,
    Fifo,
    Socket,
    Device,
}

impl Kind {
    fn of(stat: &rustix::fs::Stat) -> Kind {
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Kind::File {
                executable: stat.st_mode & 0o111 != 0,
                size: stat.st_size as u64,
            },
            FileType::Directory => Kind::Directory,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            _ => Kind::Device,
        }
    }

    /// For messages: "a FIFO", "a socket", …
    pub fn describe(self) -> &'static str {
        match self {
            Kind::File { .. } => "a regular file",
            Kind::Directory => "a directory",
            Kind::Symlink => "a symlink",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::Device => "a device",
        }
    }
}

/// Why a path beneath the root could not be walked.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// A component (named, relative to the root) is not there, or is a file.
    #[error("{0} does not exist")]
    Missing(String),
    /// A parent component is a symlink; it is never followed.
    #[error("{0} is a symlink, and paths are never resolved through symlinks")]
    SymlinkParent(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>, e: rustix::io::Errno) -> WalkError {
    WalkError::Io {
        context: context.into(),
        source: e.into(),
    }
}

/// A directory reached without following symlinks.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens `path` (the caller's own directory, e.g. the workspace root).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir { fd })
    }

    /// The directory at `components` beneath this one. `shown` prefixes
    /// component names in errors (the path of `self` relative to the root).
    pub fn descend(&self, components: &[String], shown: &str) -> Result<Dir, WalkError> {
        let mut cur = Dir {
            fd: self.fd.try_clone().map_err(|e| WalkError::Io {
                context: "duplicating a directory descriptor".into(),
                source: e,
            })?,
        };
        let mut so_far = shown.to_string();
        for c in components {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(c);
            cur = cur.child_dir(c, &so_far)?;
        }
        Ok(cur)
    }

    fn child_dir(&self, name: &str, shown: &str) -> Result<Dir, WalkError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => Ok(Dir { fd }),
            Err(e) => match self.kind(name) {
                Ok(Some(Kind::Symlink)) => Err(WalkError::SymlinkParent(shown.into())),
                Ok(Some(Kind::Directory)) | Err(_) => Err(io_err(format!("opening {shown}"), e)),
                Ok(_) => Err(WalkError::Missing(shown.into())),
            },
        }
    }

    /// What `name` is, or None if there is nothing by that name.
    pub fn kind(&self, name: &str) -> io::Result<Option<Kind>> {
        match rustix::fs::statat(&self.fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Kind::of(&st))),
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the directory `name` in this one, never following a symlink.
    pub fn dir(&self, name: &str) -> io::Result<Dir> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(Dir {
            fd: rustix::fs::openat(&self.fd, name, flags, Mode::empty())?,
        })
    }

    /// Opens the regular file `name` for reading. Refuses anything that is
    /// not a regular file once opened (it may have been swapped since it was
    /// looked at); `O_NONBLOCK` keeps a FIFO swapped in from blocking.
    pub fn file(&self, name: &str) -> io::Result<File> {
        let flags =
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::other(format!(
                "{name} is {}, not a regular file",
                Kind::of(&st).describe()
            )));
        }
        // Reads of a regular file never block; clear the flag anyway so the
        // descriptor behaves like any other file.
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: &str) -> io::Result<String> {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())?;
        Ok(target.to_string_lossy().into_owned())
    }

    /// The names in this directory (not `.` or `..`), sorted.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let dup = self.fd.as_fd().try_clone_to_owned()?;
        let mut dir = rustix::fs::Dir::read_from(&dup)?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            names.push(String::from_utf8_lossy(name).into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Creates the directory `name` (if absent) and opens it; an existing
    /// symlink or file by that name is an error, never followed.
    pub fn make_dir(&self, name: &str, mode: u32) -> io::Result<Dir> {
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.dir(name)
    }

    /// Creates the directories `components` beneath this one, returning the
    /// last. A component that exists as a symlink is refused.
    pub fn make_dirs(&self, components: &[String], mode: u32) -> Result<Dir, WalkError> {
        let mut cur = self.descend(&[], "")?;
        let mut so_far = String::new();
        for c in components {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(c);
            cur = match cur.make_dir(c, mode) {
                Ok(d) => d,
                Err(e) => {
                    return Err(match cur.kind(c) {
                        Ok(Some(Kind::Symlink)) => WalkError::SymlinkParent(so_far),
                        _ => WalkError::Io {
                            context: format!("creating {so_far}"),
                            source: e,
                        },
                    })
                }
            };
        }
        Ok(cur)
    }

    /// Creates the new regular file `name` (it must not exist; never through
    /// a symlink) for writing.
    pub fn create_file(&self, name: &str, mode: u32) -> io::Result<File> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))?;
        Ok(File::from(fd))
    }

    /// Creates the symlink `name` → `target`.
    pub fn symlink(&self, target: &str, name: &str) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, &self.fd, name)?)
    }

    /// Changes the owner of this directory.
    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        Ok(rustix::fs::fchown(
            &self.fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_symlinked_parent_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        symlink("/", root.join("out")).unwrap();
        symlink("/etc", root.join("etc-link")).unwrap();
        let r = Dir::open(&root).unwrap();
        let e = r.descend(&names(&["out", "etc"]), "").unwrap_err();
        assert!(
            matches!(e, WalkError::SymlinkParent(ref p) if p == "out"),
            "{e}"
        );
        assert!(r.make_dirs(&names(&["out", "x"]), 0o755).is_err());
        assert_eq!(r.kind("etc-link").unwrap(), Some(Kind::Symlink));
        assert!(
            r.file("etc-link").is_err(),
            "the last component is not followed either"
        );
        assert!(r.dir("etc-link").is_err());
        assert_eq!(r.read_link("etc-link").unwrap(), "/etc");
    }

    #[test]
    fn missing_and_file_parents_are_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let r = Dir::open(dir.path()).unwrap();
        assert!(matches!(
            r.descend(&names(&["nope", "x"]), "").unwrap_err(),
            WalkError::Missing(p) if p == "nope"
        ));
        assert!(matches!(
            r.descend(&names(&["f"]), "").unwrap_err(),
            WalkError::Missing(p) if p == "f"
        ));
        assert_eq!(r.kind("nope").unwrap(), None);
    }

    #[test]
    fn a_fifo_neither_blocks_nor_reads_as_a_file() {
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&dir.path().join("p"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let r = Dir::open(dir.path()).unwrap();
        assert_eq!(r.kind("p").unwrap(), Some(Kind::Fifo));
        let e = r.file("p").unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    #[test]
    fn creates_files_and_dirs_beneath_without_following() {
        let dir = tempfile::tempdir().unwrap();
        let r = Dir::open(dir.path()).unwrap();
        let d = r.make_dirs(&names(&["a", "b"]), 0o755).unwrap();
        use std::io::Write;
        d.create_file("f", 0o644).unwrap().write_all(b"hi").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a/b/f")).unwrap(), b"hi");
        d.symlink("/etc/passwd", "l").unwrap();
        assert!(
            d.create_file("l", 0o644).is_err(),
            "no write through a symlink"
        );
        assert_eq!(
            r.descend(&names(&["a", "b"]), "").unwrap().names().unwrap(),
            ["f", "l"]
        );
    }
}
