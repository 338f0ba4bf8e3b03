//! What a file holds, as a SHA-256, remembered per (path, size, mtime):
//! runner keys name the image and kernel by content, so that two executors
//! (with their own image caches, on other hosts) agree on a key exactly
//! when their VMs would boot the same bytes. A snapshot restored over a
//! root disk that differs by one block would corrupt the guest.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::{file_identity, VmError};

#[derive(Default)]
pub(crate) struct ContentIds {
    known: Mutex<HashMap<String, String>>,
}

/// SHA-256 of the file's bytes, hex (blocking).
pub fn hash_file(path: &Path) -> Result<String, VmError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| VmError::io(format!("opening {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| VmError::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl ContentIds {
    /// The content hash of `path`, hashed once per version of the file.
    pub async fn of(&self, path: &Path) -> Result<String, VmError> {
        let identity = file_identity(path);
        if let Some(h) = self.lock().get(&identity) {
            return Ok(h.clone());
        }
        let p = path.to_path_buf();
        let hash = tokio::task::spawn_blocking(move || hash_file(&p))
            .await
            .map_err(|e| VmError::Setup(format!("hashing an image: {e}")))??;
        self.lock().insert(identity, hash.clone());
        Ok(hash)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn equal_bytes_at_other_paths_are_one_id_and_a_change_is_another() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"image").unwrap();
        std::fs::write(&b, b"image").unwrap();
        let ids = ContentIds::default();
        let id = ids.of(&a).await.unwrap();
        assert_eq!(id, ids.of(&b).await.unwrap());
        std::fs::write(&b, b"other bytes").unwrap();
        assert_ne!(id, ids.of(&b).await.unwrap());
        assert!(ids.of(&dir.path().join("missing")).await.is_err());
    }
}
