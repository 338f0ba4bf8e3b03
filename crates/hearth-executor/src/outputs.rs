//! Collects an action's declared outputs into the CAS and describes them in
//! an ActionResult: files, directories (as Tree messages) and symlinks, for
//! both `output_paths` (REAPI ≥ 2.1) and the older `output_files` /
//! `output_directories`.
//!
//! Everything beneath the action's root is the action's to shape, so every
//! path is walked with [`confined`](crate::confined): no symlink is followed
//! in any component, a symlink output is returned as a symlink, and a file is
//! stored from the descriptor it was checked on, hashed while it is copied.
//! Collection is blocking file-system work and runs on the blocking pool.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use hearth_proto::reapi::{
    ActionResult, Command, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
use hearth_scheduler::paths::beneath;
use hearth_storage::{Digest, DiskStore};
use prost::Message;

use crate::confined::{Dir, Kind, WalkError};
use crate::error::{ExecError, ExecResult, IoContext};

/// Output directories nest at most this deep (a hostile action can nest
/// far beyond PATH_MAX with relative paths; the walk must stay bounded).
const MAX_DEPTH: usize = 512;

/// Where an output path leads, beneath the root, and the working directory.
pub(crate) fn resolve(command: &Command, path: &str) -> ExecResult<Vec<String>> {
    beneath(&command.working_directory, path)
        .map_err(|e| ExecError::InvalidInput(format!("output path {path:?} {e}")))
}

/// The working directory's components beneath the root.
pub(crate) fn working_directory(command: &Command) -> ExecResult<Vec<String>> {
    beneath("", &command.working_directory).map_err(|e| {
        ExecError::InvalidInput(format!(
            "working directory {:?} {e}",
            command.working_directory
        ))
    })
}

/// Every declared output path, new and legacy fields alike.
pub(crate) fn declared_paths(command: &Command) -> impl Iterator<Item = &String> {
    command
        .output_files
        .iter()
        .chain(&command.output_directories)
        .chain(&command.output_paths)
}

fn walk_error(output: &str, e: WalkError) -> ExecError {
    match e {
        WalkError::SymlinkParent(p) => ExecError::Precondition(format!(
            "output {output:?}: {p} is a symlink, and outputs are never collected through symlinks"
        )),
        WalkError::Missing(p) => {
            ExecError::Precondition(format!("output {output:?}: {p} is missing"))
        }
        WalkError::Io { context, source } => {
            ExecError::io(format!("output {output:?}: {context}"), source)
        }
    }
}

fn odd(output: &str, kind: Kind) -> ExecError {
    ExecError::Precondition(format!(
        "output {output:?} is {}; outputs must be regular files, directories or symlinks",
        kind.describe()
    ))
}

/// Creates the working directory and the parent directories of every
/// declared output, as REAPI asks, without following any symlink the input
/// tree has on the way; with `owner`, those directories are given to the
/// user the action runs as (so it can write its outputs, and nothing else).
pub fn prepare(root: &Path, command: &Command, owner: Option<(u32, u32)>) -> ExecResult<()> {
    let root_dir = Dir::open(root).ctx(|| format!("opening {}", root.display()))?;
    let chown = |d: &Dir, what: &str| -> ExecResult<()> {
        match owner {
            Some((uid, gid)) => d.chown(uid, gid).ctx(|| format!("chown {what}")),
            None => Ok(()),
        }
    };
    chown(&root_dir, "the input root")?;
    let mut dirs = vec![working_directory(command)?];
    for p in declared_paths(command) {
        let mut parts = resolve(command, p)?;
        parts.pop();
        dirs.push(parts);
    }
    for parts in dirs {
        let shown = parts.join("/");
        let mut cur = root_dir
            .descend(&[], "")
            .map_err(|e| walk_error(&shown, e))?;
        for (i, c) in parts.iter().enumerate() {
            let so_far = parts[..=i].join("/");
            cur = cur
                .make_dirs(std::slice::from_ref(c), 0o755)
                .map_err(|e| match e {
                    WalkError::SymlinkParent(_) => ExecError::Precondition(format!(
                        "{so_far} is a symlink in the input tree; output and working \
                         directories are never created through symlinks"
                    )),
                    e => walk_error(&shown, e),
                })?;
            chown(&cur, &so_far)?;
        }
    }
    Ok(())
}

/// A directory's Directory message and every distinct Directory below it.
type BuiltDir = (Directory, BTreeMap<Digest, Directory>);

#[derive(Clone, Copy, PartialEq)]
enum Declared {
    File,
    Directory,
    Path,
}

/// What collection produced: the output fields of an ActionResult, and the
/// digests stored locally that the server must receive.
#[derive(Default)]
pub struct Collected {
    pub result: ActionResult,
    pub stored: Vec<Digest>,
}

struct Collector {
    store: Arc<DiskStore>,
    stored: Vec<Digest>,
}

/// Stores stdout and stderr and, unless `logs_only`, every declared output
/// found beneath `root`, on the blocking pool.
pub async fn collect(
    store: Arc<DiskStore>,
    root: std::path::PathBuf,
    command: Command,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
    logs_only: bool,
) -> ExecResult<Collected> {
    tokio::task::spawn_blocking(move || {
        let mut c = Collector {
            store,
            stored: Vec::new(),
        };
        let mut result = ActionResult {
            stdout_digest: Some(c.store_log(&stdout)?.to_proto()),
            stderr_digest: Some(c.store_log(&stderr)?.to_proto()),
            ..Default::default()
        };
        if !logs_only {
            c.collect(&root, &command, &mut result)?;
        }
        Ok(Collected {
            result,
            stored: c.stored,
        })
    })
    .await
    .map_err(|e| ExecError::Internal(format!("output collection thread: {e}")))?
}

impl Collector {
    fn store_file(&mut self, file: File, shown: &str) -> ExecResult<Digest> {
        let mut file = file;
        let d = self
            .store
            .ingest(&mut file)
            .map_err(|e| ExecError::store(format!("storing output {shown:?}"), e))?;
        self.stored.push(d);
        Ok(d)
    }

    fn store_bytes(&mut self, data: Vec<u8>) -> ExecResult<Digest> {
        let d = self
            .store
            .ingest(&mut data.as_slice())
            .map_err(|e| ExecError::store("storing an output tree", e))?;
        self.stored.push(d);
        Ok(d)
    }

    /// Stores stdout or stderr (the executor's own files) and returns its digest.
    fn store_log(&mut self, path: &Path) -> ExecResult<Digest> {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        self.store_file(file, &path.display().to_string())
    }

    /// Fills the output fields of `result` from what the command left beneath `root`.
    fn collect(
        &mut self,
        root: &Path,
        command: &Command,
        result: &mut ActionResult,
    ) -> ExecResult<()> {
        let declared: Vec<(String, Declared)> = if !command.output_paths.is_empty() {
            command
                .output_paths
                .iter()
                .map(|p| (p.clone(), Declared::Path))
                .collect()
        } else {
            command
                .output_files
                .iter()
                .map(|p| (p.clone(), Declared::File))
                .chain(
                    command
                        .output_directories
                        .iter()
                        .map(|p| (p.clone(), Declared::Directory)),
                )
                .collect()
        };
        let root_dir = Dir::open(root).ctx(|| format!("opening {}", root.display()))?;
        for (rel, declared) in declared {
            let mut parts = resolve(command, &rel)?;
            let Some(name) = parts.pop() else {
                // The root itself, declared as a directory (or path).
                if declared == Declared::File {
                    return Err(ExecError::InvalidInput(format!(
                        "output file {rel:?} is the input root"
                    )));
                }
                let dir = root_dir.descend(&[], "").map_err(|e| walk_error(&rel, e))?;
                self.output_directory(dir, rel, result)?;
                continue;
            };
            let parent = match root_dir.descend(&parts, "") {
                Ok(d) => d,
                Err(WalkError::Missing(_)) => continue,
                Err(e) => return Err(walk_error(&rel, e)),
            };
            let kind = parent
                .kind(&name)
                .ctx(|| format!("looking at output {rel:?}"))?;
            match (kind, declared) {
                (None, _) => {}
                (Some(Kind::Symlink), _) => {
                    let target = parent
                        .read_link(&name)
                        .ctx(|| format!("reading symlink {rel:?}"))?;
                    let link = OutputSymlink {
                        path: rel,
                        target,
                        node_properties: None,
                    };
                    match declared {
                        Declared::File => result.output_file_symlinks.push(link.clone()),
                        Declared::Directory => result.output_directory_symlinks.push(link.clone()),
                        Declared::Path => {}
                    }
                    result.output_symlinks.push(link);
                }
                (Some(Kind::Directory), Declared::File) => {
                    return Err(ExecError::Precondition(format!(
                        "output file {rel:?} is a directory"
                    )))
                }
                (Some(Kind::Directory), _) => {
                    let dir = parent
                        .dir(&name)
                        .ctx(|| format!("opening output {rel:?}"))?;
                    self.output_directory(dir, rel, result)?;
                }
                (Some(Kind::File { .. }), Declared::Directory) => {
                    return Err(ExecError::Precondition(format!(
                        "output directory {rel:?} is a regular file"
                    )))
                }
                (Some(Kind::File { executable, .. }), _) => {
                    let file = parent
                        .file(&name)
                        .ctx(|| format!("opening output {rel:?}"))?;
                    let digest = self.store_file(file, &rel)?;
                    result.output_files.push(OutputFile {
                        path: rel,
                        digest: Some(digest.to_proto()),
                        is_executable: executable,
                        contents: Default::default(),
                        node_properties: None,
                    });
                }
                (Some(other), _) => return Err(odd(&rel, other)),
            }
        }
        Ok(())
    }

    fn output_directory(
        &mut self,
        dir: Dir,
        rel: String,
        result: &mut ActionResult,
    ) -> ExecResult<()> {
        let (root, children) = self.directory(&dir, &rel, 0)?;
        let root_digest = Digest::of(&root.encode_to_vec());
        let tree = Tree {
            root: Some(root),
            children: children.into_values().collect(),
        };
        let tree_digest = self.store_bytes(tree.encode_to_vec())?;
        result.output_directories.push(OutputDirectory {
            path: rel,
            tree_digest: Some(tree_digest.to_proto()),
            is_topologically_sorted: false,
            root_directory_digest: Some(root_digest.to_proto()),
        });
        Ok(())
    }

    /// Builds the Directory for `dir` (shown as `shown`) and every distinct
    /// Directory below it (keyed by digest, for the Tree's `children`).
    fn directory(&mut self, dir: &Dir, shown: &str, depth: usize) -> ExecResult<BuiltDir> {
        if depth > MAX_DEPTH {
            return Err(ExecError::Precondition(format!(
                "output directory {shown:?} nests deeper than {MAX_DEPTH} levels"
            )));
        }
        let mut out = Directory::default();
        let mut children = BTreeMap::new();
        let names = dir.names().ctx(|| format!("listing output {shown:?}"))?;
        for name in names {
            let path = if shown.is_empty() || shown == "." {
                name.clone()
            } else {
                format!("{shown}/{name}")
            };
            let Some(kind) = dir.kind(&name).ctx(|| format!("looking at {path:?}"))? else {
                continue; // gone since it was listed
            };
            match kind {
                Kind::Symlink => out.symlinks.push(SymlinkNode {
                    target: dir
                        .read_link(&name)
                        .ctx(|| format!("reading symlink {path:?}"))?,
                    name,
                    node_properties: None,
                }),
                Kind::Directory => {
                    let sub_dir = dir.dir(&name).ctx(|| format!("opening {path:?}"))?;
                    let (sub, grand) = self.directory(&sub_dir, &path, depth + 1)?;
                    let digest = Digest::of(&sub.encode_to_vec());
                    children.extend(grand);
                    children.insert(digest, sub);
                    out.directories.push(DirectoryNode {
                        name,
                        digest: Some(digest.to_proto()),
                    });
                }
                Kind::File { executable, .. } => {
                    let file = dir.file(&name).ctx(|| format!("opening {path:?}"))?;
                    let digest = self.store_file(file, &path)?;
                    out.files.push(FileNode {
                        name,
                        digest: Some(digest.to_proto()),
                        is_executable: executable,
                        node_properties: None,
                    });
                }
                other => return Err(odd(&path, other)),
            }
        }
        Ok((out, children))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect_in(root: &Path, command: Command) -> ExecResult<Collected> {
        let store_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(store_dir.path(), 0).unwrap());
        let logs = root.parent().unwrap();
        std::fs::write(logs.join("stdout"), b"").unwrap();
        std::fs::write(logs.join("stderr"), b"").unwrap();
        collect(
            store,
            root.to_path_buf(),
            command,
            logs.join("stdout"),
            logs.join("stderr"),
            false,
        )
        .await
    }

    #[tokio::test]
    async fn a_socket_output_fails_naming_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(root.join("d/sock")).unwrap();
        for command in [
            Command {
                output_paths: vec!["d/sock".into()],
                ..Default::default()
            },
            Command {
                output_directories: vec!["d".into()],
                ..Default::default()
            },
        ] {
            let e = collect_in(&root, command).await.err().expect("refused");
            assert_eq!(e.code(), tonic::Code::FailedPrecondition);
            assert!(e.to_string().contains("\"d/sock\" is a socket"), "{e}");
        }
    }

    #[tokio::test]
    async fn prepare_never_creates_through_an_input_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("bazel-out")).unwrap();
        let command = Command {
            output_files: vec!["bazel-out/bin/x".into()],
            ..Default::default()
        };
        let e = prepare(&root, &command, None).unwrap_err();
        assert!(e.to_string().contains("bazel-out is a symlink"), "{e}");
        assert!(!outside.join("bin").exists());
    }
}
