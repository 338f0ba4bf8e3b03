//! Checks an action before it is queued: Action and Command present and well
//! formed, the input tree well formed (names, no duplicates, no symlink that
//! escapes the root) and every input blob present.

use std::collections::{HashMap, HashSet};

use futures::{stream, StreamExt, TryStreamExt};
use hearth_proto::reapi::{Action, Command, Directory};
use hearth_storage::{BlobStore, Digest, StoreError};
use prost::Message;
use tonic::Status;

use crate::error::{missing_blobs_status, store_status};

/// What validation learned, for the scheduler.
pub struct Checked {
    pub action: Action,
    pub command: Command,
    pub action_bytes: Vec<u8>,
    pub command_bytes: Vec<u8>,
    /// Every blob the action needs (directories, files, Command, Action).
    pub blobs: Vec<Digest>,
}

/// Refuses to read a metadata blob (Action, Command, Directory) whose
/// declared size is over `max` bytes: the server would hold and decode it.
pub(crate) fn check_metadata_size(d: &Digest, what: &str, max: u64) -> Result<(), Status> {
    if d.size() > max {
        return Err(Status::invalid_argument(format!(
            "{what} {d} is {} bytes, over this server's limit of {max} bytes for Action, \
             Command and Directory blobs (--max-metadata-blob-bytes)",
            d.size()
        )));
    }
    Ok(())
}

/// Reads a metadata blob, if present, after checking its size against `max`.
async fn fetch(
    cas: &dyn BlobStore,
    d: &Digest,
    what: &str,
    max: u64,
) -> Result<Option<Vec<u8>>, Status> {
    check_metadata_size(d, what, max)?;
    match cas.read(d, 0, None).await {
        Ok(b) => Ok(Some(b.to_vec())),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(store_status(e, &format!("reading {what}"))),
    }
}

/// Checks the action; `max_blob` bounds each Action, Command and Directory
/// blob read.
pub async fn check_action(
    cas: &dyn BlobStore,
    action_digest: &Digest,
    max_blob: u64,
) -> Result<Checked, Status> {
    let Some(action_bytes) = fetch(cas, action_digest, "the Action", max_blob).await? else {
        return Err(missing_blobs_status("the Action", &[*action_digest]));
    };
    let action = Action::decode(action_bytes.as_slice()).map_err(|e| {
        Status::invalid_argument(format!(
            "action {action_digest} is not an Action message: {e}"
        ))
    })?;
    let command_digest =
        Digest::from_field(action.command_digest.as_ref(), "Action.command_digest")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let root = Digest::from_field(
        action.input_root_digest.as_ref(),
        "Action.input_root_digest",
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Some(t) = &action.timeout {
        if t.seconds < 0 || t.nanos < 0 {
            return Err(Status::invalid_argument("Action.timeout is negative"));
        }
    }
    let (command_bytes, prefetched) = tokio::try_join!(
        fetch(cas, &command_digest, "the Command", max_blob),
        prefetch_tree(cas, root, max_blob)
    )?;
    let mut tree = TreeCheck {
        max_blob,
        prefetched,
        ..Default::default()
    };
    tree.walk(cas, root).await?;
    let mut missing = tree.missing;
    let Some(command_bytes) = command_bytes else {
        missing.insert(0, command_digest);
        return Err(missing_blobs_status("inputs of the action", &missing));
    };
    let command = Command::decode(command_bytes.as_slice()).map_err(|e| {
        Status::invalid_argument(format!(
            "command {command_digest} is not a Command message: {e}"
        ))
    })?;
    check_command(&command)?;
    missing.extend(
        cas.find_missing(&tree.files)
            .await
            .map_err(|e| store_status(e, "FindMissing"))?,
    );
    if !missing.is_empty() {
        return Err(missing_blobs_status("inputs of the action", &missing));
    }
    let mut blobs = tree.files;
    blobs.extend(tree.dirs);
    blobs.push(command_digest);
    blobs.push(*action_digest);
    Ok(Checked {
        action,
        command,
        action_bytes,
        command_bytes,
        blobs,
    })
}

fn check_command(cmd: &Command) -> Result<(), Status> {
    if cmd.arguments.is_empty() {
        return Err(Status::invalid_argument(
            "Command.arguments is empty: there is nothing to run",
        ));
    }
    hearth_scheduler::paths::beneath("", &cmd.working_directory).map_err(|e| {
        Status::invalid_argument(format!(
            "Command.working_directory {:?} {e}",
            cmd.working_directory
        ))
    })?;
    let files = cmd.output_files.iter().map(|p| (p, true));
    let others = cmd.output_directories.iter().chain(&cmd.output_paths);
    for (p, is_file) in files.chain(others.map(|p| (p, false))) {
        let resolved = hearth_scheduler::paths::beneath(&cmd.working_directory, p)
            .map_err(|e| Status::invalid_argument(format!("output path {p:?} {e}")))?;
        if is_file && resolved.is_empty() {
            return Err(Status::invalid_argument(format!(
                "output file {p:?} is the input root itself"
            )));
        }
    }
    let mut seen = HashSet::new();
    for v in &cmd.environment_variables {
        if v.name.is_empty() || v.name.contains('=') {
            return Err(Status::invalid_argument(format!(
                "environment variable name {:?} is invalid",
                v.name
            )));
        }
        if !seen.insert(&v.name) {
            return Err(Status::invalid_argument(format!(
                "environment variable {:?} is set twice",
                v.name
            )));
        }
    }
    Ok(())
}

#[derive(Default)]
struct TreeCheck {
    /// Directory digest → how many levels above itself its symlinks reach.
    climbs: HashMap<Digest, usize>,
    files: Vec<Digest>,
    dirs: Vec<Digest>,
    missing: Vec<Digest>,
    /// Largest Directory blob read.
    max_blob: u64,
    /// Directory blobs read ahead of the walk (None: not in the store).
    prefetched: HashMap<Digest, Option<Vec<u8>>>,
}

/// Directory reads in flight together while prefetching a tree.
const PREFETCH_PARALLELISM: usize = 16;

/// Reads the Directory blobs of the tree at `root` a level at a time, the
/// reads of a level in flight together, for the walk to find in memory.
/// Every store read is a hand-off to the blocking pool, and on a server
/// whose cores are busy (in `hearth up`, with its own actions) each waits
/// milliseconds for a thread: one after another, one per directory, they
/// were most of the server's part of an Execute. What cannot be decoded is
/// left for the walk to report.
async fn prefetch_tree(
    cas: &dyn BlobStore,
    root: Digest,
    max_blob: u64,
) -> Result<HashMap<Digest, Option<Vec<u8>>>, Status> {
    let mut blobs: HashMap<Digest, Option<Vec<u8>>> = HashMap::new();
    let mut level = vec![root];
    while !level.is_empty() {
        level.sort();
        level.dedup();
        let read: Vec<(Digest, Option<Vec<u8>>)> = stream::iter(level)
            .map(|d| async move {
                fetch(cas, &d, "input tree: Directory", max_blob)
                    .await
                    .map(|b| (d, b))
            })
            .buffer_unordered(PREFETCH_PARALLELISM)
            .try_collect()
            .await?;
        level = Vec::new();
        for (d, bytes) in read {
            if let Some(dir) = bytes.as_deref().and_then(|b| Directory::decode(b).ok()) {
                level.extend(
                    dir.directories
                        .iter()
                        .filter_map(|c| Digest::from_field(c.digest.as_ref(), "").ok()),
                );
            }
            blobs.insert(d, bytes);
        }
        level.retain(|d| !blobs.contains_key(d));
    }
    Ok(blobs)
}

fn check_name(name: &str, dir: &Digest) -> Result<(), Status> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "input tree: directory {dir} has an entry named {name:?}; names must be single path components"
        )));
    }
    Ok(())
}

/// How many levels above its own directory a relative symlink target reaches.
fn symlink_climb(target: &str) -> usize {
    let mut level: isize = 0;
    let mut lowest: isize = 0;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                level -= 1;
                lowest = lowest.min(level);
            }
            _ => level += 1,
        }
    }
    (-lowest) as usize
}

impl TreeCheck {
    /// Walks the tree from `root`; checks each distinct directory once.
    async fn walk(&mut self, cas: &dyn BlobStore, root: Digest) -> Result<(), Status> {
        // Depth-first, post-order so each directory's climb is known from its children.
        let mut stack: Vec<(Digest, bool)> = vec![(root, false)];
        let mut parsed: HashMap<Digest, Directory> = HashMap::new();
        while let Some((d, expanded)) = stack.pop() {
            if self.climbs.contains_key(&d) {
                continue;
            }
            if expanded {
                let dir = &parsed[&d];
                let mut climb = 0usize;
                for s in &dir.symlinks {
                    climb = climb.max(symlink_climb(&s.target));
                }
                for c in &dir.directories {
                    if let Ok(cd) = Digest::from_field(c.digest.as_ref(), "") {
                        climb =
                            climb.max(self.climbs.get(&cd).copied().unwrap_or(0).saturating_sub(1));
                    }
                }
                self.climbs.insert(d, climb);
                continue;
            }
            if parsed.contains_key(&d) {
                continue;
            }
            let bytes = match self.prefetched.remove(&d) {
                Some(b) => b,
                None => fetch(cas, &d, "input tree: Directory", self.max_blob).await?,
            };
            let Some(bytes) = bytes else {
                self.missing.push(d);
                self.climbs.insert(d, 0);
                continue;
            };
            let dir = Directory::decode(bytes.as_slice()).map_err(|e| {
                Status::invalid_argument(format!("input tree: {d} is not a Directory message: {e}"))
            })?;
            let mut names = HashSet::new();
            for name in dir
                .files
                .iter()
                .map(|f| &f.name)
                .chain(dir.directories.iter().map(|c| &c.name))
                .chain(dir.symlinks.iter().map(|s| &s.name))
            {
                check_name(name, &d)?;
                if !names.insert(name) {
                    return Err(Status::invalid_argument(format!(
                        "input tree: directory {d} has two entries named {name:?}"
                    )));
                }
            }
            for s in &dir.symlinks {
                if s.target.is_empty() || s.target.starts_with('/') {
                    return Err(Status::invalid_argument(format!(
                        "input tree: symlink {:?} has target {:?}; absolute or empty targets are not allowed",
                        s.name, s.target
                    )));
                }
            }
            for f in &dir.files {
                let fd = Digest::from_field(
                    f.digest.as_ref(),
                    &format!("digest of input file {:?}", f.name),
                )
                .map_err(|e| Status::invalid_argument(format!("input tree: {e}")))?;
                self.files.push(fd);
            }
            self.dirs.push(d);
            stack.push((d, true));
            for c in &dir.directories {
                let cd = Digest::from_field(
                    c.digest.as_ref(),
                    &format!("digest of input directory {:?}", c.name),
                )
                .map_err(|e| Status::invalid_argument(format!("input tree: {e}")))?;
                stack.push((cd, false));
            }
            parsed.insert(d, dir);
        }
        if self.climbs.get(&root).copied().unwrap_or(0) > 0 {
            return Err(Status::invalid_argument(
                "input tree: a symlink's target climbs out of the input root with \"..\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn climb_counts_levels_above_the_symlink() {
        assert_eq!(symlink_climb("a/b"), 0);
        assert_eq!(symlink_climb("../x"), 1);
        assert_eq!(symlink_climb("a/../../x"), 1);
        assert_eq!(symlink_climb("../../x/../y"), 2);
    }

    #[test]
    fn command_paths_must_be_relative_and_clean() {
        let mut c = Command {
            arguments: vec!["true".into()],
            output_files: vec!["../escape".into()],
            ..Default::default()
        };
        assert!(check_command(&c).is_err());
        c.output_files = vec!["/abs".into()];
        assert!(check_command(&c).is_err());
        c.output_files = vec!["ok/file".into()];
        assert!(check_command(&c).is_ok());
        c.working_directory = "a/b".into();
        c.output_files = vec!["../../top".into()];
        c.output_paths = vec![".".into(), "../../../x".into()];
        assert!(
            check_command(&c).is_err(),
            "../../../x climbs out of the root"
        );
        c.output_paths = vec![".".into(), "../../x".into()];
        assert!(
            check_command(&c).is_ok(),
            "dots that stay beneath the root are fine"
        );
        c.output_files = vec!["..".into(), "../..".into()];
        assert!(check_command(&c).is_err(), "a file cannot be the root");
        c.arguments.clear();
        assert!(check_command(&c).is_err());
    }
}
