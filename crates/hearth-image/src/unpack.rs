//! Applies image layers (tar streams) to a staging directory, as overlay would stack them.
//!
//! Safety: every entry name is split into components; absolute names and `..` are
//! rejected. Intermediate directories are resolved one component at a time with
//! `lstat`: a symlink met on the way (placed by an earlier entry or layer) is resolved
//! *inside* the staging root, like a chroot would (absolute targets restart at the
//! root, `..` stops at it), so `/bin -> usr/bin` images work and nothing can point a
//! write outside. The last component is never followed: whatever is there is removed
//! and the new entry created with `O_CREAT|O_EXCL`. Hardlink targets are resolved the
//! same way and `link(2)` does not follow a symlink it is given.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;
use tracing::debug;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug)]
pub enum UnpackError {
    /// The layer tries to write outside the root (tar-slip) or is otherwise hostile.
    Unsafe(String),
    /// The layer is not a well-formed tar, or contradicts itself.
    Corrupt(String),
    /// Local I/O failed.
    Io(String),
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnpackError::Unsafe(m) => write!(f, "unsafe layer: {m}"),
            UnpackError::Corrupt(m) => write!(f, "malformed layer: {m}"),
            UnpackError::Io(m) => write!(f, "unpacking: {m}"),
        }
    }
}

fn io_err(what: impl std::fmt::Display, e: io::Error) -> UnpackError {
    UnpackError::Io(format!("{what}: {e}"))
}

/// Splits a tar entry name into normal components; rejects absolute names and `..`.
fn components(raw: &[u8]) -> Result<Vec<OsString>, UnpackError> {
    let shown = String::from_utf8_lossy(raw);
    if raw.first() == Some(&b'/') {
        return Err(UnpackError::Unsafe(format!("absolute path {shown:?}")));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::Unsafe(format!(
                    "path {shown:?} contains \"..\""
                )))
            }
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

/// Resolves directory components under `root`, following symlinks inside `root` only.
/// Missing directories are created (mode 0755) when `create`, else `Ok(None)`.
fn resolve_dir(
    root: &Path,
    comps: &[OsString],
    create: bool,
) -> Result<Option<PathBuf>, UnpackError> {
    let mut resolved = root.to_path_buf();
    let mut depth = 0usize;
    let mut pending: VecDeque<OsString> = comps.iter().cloned().collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            if depth > 0 {
                resolved.pop();
                depth -= 1;
            }
            continue;
        }
        let next = resolved.join(&c);
        match fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => {
                resolved = next;
                depth += 1;
            }
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(UnpackError::Unsafe(format!(
                        "too many symlinks at {}",
                        next.display()
                    )));
                }
                let target = fs::read_link(&next).map_err(|e| io_err(next.display(), e))?;
                let mut expanded = VecDeque::new();
                for part in target.components() {
                    match part {
                        Component::RootDir => {
                            resolved = root.to_path_buf();
                            depth = 0;
                        }
                        Component::Normal(n) => expanded.push_back(n.to_os_string()),
                        Component::ParentDir => expanded.push_back("..".into()),
                        Component::CurDir | Component::Prefix(_) => {}
                    }
                }
                expanded.extend(pending);
                pending = expanded;
            }
            Ok(_) => {
                return Err(UnpackError::Corrupt(format!(
                    "{} is not a directory but an entry is placed under it",
                    next.strip_prefix(root).unwrap_or(&next).display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&next)
                    .map_err(|e| io_err(next.display(), e))?;
                resolved = next;
                depth += 1;
            }
            Err(e) => return Err(io_err(next.display(), e)),
        }
    }
    Ok(Some(resolved))
}

/// Removes whatever is at `path` without following it; absent is fine.
fn remove_any(path: &Path) -> Result<(), UnpackError> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|e| io_err(format!("removing {}", path.display()), e))
}

/// What applying one layer did.
#[derive(Debug, Default)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
    pub skipped: u64,
}

/// Applies one uncompressed layer tar stream on top of `root`.
pub fn apply_layer(root: &Path, reader: impl Read) -> Result<LayerStats, UnpackError> {
    let root_user = nix::unistd::Uid::effective().is_root();
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| UnpackError::Corrupt(e.to_string()))?;
    // Paths this layer created: an opaque whiteout hides only what lower layers made.
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();
    let mut stats = LayerStats::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| UnpackError::Corrupt(format!("reading tar: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue;
        }
        let mut comps = components(&raw)?;
        let Some(name) = comps.pop() else {
            continue; // the root itself ("./")
        };
        stats.entries += 1;
        let name_bytes = name.as_bytes();
        if name_bytes.starts_with(WHITEOUT.as_bytes()) {
            stats.whiteouts += 1;
            let Some(dir) = resolve_dir(root, &comps, false)? else {
                continue;
            };
            if name_bytes == OPAQUE.as_bytes() {
                let list = fs::read_dir(&dir).map_err(|e| io_err(dir.display(), e))?;
                for child in list {
                    let child = child.map_err(|e| io_err(dir.display(), e))?.path();
                    if !created.contains(&child) {
                        remove_any(&child)?;
                    }
                }
            } else {
                let hidden = OsStr::from_bytes(&name_bytes[WHITEOUT.len()..]);
                if hidden.is_empty() || hidden == "." || hidden == ".." {
                    return Err(UnpackError::Unsafe(format!(
                        "whiteout {:?}",
                        String::from_utf8_lossy(&raw)
                    )));
                }
                let victim = dir.join(hidden);
                if !created.contains(&victim) {
                    remove_any(&victim)?;
                }
            }
            continue;
        }
        let dir = resolve_dir(root, &comps, true)?.expect("created");
        let path = dir.join(&name);
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| UnpackError::Corrupt(e.to_string()))?
            & 0o7777;
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let mtime = header.mtime().unwrap_or(0);
        let at = |e| io_err(path.display(), e);
        match kind {
            EntryType::Directory => {
                if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    remove_any(&path)?;
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(at)?;
                }
                dir_times.push((path.clone(), mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_any(&path)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(at)?;
                io::copy(&mut entry, &mut f).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::InvalidData
                    | io::ErrorKind::InvalidInput => {
                        UnpackError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(&raw)))
                    }
                    _ => io_err(path.display(), e),
                })?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        UnpackError::Corrupt(format!(
                            "symlink {:?} without target",
                            String::from_utf8_lossy(&raw)
                        ))
                    })?
                    .into_owned();
                remove_any(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(at)?;
            }
            EntryType::Link => {
                let target_raw = entry.link_name_bytes().unwrap_or_default().into_owned();
                let mut tcomps = components(&target_raw)?;
                let tname = tcomps.pop().ok_or_else(|| {
                    UnpackError::Corrupt(format!(
                        "hardlink {:?} without target",
                        String::from_utf8_lossy(&raw)
                    ))
                })?;
                let source = resolve_dir(root, &tcomps, false)?.map(|d| d.join(tname));
                let source = match source {
                    Some(s) if fs::symlink_metadata(&s).is_ok_and(|m| !m.is_dir()) => s,
                    _ => {
                        return Err(UnpackError::Corrupt(format!(
                            "hardlink {:?} to missing or directory target {:?}",
                            String::from_utf8_lossy(&raw),
                            String::from_utf8_lossy(&target_raw)
                        )))
                    }
                };
                if source != path {
                    remove_any(&path)?;
                    fs::hard_link(&source, &path).map_err(at)?;
                }
                created.insert(path);
                continue; // a hardlink shares its target's metadata
            }
            EntryType::Fifo => {
                remove_any(&path)?;
                nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600))
                    .map_err(|e| at(e.into()))?;
            }
            other => {
                // Device nodes (the VM's /dev is a devtmpfs) and unknown types.
                debug!(path = %String::from_utf8_lossy(&raw), ?other, "skipping tar entry");
                stats.skipped += 1;
                continue;
            }
        }
        if let Err(e) = std::os::unix::fs::lchown(&path, Some(uid), Some(gid)) {
            if root_user {
                return Err(at(e));
            }
        }
        if kind != EntryType::Symlink {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(at)?;
        }
        set_xattrs(&mut entry, &path);
        if kind != EntryType::Directory {
            set_mtime(&path, mtime);
        }
        created.insert(path);
    }
    // Directory times last: creating their children changed them.
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime);
    }
    Ok(stats)
}

fn set_mtime(path: &Path, secs: u64) {
    let t = TimeSpec::new(secs as i64, 0);
    if let Err(e) = utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink) {
        debug!(path = %path.display(), %e, "setting mtime");
    }
}

/// PAX `SCHILY.xattr.NAME` records (e.g. `security.capability` of ping); best effort.
fn set_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return;
    };
    for ext in exts.flatten() {
        let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        let (Ok(cpath), Ok(cname)) = (
            std::ffi::CString::new(path.as_os_str().as_bytes()),
            std::ffi::CString::new(name),
        ) else {
            continue;
        };
        let value = ext.value_bytes();
        // SAFETY: valid NUL-terminated strings and a live buffer of the given length.
        let rc = unsafe {
            nix::libc::lsetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            debug!(path = %path.display(), name = %String::from_utf8_lossy(name), err = %io::Error::last_os_error(), "setting xattr");
        }
    }
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
