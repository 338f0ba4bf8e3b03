//! `PackOutputs`: the action's logs and declared outputs as a tar stream on
//! the raw output disk, which the host reads after the VM is stopped. The
//! host parses nothing else the guest wrote, and trusts none of this: it
//! validates every entry (see hearth-vm's outputs.rs). Walking here never
//! follows a symlink (lstat only), so an honest agent packs what each path
//! *is*; a FIFO, socket or device is packed as such for the host to report.

use std::collections::HashSet;
use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use hearth_guest::protocol::{OUTPUT_ROOT_PREFIX, SOCKET_ENTRY_TYPE};
use tar::{EntryType, Header};

/// Directories nest at most this deep (the host refuses deeper trees anyway).
const MAX_DEPTH: usize = 512;

/// Counts what goes through to the device.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Exactly `size` bytes of `file`: truncated if it grew since it was
/// stat'ed, zero-padded if it shrank. Hand-written because the tar crate
/// copies the reader to its end and would write more than the header says
/// (something the action left running may still write to its outputs).
fn exactly(file: File, size: u64) -> impl Read {
    file.take(size).chain(io::repeat(0)).take(size)
}

struct Packer<W: Write> {
    tar: tar::Builder<W>,
    /// Entry names written, so that overlapping declared paths are packed once.
    packed: HashSet<String>,
}

fn header(kind: EntryType, mode: u32, size: u64, meta: Option<&Metadata>) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(meta.map_or(0, |m| m.mtime().max(0) as u64));
    h
}

impl<W: Write> Packer<W> {
    /// A log file as `name` (empty if it is missing or not a regular file).
    fn log(&mut self, name: &str, path: &str) -> io::Result<()> {
        let file = match fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => File::open(path).ok().map(|f| (f, m)),
            _ => None,
        };
        match file {
            Some((f, m)) => {
                let mut h = header(EntryType::Regular, 0o644, m.len(), Some(&m));
                self.tar.append_data(&mut h, name, exactly(f, m.len()))
            }
            None => {
                let mut h = header(EntryType::Regular, 0o644, 0, None);
                self.tar.append_data(&mut h, name, io::empty())
            }
        }
    }

    /// Packs `root/rel` as what it is; directories with all they hold.
    fn node(&mut self, root: &Path, rel: &str, depth: usize) -> io::Result<()> {
        let name = format!("{OUTPUT_ROOT_PREFIX}{rel}");
        if !self.packed.insert(name.clone()) {
            return Ok(());
        }
        let path = root.join(rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            let mut h = header(EntryType::Symlink, 0o777, 0, Some(&meta));
            return self.tar.append_link(&mut h, &name, target);
        }
        if ft.is_file() {
            let mode = if meta.mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let mut h = header(EntryType::Regular, mode, meta.len(), Some(&meta));
            let file = File::open(&path)?;
            return self
                .tar
                .append_data(&mut h, &name, exactly(file, meta.len()));
        }
        if ft.is_dir() {
            if depth > MAX_DEPTH {
                return Err(io::Error::other(format!(
                    "{rel} nests deeper than {MAX_DEPTH} levels"
                )));
            }
            if !rel.is_empty() {
                let mut h = header(EntryType::Directory, 0o755, 0, Some(&meta));
                self.tar.append_data(&mut h, &name, io::empty())?;
            }
            let mut names: Vec<String> = fs::read_dir(&path)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for n in names {
                let child = if rel.is_empty() {
                    n
                } else {
                    format!("{rel}/{n}")
                };
                self.node(root, &child, depth + 1)?;
            }
            return Ok(());
        }
        let kind = if ft.is_fifo() {
            EntryType::Fifo
        } else if ft.is_char_device() {
            EntryType::Char
        } else if ft.is_block_device() {
            EntryType::Block
        } else {
            EntryType::new(SOCKET_ENTRY_TYPE)
        };
        let mut h = header(kind, 0o644, 0, Some(&meta));
        self.tar.append_data(&mut h, &name, io::empty())
    }

    /// A declared path: walked component by component without following;
    /// a symlink met on the way is packed (the host then refuses to collect
    /// through it), a missing or non-directory parent means nothing to pack.
    fn declared(&mut self, root: &Path, rel: &str) -> io::Result<()> {
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        for i in 0..parts.len().saturating_sub(1) {
            let so_far = parts[..=i].join("/");
            match fs::symlink_metadata(root.join(&so_far)) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return self.node(root, &so_far, 0),
                _ => return Ok(()),
            }
        }
        self.node(root, &parts.join("/"), 0)
    }
}

/// Writes the archive to `w`; returns `w` and the bytes written.
fn pack_into<W: Write>(
    w: W,
    root: &Path,
    paths: &[String],
    stdout: &str,
    stderr: &str,
) -> io::Result<(W, u64)> {
    let mut p = Packer {
        tar: tar::Builder::new(Counting { inner: w, bytes: 0 }),
        packed: HashSet::new(),
    };
    p.log("stdout", stdout)?;
    p.log("stderr", stderr)?;
    let mut sorted: Vec<&String> = paths.iter().collect();
    // Ancestors sort first, so a directory is packed before paths in it
    // (which it already holds).
    sorted.sort();
    sorted.dedup();
    for rel in sorted {
        p.declared(root, rel)?;
    }
    let counting = p.tar.into_inner()?;
    Ok((counting.inner, counting.bytes))
}

/// Packs onto the disk with `serial` and syncs it; returns the bytes
/// written.
pub fn pack(
    root: &str,
    paths: &[String],
    stdout: &str,
    stderr: &str,
    serial: &str,
) -> Result<u64, String> {
    let dev = crate::init::disk_by_serial(serial, Duration::from_secs(5))
        .map_err(|e| format!("finding the output disk: {e}"))?;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .map_err(|e| format!("opening {dev}: {e}"))?;
    let full = |e: io::Error| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            "the outputs do not fit the output disk".to_string()
        } else {
            format!("packing the outputs: {e}")
        }
    };
    let writer = BufWriter::with_capacity(1 << 20, file);
    let (writer, bytes) =
        pack_into(writer, Path::new(root), paths, stdout, stderr).map_err(full)?;
    let file = writer.into_inner().map_err(|e| full(e.into_error()))?;
    file.sync_all()
        .map_err(|e| format!("syncing the output disk: {e}"))?;
    drop(file);
    // Drop the device's cached blocks, so that the guest sees the host's
    // reset of the disk before the next action, as the host does.
    crate::sys::flush_block_device(&dev).map_err(|e| e.to_string())?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn packs_what_each_declared_path_is_without_following() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("d/sub")).unwrap();
        fs::write(root.join("d/sub/g"), b"g").unwrap();
        symlink("sub/g", root.join("d/l")).unwrap();
        fs::write(root.join("f"), b"tool").unwrap();
        fs::set_permissions(root.join("f"), fs::Permissions::from_mode(0o4750)).unwrap();
        symlink("/", root.join("sym")).unwrap();
        let fifo = std::ffi::CString::new(root.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let stdout = tmp.path().join("stdout");
        fs::write(&stdout, b"printed").unwrap();
        let paths: Vec<String> = [
            "sym/etc/passwd",
            "d/sub/g",
            "d",
            "f",
            "f/x",
            "fifo",
            "nope",
            "d",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (tar, bytes) = pack_into(
            Vec::new(),
            &root,
            &paths,
            stdout.to_str().unwrap(),
            "/nonexistent",
        )
        .unwrap();
        assert_eq!(bytes, tar.len() as u64);
        let mut seen = Vec::new();
        for e in tar::Archive::new(tar.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let mode = e.header().mode().unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            seen.push((name, kind, mode, data));
        }
        let names: Vec<(&str, EntryType)> =
            seen.iter().map(|(n, k, ..)| (n.as_str(), *k)).collect();
        assert_eq!(
            names,
            [
                ("stdout", EntryType::Regular),
                ("stderr", EntryType::Regular),
                ("root/d", EntryType::Directory),
                ("root/d/l", EntryType::Symlink),
                ("root/d/sub", EntryType::Directory),
                ("root/d/sub/g", EntryType::Regular),
                ("root/f", EntryType::Regular),
                ("root/fifo", EntryType::Fifo),
                ("root/sym", EntryType::Symlink),
            ]
        );
        assert_eq!(seen[0].3, b"printed");
        assert!(seen[1].3.is_empty(), "a missing log is empty");
        assert_eq!(seen[6].2, 0o755, "executable bit only");
        assert_eq!(seen[6].3, b"tool");
    }
}
