//! The image store: reference → manifest digest → cached ext4 disk image, cached per
//! (registry, repository, digest) ([`crate::key`]).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};

use crate::build::write_atomic;
use crate::cache::CacheIndex;
use crate::key::{is_unkeyed_cache_file, CacheKey};
use crate::manifest::{self, ImageRuntimeConfig, Parsed};
use crate::registry::{RegistryClient, Repo};
use crate::{Credentials, DiskImage, ImageConfig, ImageError, Reference};

pub(crate) static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// Pulls images and keeps their ext4 conversions in `cache_dir`, one per registry,
/// repository and manifest digest. Cheap to clone; clones share the cache, the token
/// cache and the convert-once bookkeeping.
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

/// `cache_dir/<stem>.json`: written before the `.ext4` is renamed into place. Records
/// of older versions (no registry, repository) do not parse: they are never reused.
#[derive(Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) manifest_digest: String,
    /// Where the image was pulled from: with the digest, the entry's [`CacheKey`].
    pub(crate) registry: String,
    pub(crate) repository: String,
    /// The reference as first resolved (normalized), for people reading the directory.
    pub(crate) reference: String,
    pub(crate) config: ImageRuntimeConfig,
}

impl Record {
    pub(crate) fn key(&self) -> CacheKey {
        CacheKey {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            digest: self.manifest_digest.clone(),
        }
    }
}

impl ImageStore {
    pub fn new(config: ImageConfig) -> Result<Self, ImageError> {
        let shown = config.cache_dir.display().to_string();
        let cache_dir = config.cache_dir;
        let tmp_root = cache_dir.join("tmp");
        fs::create_dir_all(&tmp_root)
            .map_err(|e| ImageError::internal(&shown, format!("creating cache dir: {e}")))?;
        remove_dead_work_dirs(&tmp_root);
        remove_unkeyed_entries(&cache_dir);
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

    /// Resolves `reference` to its manifest digest (asking the registry every time, with
    /// `credentials` or anonymously) and returns the ext4 image for it, pulling and
    /// converting it the first time this registry and repository serve that digest.
    /// Concurrent calls for one (registry, repository, digest) convert once; the others
    /// wait for it.
    ///
    /// The registry's answer is the access check: nothing is taken from the cache before
    /// the `HEAD` (or `GET`) of the manifest with this request's credentials succeeded,
    /// and only entries converted from this same registry and repository are looked at,
    /// so a registry claiming a digest it cannot serve, or a repository the caller may
    /// read holding a digest of one they may not, gets no one else's conversion.
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
        let key = |digest: &str| CacheKey::new(&parsed, digest);
        // First the registry, every time; an error here returns, never falls through to
        // the cache.
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
        if let Some(img) = inner.cached(&key(&top)) {
            return Ok(img);
        }
        // (The index and its entries are in this repository, so the registry letting
        // this request read the index lets it read the entry it points to.)
        if let Some(img) = inner
            .index_target(&key(&top))
            .and_then(|d| inner.cached(&key(&d)))
        {
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
                inner.set_index_target(&key(&top), &d);
                if let Some(img) = inner.cached(&key(&d)) {
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
        let lock = inner.lock_for(&key(&digest).stem());
        let guard = lock.lock_owned().await;
        if let Some(img) = inner.cached(&key(&digest)) {
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

impl Inner {
    /// `cache_dir/<stem>.ext4`, `stem` from [`CacheKey::stem`].
    pub(crate) fn image_path(&self, stem: &str) -> PathBuf {
        self.cache_dir.join(format!("{stem}.ext4"))
    }

    pub(crate) fn record_path(&self, stem: &str) -> PathBuf {
        self.cache_dir.join(format!("{stem}.json"))
    }

    /// `cache_dir/<index stem>.index` holds the linux/amd64 manifest digest an index
    /// resolved to. Keyed by source like the images: the mapping is only ever used to
    /// find an entry of the same registry and repository anyway.
    fn index_target(&self, index: &CacheKey) -> Option<String> {
        let path = self.cache_dir.join(format!("{}.index", index.stem()));
        let s = fs::read_to_string(path).ok()?;
        Some(s.trim().to_string()).filter(|d| d.starts_with("sha256:") && d.len() == 71)
    }

    fn set_index_target(&self, index: &CacheKey, digest: &str) {
        let path = self.cache_dir.join(format!("{}.index", index.stem()));
        let _ = write_atomic(&self.tmp_dir, &path, digest.as_bytes());
    }

    /// The convert-once lock of one cache entry (by its stem).
    fn lock_for(&self, stem: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = locks.get(stem).and_then(Weak::upgrade) {
            return l;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(stem.to_string(), Arc::downgrade(&l));
        l
    }
}

/// Deletes the cache files of versions that keyed images by digest alone (see
/// [`is_unkeyed_cache_file`]): they cannot be reused safely, and left in place they
/// would take disk the bound does not count.
fn remove_unkeyed_entries(cache_dir: &Path) {
    let Ok(list) = fs::read_dir(cache_dir) else {
        return;
    };
    let mut removed = 0;
    for entry in list.flatten() {
        if is_unkeyed_cache_file(&entry.file_name().to_string_lossy())
            && fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            dir = %cache_dir.display(), files = removed,
            "removed image cache files of an older version (not keyed by registry and repository; converted again when next used)"
        );
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
