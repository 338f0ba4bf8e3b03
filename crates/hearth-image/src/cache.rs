//! The cache's bound: which converted images are on disk, how much disk each
//! takes, when each was last resolved, and which are in use ([`ImageLease`]).
//! Above [`crate::ImageConfig::max_bytes`] the least recently used images
//! that nobody holds a lease on are deleted.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, MutexGuard};
use std::time::SystemTime;

use crate::key::CacheKey;
use crate::manifest::ImageRuntimeConfig;
use crate::store::{Inner, Record};
use crate::DiskImage;

struct Entry {
    /// Where the image was pulled from and its manifest digest.
    key: CacheKey,
    config: ImageRuntimeConfig,
    /// File length (what `DiskImage::size_bytes` reports).
    len: u64,
    /// Bytes allocated on disk (the image files are sparse): what counts.
    disk_bytes: u64,
    last_use: u64,
    leases: usize,
}

/// File stem (`<digest hex>-<source id>`, [`CacheKey::stem`]) → image, for every
/// `<stem>.ext4` with its `<stem>.json`.
#[derive(Default)]
pub(crate) struct CacheIndex {
    entries: HashMap<String, Entry>,
    tick: u64,
    bytes: u64,
}

impl CacheIndex {
    /// Reads the cache directory: images with their records, oldest use
    /// (the record's modification time, set at each use) first. An image whose
    /// record is missing, unreadable or names another source than its file name
    /// says is not an entry (it can never be handed out).
    pub(crate) fn scan(dir: &Path) -> Self {
        let mut found = Vec::new();
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".ext4") else {
                continue;
            };
            let (Ok(meta), Ok(json)) =
                (e.metadata(), fs::metadata(dir.join(format!("{stem}.json"))))
            else {
                continue;
            };
            let Some(record) = fs::read(dir.join(format!("{stem}.json")))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                .filter(|r| r.key().stem() == stem)
            else {
                continue;
            };
            let used = json.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((used, stem.to_string(), record, meta));
        }
        found.sort_by_key(|(used, ..)| *used);
        let mut index = CacheIndex::default();
        for (_, stem, record, meta) in found {
            index.insert(stem, record.key(), record.config, &meta);
        }
        index
    }

    fn insert(
        &mut self,
        stem: String,
        key: CacheKey,
        config: ImageRuntimeConfig,
        meta: &fs::Metadata,
    ) -> &mut Entry {
        let mut leases = 0;
        if let Some(old) = self.entries.remove(&stem) {
            self.bytes -= old.disk_bytes;
            leases = old.leases;
        }
        self.tick += 1;
        let disk_bytes = meta.blocks() * 512;
        self.bytes += disk_bytes;
        self.entries.entry(stem).or_insert(Entry {
            key,
            config,
            len: meta.len(),
            disk_bytes,
            last_use: self.tick,
            leases,
        })
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Held while an image may be booted: a leased image is never evicted.
/// Clones hold the image too; the last one dropped releases it.
pub struct ImageLease {
    inner: Arc<Inner>,
    /// The entry's file stem.
    stem: String,
}

impl ImageLease {
    fn new(inner: &Arc<Inner>, stem: &str) -> Self {
        ImageLease {
            inner: inner.clone(),
            stem: stem.to_string(),
        }
    }
}

impl Clone for ImageLease {
    fn clone(&self) -> Self {
        if let Some(e) = self.inner.index().entries.get_mut(&self.stem) {
            e.leases += 1;
        }
        ImageLease::new(&self.inner, &self.stem)
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let over = {
            let mut index = self.inner.index();
            if let Some(e) = index.entries.get_mut(&self.stem) {
                e.leases = e.leases.saturating_sub(1);
            }
            self.inner.max_bytes > 0 && index.bytes > self.inner.max_bytes
        };
        // The image that kept the cache over its bound may go now.
        if over {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let inner = self.inner.clone();
                rt.spawn_blocking(move || inner.evict());
            }
        }
    }
}

impl PartialEq for ImageLease {
    fn eq(&self, other: &Self) -> bool {
        self.stem == other.stem
    }
}

impl Eq for ImageLease {}

impl std::fmt::Debug for ImageLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageLease({})", self.stem)
    }
}

impl Inner {
    pub(crate) fn index(&self) -> MutexGuard<'_, CacheIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The image of entry `e` (file stem `stem`), leased to the caller.
    /// Called with the index locked.
    fn lease(self: &Arc<Self>, e: &mut Entry, stem: &str) -> DiskImage {
        e.leases += 1;
        DiskImage {
            manifest_digest: e.key.digest.clone(),
            path: self.image_path(stem),
            size_bytes: e.len,
            config: e.config.clone(),
            lease: ImageLease::new(self, stem),
        }
    }

    /// The image cached for `key` (converted from that registry and repository),
    /// leased, as most recently used. The caller has just had the registry let this
    /// request read the manifest there: that, not the cache, is the access check.
    pub(crate) fn cached(self: &Arc<Self>, key: &CacheKey) -> Option<DiskImage> {
        let stem = key.stem();
        let image = {
            let mut index = self.index();
            index.tick += 1;
            let tick = index.tick;
            let e = index.entries.get_mut(&stem)?;
            // The stem is a hash; the full source and digest are what must match.
            if e.key != *key {
                return None;
            }
            e.last_use = tick;
            self.lease(e, &stem)
        };
        // The use order, for the next start (off the caller's thread).
        let record = self.record_path(&stem);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || touch(&record));
        }
        Some(image)
    }

    /// Records an image just moved into the cache, leased to the caller, and
    /// evicts others if the cache is now over its bound.
    pub(crate) fn register(self: &Arc<Self>, record: &Record, meta: &fs::Metadata) -> DiskImage {
        let key = record.key();
        let stem = key.stem();
        let image = {
            let mut index = self.index();
            let e = index.insert(stem.clone(), key, record.config.clone(), meta);
            self.lease(e, &stem)
        };
        self.evict();
        image
    }

    /// Deletes least recently used images nobody holds until the cache is
    /// within its bound (or only leased images are left). Blocking.
    pub(crate) fn evict(&self) {
        if self.max_bytes == 0 {
            return;
        }
        let mut index = self.index();
        while index.bytes > self.max_bytes {
            let Some(stem) = index
                .entries
                .iter()
                .filter(|(_, e)| e.leases == 0)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(s, _)| s.clone())
            else {
                break;
            };
            let Some(e) = index.entries.remove(&stem) else {
                break;
            };
            index.bytes -= e.disk_bytes;
            // The image first: a record without its image is a cache miss.
            let image = self.image_path(&stem);
            if let Err(err) = fs::remove_file(&image) {
                tracing::warn!(path = %image.display(), error = %err, "evicting a cached image");
            }
            let _ = fs::remove_file(self.record_path(&stem));
            // The content hash the VM runner records beside an image.
            let mut hash_record = image.into_os_string();
            hash_record.push(".blake3");
            let _ = fs::remove_file(hash_record);
            tracing::info!(
                digest = %e.key.digest, registry = %e.key.registry, repository = %e.key.repository,
                bytes = e.disk_bytes, cache_bytes = index.bytes,
                "evicted cached image (least recently used)"
            );
        }
    }
}

fn touch(path: &Path) {
    if let Ok(f) = fs::File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}
