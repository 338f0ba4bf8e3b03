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

/// Materializes the tree rooted at `root` into `dest` (which must exist).
/// With `owner`, every directory is given to that user (the one actions run
/// as) while files stay the store's, read-only: the action can add, remove
/// and rename entries, never change an input's bytes or mode.
/// Returns every blob used, so the caller can account for them.
pub async fn materialize(
    cas: &LocalCas,
    root: Digest,
    dest: &Path,
    exec_cache: &Path,
    owner: Option<(u32, u32)>,
) -> ExecResult<Vec<Digest>> {
    let mut parsed: HashMap<Digest, Directory> = HashMap::new();
    let mut entries = Vec::new();
    let mut files = Vec::new();
    let mut level = vec![(PathBuf::new(), root)];
    while !level.is_empty() {
        let wanted: Vec<Digest> = level
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| !parsed.contains_key(d))
            .collect();
        cas.ensure(&wanted).await?;
        let mut next = Vec::new();
        for (rel, d) in level {
            let dir = match parsed.entry(d) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let bytes = cas.read(&d).await?;
                    e.insert(Directory::decode(bytes).map_err(|e| {
                        ExecError::InvalidInput(format!("input directory {d} does not decode: {e}"))
                    })?)
                }
            };
            for f in &dir.files {
                let digest =
                    Digest::from_field(f.digest.as_ref(), &format!("digest of {:?}", f.name))
                        .map_err(|e| ExecError::InvalidInput(e.to_string()))?;
                files.push(digest);
                entries.push(Entry::File {
                    path: rel.join(&f.name),
                    digest,
                    executable: f.is_executable,
                });
            }
            for s in &dir.symlinks {
                entries.push(Entry::Symlink {
                    path: rel.join(&s.name),
                    target: s.target.clone(),
                });
            }
            for c in &dir.directories {
                let cd = Digest::from_field(c.digest.as_ref(), &format!("digest of {:?}", c.name))
                    .map_err(|e| ExecError::InvalidInput(e.to_string()))?;
                let path = rel.join(&c.name);
                entries.push(Entry::Dir(path.clone()));
                next.push((path, cd));
            }
        }
        level = next;
    }
    files.sort();
    files.dedup();
    cas.ensure(&files).await?;
    // Keep the blobs from being evicted while they are linked.
    let _pins = cas.pin(files.clone());
    let dest = dest.to_path_buf();
    let exec_cache = exec_cache.to_path_buf();
    let cas_paths = cas.clone();
    tokio::task::spawn_blocking(move || lay_out(&cas_paths, &dest, &exec_cache, entries, owner))
        .await
        .map_err(|e| ExecError::Internal(format!("materialize thread: {e}")))??;
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
    for e in entries {
        match e {
            Entry::Dir(rel) => {
                let p = dest.join(rel);
                fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
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
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
                }
                link_file(cas, &digest, executable, &target, exec_cache)?;
            }
            Entry::Symlink { path, target } => {
                let p = dest.join(path);
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
                }
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
