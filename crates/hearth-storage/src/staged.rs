//! A file handed from one owner to the next (an upload's spool file, a
//! fill in progress, a link to a stored blob) that is removed when its
//! owner drops it — so a transfer whose future is dropped half-way (the
//! client went away, the action was cancelled) leaves nothing in a staging
//! directory.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct StagedFile {
    path: Option<PathBuf>,
}

impl StagedFile {
    pub fn new(path: PathBuf) -> Self {
        StagedFile { path: Some(path) }
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Removes the file now, on the blocking pool, and waits for that (a
    /// dropped guard removes it in the background).
    pub async fn remove(mut self) {
        if let Some(path) = self.path.take() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        }
    }

    /// The path, no longer removed on drop: whoever takes it answers for
    /// the file now.
    pub fn keep(mut self) -> PathBuf {
        self.path.take().unwrap_or_default()
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let Some(path) = self.path.take() else {
            return;
        };
        // Off the async threads when there are some (an unlink can wait on
        // a busy disk).
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || {
                    let _ = std::fs::remove_file(path);
                });
            }
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_it_is_gone_kept_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(&b, b"y").unwrap();
        drop(StagedFile::new(a.clone()));
        assert!(!a.exists());
        let kept = StagedFile::new(b.clone()).keep();
        assert_eq!(kept, b);
        assert!(b.exists());
    }
}
