//! The image store: reference → manifest digest → cached ext4 disk image.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};

use crate::build::write_atomic;
use crate::cache::CacheIndex;
use crate::manifest::{self, ImageRuntimeConfig, Parsed};
use crate::registry::{RegistryClient, Repo};
use crate::{Credentials, DiskImage, ImageConfig, ImageError, Reference};

pub(crate) static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// Pulls images and keeps their ext4 conversions in `cache_dir`, one per manifest
/// digest. Cheap to clone; clones share the cache, the token cache and the
/// convert-once bookkeeping.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cache_dir: PathBuf,
    pub(crate) tmp_dir: PathBuf,
    pub(crate) client: RegistryClient,
    pub(crate) locks: std::sync::Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    pub(crate) conversions: AtomicU64,
    /// Bound of the cache in bytes on disk (0 = unbounded).
    pub(crate) max_bytes: u64,
    pub(crate) index: std::sync::Mutex<CacheIndex>,
}

/// Owned form of [`Repo`], for work that outlives the caller's borrow.
#[derive(Clone)]
pub(crate) struct OwnedRepo {
    pub(crate) reference: Reference,
    pub(crate) shown: String,
    pub(crate) credentials: Option<Credentials>,
}

impl OwnedRepo {
    pub(crate) fn borrow(&self) -> Repo<'_> {
        Repo {
            reference: &self.reference,
            shown: &self.shown,
            credentials: self.credentials.as_ref(),
        }
    }
}

/// `cache_dir/<hex>.json`: written before the `.ext4` is renamed into place.
#[derive(Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) manifest_digest: String,
    pub(crate) reference: String,
    pub(crate) config: ImageRuntimeConfig,
}

impl ImageStore {
    pub fn new(config: ImageConfig) -> Result<Self, ImageError> {
        let shown = config.cache_dir.display().to_string();
        let cache_dir = config.cache_dir;
        let tmp_root = cache_dir.join("tmp");
        fs::create_dir_all(&tmp_root)
            .map_err(|e| ImageError::internal(&shown, format!("creating cache dir: {e}")))?;
        remove_dead_work_dirs(&tmp_root);
        let tmp_dir = tmp_root.join(format!(
            "{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        let client = RegistryClient::new(config.insecure_registries)
            .map_err(|e| ImageError::internal(&shown, e))?;
        let index = CacheIndex::scan(&cache_dir);
        let inner = Inner {
            cache_dir,
            tmp_dir,
            client,
            locks: Default::default(),
            conversions: AtomicU64::new(0),
            max_bytes: config.max_bytes,
            index: std::sync::Mutex::new(index),
        };
        inner.evict();
        Ok(ImageStore {
            inner: Arc::new(inner),
        })
    }

    /// Bytes on disk the cached images take (blocks allocated, not file
    /// lengths: the images are sparse).
    pub fn cache_bytes(&self) -> u64 {
        self.inner.index().bytes()
    }

    /// How many images this store has converted (cache misses that completed).
    pub fn conversions(&self) -> u64 {
        self.inner.conversions.load(Ordering::Relaxed)
    }

    /// Resolves `reference` to its manifest digest (asking the registry every time) and
    /// returns the ext4 image for it, pulling and converting it the first time only.
    /// Concurrent calls for one digest convert once; the others wait for it.
    pub async fn resolve(
        &self,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> Result<DiskImage, ImageError> {
        let parsed =
            Reference::parse(reference).map_err(|reason| ImageError::InvalidReference {
                reference: reference.to_string(),
                reason,
            })?;
        let repo = Repo {
            reference: &parsed,
            shown: reference,
            credentials,
        };
        let inner = &self.inner;
        let client = &inner.client;
        let bad = |e: String| ImageError::bad_image(reference, e);
        let (head_digest, mut fetched) = match client.head_manifest(&repo, parsed.target()).await {
            Ok(digest) => (digest, None),
            // A HEAD answer has no body; a GET says whether the repository or the tag is missing.
            Err(ImageError::NotFound { .. }) => {
                let f = client.get_manifest(&repo, parsed.target()).await?;
                (Some(f.digest.clone()), Some(f))
            }
            Err(e) => return Err(e),
        };
        let top = match head_digest {
            Some(d) => d,
            None => {
                let f = client.get_manifest(&repo, parsed.target()).await?;
                let d = f.digest.clone();
                fetched = Some(f);
                d
            }
        };
        if let Some(pinned) = &parsed.digest {
            if *pinned != top {
                return Err(bad(format!("registry answered digest {top} for {pinned}")));
            }
        }
        if let Some(img) = inner.cached(&top) {
            return Ok(img);
        }
        if let Some(img) = inner.index_target(&top).and_then(|d| inner.cached(&d)) {
            return Ok(img);
        }
        let f = match fetched {
            Some(f) => f,
            None => client.get_manifest(&repo, &top).await?,
        };
        let (digest, config, layers) = match manifest::parse(&f.body, &f.media_type).map_err(bad)? {
            Parsed::Image { config, layers } => (top, config, layers),
            Parsed::Index(entries) => {
                let d = manifest::pick_linux_amd64(&entries)
                    .map_err(bad)?
                    .digest
                    .clone();
                inner.set_index_target(&top, &d);
                if let Some(img) = inner.cached(&d) {
                    return Ok(img);
                }
                let f = client.get_manifest(&repo, &d).await?;
                match manifest::parse(&f.body, &f.media_type).map_err(bad)? {
                    Parsed::Image { config, layers } => (d, config, layers),
                    Parsed::Index(_) => {
                        return Err(bad(format!("index entry {d} is another index")))
                    }
                }
            }
        };
        let lock = inner.lock_for(&digest);
        let guard = lock.lock_owned().await;
        if let Some(img) = inner.cached(&digest) {
            return Ok(img);
        }
        let owned = OwnedRepo {
            reference: parsed.clone(),
            shown: reference.to_string(),
            credentials: credentials.cloned(),
        };
        // A task of its own: callers that give up do not abort a conversion others wait for.
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _guard = guard;
            inner.convert(owned, digest, config, layers).await
        })
        .await
        .map_err(|e| ImageError::internal(reference, format!("conversion task: {e}")))?
    }
}

pub(crate) fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

impl Inner {
    pub(crate) fn image_path(&self, digest: &str) -> PathBuf {
        self.cache_dir.join(format!("{}.ext4", hex_of(digest)))
    }

    pub(crate) fn record_path(&self, digest: &str) -> PathBuf {
        self.cache_dir.join(format!("{}.json", hex_of(digest)))
    }

    /// `cache_dir/<index hex>.index` holds the linux/amd64 manifest digest of an index.
    fn index_target(&self, index_digest: &str) -> Option<String> {
        let s = fs::read_to_string(
            self.cache_dir
                .join(format!("{}.index", hex_of(index_digest))),
        )
        .ok()?;
        Some(s.trim().to_string()).filter(|d| d.starts_with("sha256:") && d.len() == 71)
    }

    fn set_index_target(&self, index_digest: &str, digest: &str) {
        let path = self
            .cache_dir
            .join(format!("{}.index", hex_of(index_digest)));
        let _ = write_atomic(&self.tmp_dir, &path, digest.as_bytes());
    }

    fn lock_for(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap();
        if let Some(l) = locks.get(digest).and_then(Weak::upgrade) {
            return l;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(digest.to_string(), Arc::downgrade(&l));
        l
    }
}

/// Work directories are named `<pid>-<n>`; those of processes that are gone are removed.
fn remove_dead_work_dirs(tmp_root: &Path) {
    let Ok(list) = fs::read_dir(tmp_root) else {
        return;
    };
    for entry in list.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
