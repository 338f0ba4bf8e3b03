//! Building an image: pull the config and layers (a few at a time, each verified),
//! apply the layers to a staging tree, `mkfs.ext4` it, and move the record and the
//! image into the cache atomically.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use crate::convert;
use crate::decompress;
use crate::key::{hex_of, CacheKey};
use crate::manifest::{self, Descriptor, ImageRuntimeConfig};
use crate::store::{Inner, OwnedRepo, Record, INSTANCE};
use crate::unpack::{self, UnpackError};
use crate::{DiskImage, ImageError};

/// Layers downloaded at the same time.
const PARALLEL_DOWNLOADS: usize = 3;

/// Resolves when a layer's blob is on disk and verified (or its download failed).
type LayerReady = tokio::sync::oneshot::Receiver<Result<(), ImageError>>;

impl Inner {
    pub(crate) async fn convert(
        self: Arc<Self>,
        repo: OwnedRepo,
        digest: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    ) -> Result<DiskImage, ImageError> {
        let shown = repo.shown.clone();
        let started = Instant::now();
        let work = self.tmp_dir.join(format!(
            "{}-{}",
            hex_of(&digest),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&work).map_err(|e| {
            ImageError::internal(&shown, format!("creating {}: {e}", work.display()))
        })?;
        let cleanup = RemoveOnDrop(work.clone());

        let config_blob = self
            .client
            .get_blob_bytes(&repo.borrow(), &config.digest, 8 << 20)
            .await?;
        let (runtime, os, arch) =
            manifest::parse_config(&config_blob).map_err(|e| ImageError::bad_image(&shown, e))?;
        if (!os.is_empty() && os != "linux") || (!arch.is_empty() && arch != "amd64") {
            return Err(ImageError::bad_image(
                &shown,
                format!("image {digest} is for {os}/{arch}, not linux/amd64"),
            ));
        }
        let total: u64 = layers.iter().map(|l| l.size).sum();
        info!(image = %shown, %digest, layers = layers.len(), bytes = total, "pulling image");
        // Layers download a few at a time while the ones already here are unpacked in
        // order; dropping `downloads` (on any error) aborts those still running.
        let (downloads, files) = self.start_downloads(&repo, &layers, &work);
        let this = self.clone();
        let digest2 = digest.clone();
        let (image, cleanup) = tokio::task::spawn_blocking(move || {
            (this.build(&repo, &digest2, runtime, files, &work), cleanup)
        })
        .await
        .map_err(|e| ImageError::internal(&shown, format!("conversion thread: {e}")))?;
        // Removing a big staging tree takes seconds: not on the caller's time.
        tokio::task::spawn_blocking(move || drop(cleanup));
        let image = match image {
            Ok(i) => i,
            Err(e) => {
                metrics::counter!("hearth_image_conversions_total", "result" => "failed")
                    .increment(1);
                return Err(e);
            }
        };
        drop(downloads);
        self.conversions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("hearth_image_conversions_total", "result" => "ok").increment(1);
        metrics::histogram!("hearth_image_conversion_seconds")
            .record(started.elapsed().as_secs_f64());
        info!(
            image = %shown, %digest, size = image.size_bytes,
            total_ms = started.elapsed().as_millis() as u64, "image converted"
        );
        Ok(image)
    }

    /// Starts the layer downloads (at most [`PARALLEL_DOWNLOADS`] at once, in layer
    /// order); each layer's receiver says when its file is complete and verified.
    fn start_downloads(
        self: &Arc<Self>,
        repo: &OwnedRepo,
        layers: &[Descriptor],
        work: &Path,
    ) -> (tokio::task::JoinSet<()>, Vec<(PathBuf, LayerReady)>) {
        let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL_DOWNLOADS));
        let mut tasks = tokio::task::JoinSet::new();
        let mut files = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            // (Layer media types were checked when the manifest was parsed.)
            let path = work.join(format!("layer-{i}"));
            let (tx, rx) = tokio::sync::oneshot::channel();
            files.push((path.clone(), rx));
            let (this, repo, layer, sem) = (self.clone(), repo.clone(), layer.clone(), sem.clone());
            let label = format!("{}/{}", i + 1, layers.len());
            tasks.spawn(async move {
                let _permit = sem.acquire().await;
                let r = this
                    .client
                    .download_blob(&repo.borrow(), &layer.digest, layer.size, &path, &label)
                    .await;
                let _ = tx.send(r);
            });
        }
        (tasks, files)
    }

    /// Unpacks the layers, runs mkfs, and moves the record and the image into place.
    fn build(
        self: &Arc<Self>,
        repo: &OwnedRepo,
        digest: &str,
        config: ImageRuntimeConfig,
        files: Vec<(PathBuf, LayerReady)>,
        work: &Path,
    ) -> Result<DiskImage, ImageError> {
        let shown = &repo.shown;
        let internal =
            |what: &str, e: std::io::Error| ImageError::internal(shown, format!("{what}: {e}"));
        let staging = work.join("rootfs");
        fs::create_dir(&staging).map_err(|e| internal("creating staging dir", e))?;
        let started = Instant::now();
        let mut waited = std::time::Duration::ZERO;
        let count = files.len();
        for (i, (file, ready)) in files.into_iter().enumerate() {
            let wait = Instant::now();
            ready
                .blocking_recv()
                .map_err(|_| ImageError::internal(shown, "layer download stopped"))??;
            waited += wait.elapsed();
            let (reader, format) =
                decompress::open_layer(&file).map_err(|e| internal("opening layer", e))?;
            let stats = unpack::apply_layer(&staging, reader).map_err(|e| {
                let msg = format!("layer {} of {count}: {e}", i + 1);
                match e {
                    UnpackError::Unsafe(_) | UnpackError::Corrupt(_) => {
                        ImageError::bad_image(shown, msg)
                    }
                    UnpackError::Io(_) => ImageError::internal(shown, msg),
                }
            })?;
            let _ = fs::remove_file(&file);
            info!(image = %shown, layer = i + 1, format, entries = stats.entries, whiteouts = stats.whiteouts, skipped = stats.skipped, "unpacked layer");
        }
        let unpacked = started.elapsed() - waited;
        let tree = convert::measure(&staging).map_err(|e| internal("measuring staging dir", e))?;
        let tmp_image = work.join("image.ext4");
        let mkfs_started = Instant::now();
        convert::make_ext4(&staging, &tmp_image, tree)
            .map_err(|e| ImageError::internal(shown, e))?;
        info!(
            image = %shown, %digest, tree_bytes = tree.bytes, inodes = tree.inodes,
            download_wait_ms = waited.as_millis() as u64, unpack_ms = unpacked.as_millis() as u64, mkfs_ms = mkfs_started.elapsed().as_millis() as u64,
            "built ext4 image"
        );
        // Keyed by where it was pulled from: the digest alone would hand it to any
        // request naming that digest anywhere (see `key.rs`).
        let key = CacheKey::new(&repo.reference, digest);
        let stem = key.stem();
        let record = Record {
            manifest_digest: key.digest,
            registry: key.registry,
            repository: key.repository,
            reference: repo.reference.to_string(),
            config,
        };
        let json = serde_json::to_vec_pretty(&record).expect("serializable");
        write_atomic(work, &self.record_path(&stem), &json)
            .map_err(|e| internal("writing image record", e))?;
        let path = self.image_path(&stem);
        fs::rename(&tmp_image, &path).map_err(|e| internal("moving image into the cache", e))?;
        let meta = fs::metadata(&path).map_err(|e| internal("reading image size", e))?;
        Ok(self.register(&record, &meta))
    }
}

pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, data: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(tmp_dir)?;
    let tmp = tmp_dir.join(format!(
        "write-{}",
        INSTANCE.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, dest)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
