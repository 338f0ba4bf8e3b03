//! Lays an input tree out on disk: directories created, files hardlinked from
//! the local CAS (executables from a private executable copy, since a hardlink
//! shares its mode), symlinks made. Missing blobs are fetched first, level by
//! level for directories and in parallel for files.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hearth_proto::reapi::Directory;
use hearth_storage::Digest;
use prost::Message;

use crate::error::{ExecError, ExecResult, IoContext};
use crate::LocalCas;

enum Entry {
    Dir(PathBuf),
    File {
        path: PathBuf,
        digest: Digest,
        executable: bool,
    },
    Symlink {
        path: PathBuf,
        target: String,
    },
}

/// The input tree read so far: directories parsed, entries to lay out,
/// and the level of directories still to read.
struct Walk {
    parsed: HashMap<Digest, Directory>,
    entries: Vec<Entry>,
    files: Vec<Digest>,
    level: Vec<(PathBuf, Digest)>,
}

impl Walk {
    fn new(root: Digest) -> Self {
        Walk {
            parsed: HashMap::new(),
            entries: Vec::new(),
            files: Vec::new(),
            level: vec![(PathBuf::new(), root)],
        }
    }

    /// Reads levels of the tree from the local store until it is read
    /// whole (returns nothing) or a level needs directories the store lacks
    /// (returns them; the walk resumes at that level once they are
    /// fetched). Blocking.
    fn advance(&mut self, cas: &LocalCas) -> ExecResult<Vec<Digest>> {
        while !self.level.is_empty() {
            let missing: Vec<Digest> = self
                .level
                .iter()
                .map(|(_, d)| *d)
                .filter(|d| !self.parsed.contains_key(d) && !cas.local().contains(d))
                .collect();
            if !missing.is_empty() {
                return Ok(missing);
            }
            let mut next = Vec::new();
            for (rel, d) in std::mem::take(&mut self.level) {
                let dir = match self.parsed.entry(d) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let bytes = cas.read_local(&d)?;
                        e.insert(Directory::decode(bytes).map_err(|e| {
                            ExecError::InvalidInput(format!(
                                "input directory {d} does not decode: {e}"
                            ))
                        })?)
                    }
                };
                for f in &dir.files {
                    let digest =
                        Digest::from_field(f.digest.as_ref(), &format!("digest of {:?}", f.name))
                            .map_err(|e| ExecError::InvalidInput(e.to_string()))?;
                    self.files.push(digest);
                    self.entries.push(Entry::File {
                        path: rel.join(&f.name),
                        digest,
                        executable: f.is_executable,
                    });
                }
                for s in &dir.symlinks {
                    self.entries.push(Entry::Symlink {
                        path: rel.join(&s.name),
                        target: s.target.clone(),
                    });
                }
                for c in &dir.directories {
                    let cd =
                        Digest::from_field(c.digest.as_ref(), &format!("digest of {:?}", c.name))
                            .map_err(|e| ExecError::InvalidInput(e.to_string()))?;
                    let path = rel.join(&c.name);
                    self.entries.push(Entry::Dir(path.clone()));
                    next.push((path, cd));
                }
            }
            self.level = next;
        }
        Ok(vec![])
    }
}

/// Runs file-system work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ExecResult<T> + Send + 'static,
) -> ExecResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExecError::Internal(format!("materialize thread: {e}")))?
}

/// Materializes the tree rooted at `root` into `dest` (created, with its
/// parents), then runs `finish` (blocking, e.g. preparing the output
/// directories) on the same thread.
/// With `owner`, every directory is given to that user (the one actions run
/// as) while files stay the store's, read-only: the action can add, remove
/// and rename entries, never change an input's bytes or mode.
/// Returns every blob used, so the caller can account for them.
///
/// The tree is read and laid out in two hand-offs to the blocking pool
/// whatever its size, when the local store holds it (always in `hearth up`):
/// each hand-off waits for a thread, and on an executor whose cores are
/// busy with other actions that wait is milliseconds, so one per directory
/// read was most of an action's input fetch. Missing blobs are fetched
/// between hand-offs, level by level for directories and in parallel for
/// files.
pub async fn materialize(
    cas: &LocalCas,
    root: Digest,
    dest: &Path,
    exec_cache: &Path,
    owner: Option<(u32, u32)>,
    finish: impl FnOnce() -> ExecResult<()> + Send + 'static,
) -> ExecResult<Vec<Digest>> {
    let started = std::time::Instant::now();
    let mut walk = Walk::new(root);
    loop {
        let local = cas.clone();
        let (w, missing) = blocking(move || {
            let missing = walk.advance(&local)?;
            Ok((walk, missing))
        })
        .await?;
        walk = w;
        if missing.is_empty() {
            break;
        }
        cas.ensure(&missing).await?;
    }
    let Walk {
        parsed,
        entries,
        mut files,
        ..
    } = walk;
    files.sort();
    files.dedup();
    cas.ensure(&files).await?;
    // Keep the blobs from being evicted while they are linked.
    let _pins = cas.pin(files.clone());
    let dest = dest.to_path_buf();
    let exec_cache = exec_cache.to_path_buf();
    let cas_paths = cas.clone();
    let read = started.elapsed();
    let (directories, entry_count) = (parsed.len(), entries.len());
    blocking(move || {
        fs::create_dir_all(&dest).ctx(|| format!("creating {}", dest.display()))?;
        lay_out(&cas_paths, &dest, &exec_cache, entries, owner)?;
        finish()
    })
    .await?;
    tracing::debug!(
        directories,
        entries = entry_count,
        ?read,
        total = ?started.elapsed(),
        "input tree materialized"
    );
    let mut all: Vec<Digest> = parsed.into_keys().collect();
    all.extend(files);
    Ok(all)
}

fn lay_out(
    cas: &LocalCas,
    dest: &Path,
    exec_cache: &Path,
    entries: Vec<Entry>,
    owner: Option<(u32, u32)>,
) -> ExecResult<()> {
    // The walk lists a directory before anything in it (level by level), so
    // every parent exists by the time its entries are made: no per-entry
    // checks of the parent (two system calls each, for every input file).
    for e in entries {
        match e {
            Entry::Dir(rel) => {
                let p = dest.join(rel);
                fs::create_dir(&p).ctx(|| format!("creating {}", p.display()))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
                        .ctx(|| format!("chown {}", p.display()))?;
                }
            }
            Entry::File {
                path,
                digest,
                executable,
            } => {
                let target = dest.join(path);
                link_file(cas, &digest, executable, &target, exec_cache)?;
            }
            Entry::Symlink { path, target } => {
                let p = dest.join(path);
                std::os::unix::fs::symlink(&target, &p)
                    .ctx(|| format!("symlinking {}", p.display()))?;
            }
        }
    }
    Ok(())
}

fn link_file(
    cas: &LocalCas,
    d: &Digest,
    executable: bool,
    target: &Path,
    exec_cache: &Path,
) -> ExecResult<()> {
    if d.is_empty_blob() {
        fs::write(target, b"").ctx(|| format!("creating {}", target.display()))?;
        let mode = if executable { 0o555 } else { 0o444 };
        return fs::set_permissions(target, fs::Permissions::from_mode(mode))
            .ctx(|| format!("chmod {}", target.display()));
    }
    let source = if executable {
        let exe = exec_cache.join(d.hash_hex());
        if !exe.exists() {
            let tmp = exec_cache.join(format!("{}.{}", d.hash_hex(), uuid::Uuid::new_v4()));
            fs::copy(cas.path_of(d), &tmp).ctx(|| format!("copying executable {d}"))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o555))
                .ctx(|| format!("chmod {}", tmp.display()))?;
            fs::rename(&tmp, &exe).ctx(|| format!("placing executable {d}"))?;
        }
        exe
    } else {
        cas.path_of(d)
    };
    if fs::hard_link(&source, target).is_err() {
        // Too many links, or another filesystem: fall back to a copy.
        fs::copy(&source, target)
            .ctx(|| format!("copying {} to {}", source.display(), target.display()))?;
    }
    Ok(())
}
