//! Bringing a microVM action's logs and outputs back to the host, confined.
//!
//! The guest is root and can write its block devices, so nothing it wrote is
//! parsed as a filesystem here. The agent packs the logs and the declared
//! outputs as a tar stream onto the raw output disk (`PackOutputs`); after
//! the VM is stopped or killed, [`unpack`] reads that file as hostile input:
//!
//! - bounded: never past the file's size, at most `max_bytes` of file data
//!   and `max_entries` entries, names of at most [`MAX_NAME`] bytes;
//! - names are validated: relative, UTF-8, no NUL, no empty, `.` or `..`
//!   components, and either `stdout`, `stderr` or beneath `root/`; each name
//!   at most once;
//! - only regular files, directories and symlinks are written, into a fresh,
//!   empty input root, with [`confined::Dir`](hearth_executor::confined::Dir):
//!   directories are never created or entered through a symlink, files are
//!   created with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0644 or 0755 only;
//! - a FIFO, device or socket fails the action with FAILED_PRECONDITION
//!   naming it, as the executor does for host actions; hard links, PAX
//!   headers, sparse files and anything else are refused.
//!
//! The executor's normal collection then walks the fresh root exactly as
//! for a host action.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use hearth_executor::confined::{Dir, WalkError};
use hearth_executor::{ExecError, RunSpec};
use hearth_guest::protocol::SOCKET_ENTRY_TYPE;
use tar::EntryType;

use crate::pool::Lease;
use crate::VmError;

/// Longest entry name or symlink target accepted (a GNU long-name entry is
/// read into memory, so it must be bounded; Linux's PATH_MAX).
pub const MAX_NAME: u64 = 4096;
/// Deepest entry name accepted, in components.
const MAX_COMPONENTS: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// File data written, in total.
    pub max_bytes: u64,
    pub max_entries: u64,
}

/// Where the unpacked archive goes.
pub struct Target<'a> {
    /// Removed, then recreated empty, then filled with the `root/` entries.
    pub input_root: &'a Path,
    pub stdout: &'a Path,
    pub stderr: &'a Path,
    /// The action's working directory (relative to the root): error
    /// messages name outputs relative to it, as the executor does.
    pub working_directory: &'a str,
    /// Names the VM in error messages.
    pub label: &'a str,
}

enum Name {
    Stdout,
    Stderr,
    /// Components beneath the input root (empty: the root itself).
    Root(Vec<String>),
}

struct Unpacker<'a> {
    t: &'a Target<'a>,
    limits: Limits,
    root: Dir,
    /// File data that may still be written.
    budget: u64,
    /// Entry names seen, each allowed once.
    seen: HashSet<String>,
}

impl Unpacker<'_> {
    fn refused(&self, why: impl std::fmt::Display) -> ExecError {
        ExecError::Precondition(format!(
            "{}: the output archive was refused: {why}",
            self.t.label
        ))
    }

    fn malformed(&self, e: io::Error) -> ExecError {
        ExecError::Precondition(format!(
            "{}: the output archive is malformed: {e}",
            self.t.label
        ))
    }

    /// Host-side failures stay I/O errors (a full disk is RESOURCE_EXHAUSTED);
    /// anything else creating a name the guest chose is the guest's doing.
    fn creating(&self, shown: &str, e: io::Error) -> ExecError {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            ExecError::io(format!("unpacking {shown:?}"), e)
        } else {
            self.refused(format!("{shown:?} cannot be created: {e}"))
        }
    }

    fn walk(&self, e: WalkError) -> ExecError {
        match e {
            WalkError::SymlinkParent(p) => self.refused(format!(
                "{p:?} is a symlink, and nothing is unpacked through a symlink"
            )),
            WalkError::Missing(p) => self.refused(format!("{p:?} is not a directory")),
            WalkError::Io { context, source } => self.creating(&context, source),
        }
    }

    fn name(&self, raw: &[u8]) -> Result<Name, ExecError> {
        let s = std::str::from_utf8(raw)
            .map_err(|_| self.refused(format!("entry name {raw:?} is not UTF-8")))?;
        if s.contains('\0') || s.starts_with('/') {
            return Err(self.refused(format!("entry name {s:?} is not a relative path")));
        }
        match s {
            "stdout" => return Ok(Name::Stdout),
            "stderr" => return Ok(Name::Stderr),
            _ => {}
        }
        let trimmed = s.strip_suffix('/').unwrap_or(s);
        let mut parts = trimmed.split('/');
        if parts.next() != Some("root") {
            return Err(self.refused(format!("entry {s:?} is not beneath root/")));
        }
        let parts: Vec<String> = parts.map(String::from).collect();
        if parts.iter().any(|p| p.is_empty() || p == "." || p == "..") {
            return Err(self.refused(format!(
                "entry name {s:?} has an empty, `.` or `..` component"
            )));
        }
        if parts.len() > MAX_COMPONENTS {
            return Err(self.refused(format!(
                "entry name {s:?} is deeper than {MAX_COMPONENTS} components"
            )));
        }
        Ok(Name::Root(parts))
    }

    /// An output path as the executor names it: relative to the working
    /// directory when it is beneath it.
    fn shown(&self, parts: &[String]) -> String {
        let joined = parts.join("/");
        let wd = self.t.working_directory;
        if wd.is_empty() {
            return joined;
        }
        joined
            .strip_prefix(wd)
            .and_then(|r| r.strip_prefix('/'))
            .map_or(joined.clone(), String::from)
    }

    /// The directory holding `parts`' last component (made as needed) and
    /// that component.
    fn parent<'p>(&self, parts: &'p [String]) -> Result<(Dir, &'p str), ExecError> {
        let Some((last, dirs)) = parts.split_last() else {
            return Err(self.refused("a file or symlink entry names the root itself"));
        };
        let dir = self.root.make_dirs(dirs, 0o755).map_err(|e| self.walk(e))?;
        Ok((dir, last))
    }

    /// Copies exactly `size` bytes of `data` into `out`.
    fn copy(&mut self, data: &mut impl Read, size: u64, out: File) -> Result<(), ExecError> {
        if size > self.budget {
            return Err(self.refused(format!(
                "the outputs exceed the output disk's {} bytes",
                self.limits.max_bytes
            )));
        }
        self.budget -= size;
        let mut out = io::BufWriter::new(out);
        let copied = io::copy(&mut data.take(size), &mut out).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                ExecError::io("unpacking the outputs", e)
            } else {
                self.malformed(e)
            }
        })?;
        if copied != size {
            return Err(self.malformed(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("an entry claims {size} bytes, the archive holds {copied}"),
            )));
        }
        out.flush()
            .map_err(|e| ExecError::io("unpacking the outputs", e))
    }

    /// Reads a GNU long-name or long-link entry's data (bounded).
    fn long_name(&self, data: &mut impl Read, size: u64) -> Result<Vec<u8>, ExecError> {
        if size > MAX_NAME {
            return Err(self.refused(format!("a long name of {size} bytes (at most {MAX_NAME})")));
        }
        let mut v = Vec::with_capacity(size as usize);
        data.take(size)
            .read_to_end(&mut v)
            .map_err(|e| self.malformed(e))?;
        // GNU tar NUL-terminates long names.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(v)
    }

    fn log(&mut self, path: &Path, data: &mut impl Read, size: u64) -> Result<(), ExecError> {
        let out = File::options()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| ExecError::io(format!("opening {}", path.display()), e))?;
        self.copy(data, size, out)
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_name: Vec<u8>,
        link: Option<Vec<u8>>,
    ) -> Result<(), ExecError> {
        let header = entry.header().clone();
        let kind = header.entry_type();
        let size = header.entry_size().map_err(|e| self.malformed(e))?;
        let name = self.name(&raw_name)?;
        let key = String::from_utf8_lossy(&raw_name)
            .trim_end_matches('/')
            .to_string();
        if !self.seen.insert(key.clone()) {
            return Err(self.refused(format!("entry {key:?} appears twice")));
        }
        if link.is_some() && kind != EntryType::Symlink {
            return Err(self.refused(format!(
                "entry {key:?} has a long link name but is no symlink"
            )));
        }
        match (name, kind) {
            (Name::Stdout, EntryType::Regular) => self.log(self.t.stdout, entry, size),
            (Name::Stderr, EntryType::Regular) => self.log(self.t.stderr, entry, size),
            (Name::Stdout | Name::Stderr, _) => {
                Err(self.refused(format!("entry {key:?} is not a regular file")))
            }
            (Name::Root(parts), EntryType::Regular) => {
                let mode = header.mode().map_err(|e| self.malformed(e))?;
                let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                let (dir, last) = self.parent(&parts)?;
                let shown = parts.join("/");
                let out = dir
                    .create_file(last, mode)
                    .map_err(|e| self.creating(&shown, e))?;
                self.copy(entry, size, out)
            }
            (Name::Root(parts), EntryType::Directory) => {
                self.root
                    .make_dirs(&parts, 0o755)
                    .map_err(|e| self.walk(e))?;
                Ok(())
            }
            (Name::Root(parts), EntryType::Symlink) => {
                let target = match link {
                    Some(t) => t,
                    None => header
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default(),
                };
                let target = String::from_utf8(target)
                    .ok()
                    .filter(|t| !t.is_empty() && !t.contains('\0'))
                    .ok_or_else(|| {
                        self.refused(format!(
                            "symlink {key:?} has an empty, NUL-holding or non-UTF-8 target"
                        ))
                    })?;
                let (dir, last) = self.parent(&parts)?;
                dir.symlink(&target, last)
                    .map_err(|e| self.creating(&parts.join("/"), e))
            }
            (Name::Root(parts), k) => {
                let what = match k {
                    EntryType::Fifo => Some("a FIFO"),
                    EntryType::Char | EntryType::Block => Some("a device"),
                    k if k.as_byte() == SOCKET_ENTRY_TYPE => Some("a socket"),
                    _ => None,
                };
                match what {
                    Some(what) => Err(ExecError::Precondition(format!(
                        "output {:?} is {what}; outputs must be regular files, directories or symlinks",
                        self.shown(&parts)
                    ))),
                    None if k == EntryType::Link => {
                        Err(self.refused(format!("entry {key:?} is a hard link")))
                    }
                    None => Err(self.refused(format!(
                        "entry {key:?} has type {:?}; only files, directories and symlinks are unpacked",
                        k.as_byte() as char
                    ))),
                }
            }
        }
    }
}

/// Unpacks the output archive in `image` (see the module docs) into a fresh
/// `t.input_root` and the log files. Blocking: run it on the blocking pool,
/// and only while the VM is stopped or gone.
pub fn unpack(image: &Path, limits: Limits, t: &Target<'_>) -> Result<(), ExecError> {
    match std::fs::remove_dir_all(t.input_root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ExecError::io("clearing the input root", e)),
    }
    std::fs::create_dir(t.input_root).map_err(|e| ExecError::io("recreating the input root", e))?;
    for log in [t.stdout, t.stderr] {
        match std::fs::remove_file(log) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ExecError::io(format!("removing {}", log.display()), e)),
        }
        File::options()
            .write(true)
            .create_new(true)
            .open(log)
            .map_err(|e| ExecError::io(format!("creating {}", log.display()), e))?;
    }
    let root =
        Dir::open(t.input_root).map_err(|e| ExecError::io("opening the fresh input root", e))?;
    let file =
        File::open(image).map_err(|e| ExecError::io(format!("opening {}", image.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| ExecError::io(format!("reading {}", image.display()), e))?
        .len();
    let mut u = Unpacker {
        t,
        limits,
        root,
        budget: limits.max_bytes,
        seen: HashSet::new(),
    };
    // Raw entries: GNU long names are handled here, bounded (the tar crate
    // would read extension entries of any size into memory), and PAX
    // headers, which could override sizes and names, are refused.
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file.take(len)));
    let entries = archive.entries().map_err(|e| u.malformed(e))?.raw(true);
    let mut long_name = None;
    let mut long_link = None;
    let mut count = 0u64;
    for entry in entries {
        count += 1;
        if count > limits.max_entries {
            return Err(u.refused(format!("more than {} entries", limits.max_entries)));
        }
        let mut entry = entry.map_err(|e| u.malformed(e))?;
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size().map_err(|e| u.malformed(e))?;
        if kind.is_gnu_longname() || kind.is_gnu_longlink() {
            let slot = if kind.is_gnu_longname() {
                &mut long_name
            } else {
                &mut long_link
            };
            if slot.is_some() {
                return Err(u.refused("two long names for one entry"));
            }
            *slot = Some(u.long_name(&mut entry, size)?);
            continue;
        }
        let name = match long_name.take() {
            Some(n) => n,
            None => entry.header().path_bytes().into_owned(),
        };
        u.entry(&mut entry, name, long_link.take())?;
    }
    if long_name.is_some() || long_link.is_some() {
        return Err(u.refused("a long name with no entry after it"));
    }
    Ok(())
}

/// Entries in an output archive, at most.
const MAX_OUTPUT_ENTRIES: u64 = 1_000_000;

/// A sparse file of `size` bytes: the raw output disk, new or reset so that
/// nothing of an earlier action can be read from it. (Two metadata calls,
/// no data written: cheap enough for an async thread.)
pub(crate) fn reset_disk(path: &Path, size: u64) -> Result<(), VmError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| VmError::io(format!("creating {}", path.display()), e))?;
    f.set_len(size)
        .map_err(|e| VmError::io(format!("sizing {}", path.display()), e))
}

/// Unpacks the logs and outputs the agent packed onto the output disk
/// (the VM must be stopped or gone), or, when it packed nothing, leaves
/// empty logs.
pub(crate) async fn collect(lease: &Lease, spec: &RunSpec, packed: bool) -> Result<(), ExecError> {
    let image = lease.out_image.clone();
    let limits = Limits {
        max_bytes: lease.out_size,
        max_entries: MAX_OUTPUT_ENTRIES,
    };
    let (root, stdout, stderr) = (
        spec.input_root.clone(),
        spec.stdout_path.clone(),
        spec.stderr_path.clone(),
    );
    let wd = spec.working_directory.clone();
    let label = format!(
        "microVM {}",
        lease
            .dir
            .0
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    );
    tokio::task::spawn_blocking(move || {
        if !packed {
            for log in [&stdout, &stderr] {
                std::fs::write(log, b"").map_err(|e| ExecError::io("creating stdout/stderr", e))?;
            }
            return Ok(());
        }
        let t = Target {
            input_root: &root,
            stdout: &stdout,
            stderr: &stderr,
            working_directory: &wd,
            label: &label,
        };
        unpack(&image, limits, &t)
    })
    .await
    .map_err(|e| ExecError::Internal(format!("output unpacking thread: {e}")))?
}

#[cfg(test)]
#[path = "outputs_tests.rs"]
mod tests;
