//! Conversion timing on a realistically sized image, built from host directories (one
//! layer each). Not run by default:
//!   cargo test --release -p hearth-image --test bench -- --ignored --nocapture
//! `HEARTH_IMAGE_BENCH_DIRS` (colon-separated) overrides the directories.

mod common;

use std::io::Write;
use std::time::Instant;

use common::*;

fn layer_from(dir: &str) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    b.follow_symlinks(false);
    b.append_dir_all(dir.trim_start_matches('/'), dir).unwrap();
    let mut enc = b.into_inner().unwrap();
    enc.flush().unwrap();
    enc.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn conversion_timing() {
    let dirs = std::env::var("HEARTH_IMAGE_BENCH_DIRS")
        .unwrap_or_else(|_| "/usr/bin:/usr/lib/python3.11:/etc".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter("hearth_image=info")
        .try_init();
    let reg = Registry::start("");
    let layers: Vec<Vec<u8>> = dirs.split(':').map(layer_from).collect();
    let compressed: usize = layers.iter().map(Vec::len).sum();
    Pusher::new(&reg.host, None)
        .image("bench", "v1", config_json("amd64", &[], "", ""), &layers)
        .await;
    let cache = tempfile::tempdir().unwrap();
    let images = store(cache.path(), &reg);
    let reference = format!("{}/bench:v1", reg.host);
    let t = Instant::now();
    let img = images.resolve(&reference, None).await.unwrap();
    let cold = t.elapsed();
    let t = Instant::now();
    images.resolve(&reference, None).await.unwrap();
    let warm = t.elapsed();
    let used = debugfs(&img.path, "stats");
    let used = used
        .lines()
        .filter(|l| l.starts_with("Free blocks") || l.starts_with("Block count"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "dirs {dirs}: {} layers, {} MiB compressed; cold resolve {:.2} s, cached resolve {:.1} ms; image {} MiB ({used})",
        layers.len(),
        compressed >> 20,
        cold.as_secs_f64(),
        warm.as_secs_f64() * 1000.0,
        img.size_bytes >> 20
    );
}
