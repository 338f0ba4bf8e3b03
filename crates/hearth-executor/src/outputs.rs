//! Collects an action's declared outputs into the CAS and describes them in
//! an ActionResult: files, directories (as Tree messages) and symlinks, for
//! both `output_paths` (REAPI ≥ 2.1) and the older `output_files` /
//! `output_directories`.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use hearth_proto::reapi::{
    ActionResult, Command, Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode, Tree,
};
use hearth_storage::{BlobStore, Digest};
use prost::Message;

use crate::error::{ExecError, ExecResult, IoContext};
use crate::LocalCas;

/// Creates the parent directories of every declared output, as REAPI asks.
pub fn prepare(workdir: &Path, command: &Command) -> ExecResult<()> {
    let paths = command
        .output_files
        .iter()
        .chain(&command.output_directories)
        .chain(&command.output_paths);
    for p in paths {
        if let Some(parent) = workdir.join(p.trim_end_matches('/')).parent() {
            fs::create_dir_all(parent)
                .ctx(|| format!("creating output parent {}", parent.display()))?;
        }
    }
    Ok(())
}

/// A directory's Directory message and every distinct Directory below it.
type BuiltDir = (Directory, BTreeMap<Digest, Directory>);
type BuildFuture<'a> = Pin<Box<dyn Future<Output = ExecResult<BuiltDir>> + Send + 'a>>;

#[derive(Clone, Copy, PartialEq)]
enum Declared {
    File,
    Directory,
    Path,
}

pub struct Collector<'a> {
    cas: &'a LocalCas,
    /// Digests stored locally that the server must receive.
    pub stored: Vec<Digest>,
}

impl<'a> Collector<'a> {
    pub fn new(cas: &'a LocalCas) -> Self {
        Collector {
            cas,
            stored: Vec::new(),
        }
    }

    async fn store_file(&mut self, path: &Path) -> ExecResult<Digest> {
        let d = self
            .cas
            .local()
            .put_file(path)
            .await
            .map_err(|e| ExecError::store(format!("storing output {}", path.display()), e))?;
        self.stored.push(d);
        Ok(d)
    }

    async fn store_bytes(&mut self, data: Vec<u8>) -> ExecResult<Digest> {
        let d = Digest::of(&data);
        self.cas
            .local()
            .put(&d, Bytes::from(data))
            .await
            .map_err(|e| ExecError::store("storing an output tree", e))?;
        self.stored.push(d);
        Ok(d)
    }

    /// Stores stdout or stderr and returns its digest.
    pub async fn store_log(&mut self, path: &Path) -> ExecResult<Digest> {
        self.store_file(path).await
    }

    /// Fills the output fields of `result` from what the command left in `workdir`.
    pub async fn collect(
        &mut self,
        workdir: &Path,
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
        for (rel, kind) in declared {
            let path = workdir.join(rel.trim_end_matches('/'));
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let target =
                    fs::read_link(&path).ctx(|| format!("reading symlink {}", path.display()))?;
                let link = OutputSymlink {
                    path: rel.clone(),
                    target: target.to_string_lossy().into_owned(),
                    node_properties: None,
                };
                match kind {
                    Declared::File => result.output_file_symlinks.push(link.clone()),
                    Declared::Directory => result.output_directory_symlinks.push(link.clone()),
                    Declared::Path => {}
                }
                result.output_symlinks.push(link);
            } else if meta.is_dir() {
                let (root, children) = self.directory(path.clone()).await?;
                let root_digest = Digest::of(&root.encode_to_vec());
                let tree = Tree {
                    root: Some(root),
                    children: children.into_values().collect(),
                };
                let tree_digest = self.store_bytes(tree.encode_to_vec()).await?;
                result.output_directories.push(OutputDirectory {
                    path: rel,
                    tree_digest: Some(tree_digest.to_proto()),
                    is_topologically_sorted: false,
                    root_directory_digest: Some(root_digest.to_proto()),
                });
            } else {
                let digest = self.store_file(&path).await?;
                result.output_files.push(OutputFile {
                    path: rel,
                    digest: Some(digest.to_proto()),
                    is_executable: meta.permissions().mode() & 0o111 != 0,
                    contents: Default::default(),
                    node_properties: None,
                });
            }
        }
        Ok(())
    }

    /// Builds the Directory for `path` and every distinct Directory below it
    /// (keyed by digest, for the Tree's `children`).
    fn directory(&mut self, path: PathBuf) -> BuildFuture<'_> {
        Box::pin(async move {
            let mut dir = Directory::default();
            let mut children = BTreeMap::new();
            let mut names: Vec<(String, PathBuf)> = fs::read_dir(&path)
                .ctx(|| format!("listing output {}", path.display()))?
                .map(|e| e.map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())))
                .collect::<Result<_, _>>()
                .ctx(|| format!("listing output {}", path.display()))?;
            names.sort();
            for (name, p) in names {
                let meta = fs::symlink_metadata(&p).ctx(|| format!("stat {}", p.display()))?;
                if meta.file_type().is_symlink() {
                    let target =
                        fs::read_link(&p).ctx(|| format!("reading symlink {}", p.display()))?;
                    dir.symlinks.push(SymlinkNode {
                        name,
                        target: target.to_string_lossy().into_owned(),
                        node_properties: None,
                    });
                } else if meta.is_dir() {
                    let (sub, grand) = self.directory(p).await?;
                    let digest = Digest::of(&sub.encode_to_vec());
                    children.extend(grand);
                    children.insert(digest, sub);
                    dir.directories.push(DirectoryNode {
                        name,
                        digest: Some(digest.to_proto()),
                    });
                } else {
                    let digest = self.store_file(&p).await?;
                    dir.files.push(FileNode {
                        name,
                        digest: Some(digest.to_proto()),
                        is_executable: meta.permissions().mode() & 0o111 != 0,
                        node_properties: None,
                    });
                }
            }
            Ok((dir, children))
        })
    }
}
