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

use crate::manifest::ImageRuntimeConfig;
use crate::store::{Inner, Record};
use crate::DiskImage;

struct Entry {
    manifest_digest: String,
    config: ImageRuntimeConfig,
    /// File length (what `DiskImage::size_bytes` reports).
    len: u64,
    /// Bytes allocated on disk (the image files are sparse): what counts.
    disk_bytes: u64,
    last_use: u64,
    leases: usize,
}

/// Digest hex → image, for every `<hex>.ext4` with its `<hex>.json`.
#[derive(Default)]
pub(crate) struct CacheIndex {
    entries: HashMap<String, Entry>,
    tick: u64,
    bytes: u64,
}

impl CacheIndex {
    /// Reads the cache directory: images with their records, oldest use
    /// (the record's modification time, set at each use) first.
    pub(crate) fn scan(dir: &Path) -> Self {
        let mut found = Vec::new();
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".ext4") else {
                continue;
            };
            let (Ok(meta), Ok(json)) =
                (e.metadata(), fs::metadata(dir.join(format!("{hex}.json"))))
            else {
                continue;
            };
            let Some(record) = fs::read(dir.join(format!("{hex}.json")))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            else {
                continue;
            };
            let used = json.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((used, hex.to_string(), record, meta));
        }
        found.sort_by_key(|(used, ..)| *used);
        let mut index = CacheIndex::default();
        for (_, hex, record, meta) in found {
            index.insert(hex, record.manifest_digest, record.config, &meta);
        }
        index
    }

    fn insert(
        &mut self,
        hex: String,
        manifest_digest: String,
        config: ImageRuntimeConfig,
        meta: &fs::Metadata,
    ) -> &mut Entry {
        let mut leases = 0;
        if let Some(old) = self.entries.remove(&hex) {
            self.bytes -= old.disk_bytes;
            leases = old.leases;
        }
        self.tick += 1;
        let disk_bytes = meta.blocks() * 512;
        self.bytes += disk_bytes;
        self.entries.entry(hex).or_insert(Entry {
            manifest_digest,
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
    hex: String,
}

impl ImageLease {
    fn new(inner: &Arc<Inner>, hex: &str) -> Self {
        ImageLease {
            inner: inner.clone(),
            hex: hex.to_string(),
        }
    }
}

impl Clone for ImageLease {
    fn clone(&self) -> Self {
        if let Some(e) = self.inner.index().entries.get_mut(&self.hex) {
            e.leases += 1;
        }
        ImageLease::new(&self.inner, &self.hex)
    }
}

impl Drop for ImageLease {
    fn drop(&mut self) {
        let over = {
            let mut index = self.inner.index();
            if let Some(e) = index.entries.get_mut(&self.hex) {
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
        self.hex == other.hex
    }
}

impl Eq for ImageLease {}

impl std::fmt::Debug for ImageLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageLease({})", self.hex)
    }
}

impl Inner {
    pub(crate) fn index(&self) -> MutexGuard<'_, CacheIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The image of entry `e` (for `digest`, whose hex is `hex`), leased to
    /// the caller. Called with the index locked.
    fn lease(self: &Arc<Self>, e: &mut Entry, digest: &str, hex: &str) -> DiskImage {
        e.leases += 1;
        DiskImage {
            manifest_digest: e.manifest_digest.clone(),
            path: self.image_path(digest),
            size_bytes: e.len,
            config: e.config.clone(),
            lease: ImageLease::new(self, hex),
        }
    }

    /// The cached image for `digest`, leased, as most recently used.
    pub(crate) fn cached(self: &Arc<Self>, digest: &str) -> Option<DiskImage> {
        let hex = crate::store::hex_of(digest);
        let image = {
            let mut index = self.index();
            index.tick += 1;
            let tick = index.tick;
            let e = index.entries.get_mut(hex)?;
            e.last_use = tick;
            self.lease(e, digest, hex)
        };
        // The use order, for the next start (off the caller's thread).
        let record = self.record_path(digest);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || touch(&record));
        }
        Some(image)
    }

    /// Records an image just moved into the cache, leased to the caller, and
    /// evicts others if the cache is now over its bound.
    pub(crate) fn register(
        self: &Arc<Self>,
        digest: &str,
        record: &Record,
        meta: &fs::Metadata,
    ) -> DiskImage {
        let hex = crate::store::hex_of(digest);
        let image = {
            let mut index = self.index();
            let e = index.insert(
                hex.to_string(),
                record.manifest_digest.clone(),
                record.config.clone(),
                meta,
            );
            self.lease(e, digest, hex)
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
            let Some(hex) = index
                .entries
                .iter()
                .filter(|(_, e)| e.leases == 0)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(h, _)| h.clone())
            else {
                break;
            };
            let Some(e) = index.entries.remove(&hex) else {
                break;
            };
            index.bytes -= e.disk_bytes;
            // The image first: a record without its image is a cache miss.
            let image = self.image_path(&hex);
            if let Err(err) = fs::remove_file(&image) {
                tracing::warn!(path = %image.display(), error = %err, "evicting a cached image");
            }
            let _ = fs::remove_file(self.record_path(&hex));
            tracing::info!(
                digest = %e.manifest_digest, bytes = e.disk_bytes, cache_bytes = index.bytes,
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
