//! DiskStore: durability, verification, eviction and its races.

use super::*;

fn blob(s: &str) -> (Digest, Bytes) {
    let b = Bytes::from(s.to_string());
    (Digest::of(&b), b)
}

#[tokio::test]
async fn put_read_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (d, b) = blob("hello world");
    {
        let store = DiskStore::open(dir.path(), 0).unwrap();
        assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
        store.put(&d, b.clone()).await.unwrap();
        assert!(store.find_missing(&[d]).await.unwrap().is_empty());
    }
    let store = DiskStore::open(dir.path(), 0).unwrap();
    assert_eq!(store.read(&d, 0, None).await.unwrap(), b);
    assert_eq!(
        store.read(&d, 6, Some(3)).await.unwrap(),
        Bytes::from("wor")
    );
    assert!(matches!(
        store.read(&d, 100, None).await,
        Err(StoreError::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn rejects_data_that_does_not_match_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 0).unwrap();
    let (d, _) = blob("expected");
    let err = store.put(&d, Bytes::from("other")).await.unwrap_err();
    assert!(matches!(err, StoreError::Mismatch { .. }), "{err}");
    assert_eq!(store.stats().blobs, 0);
    assert!(!store.path_of(&d).exists());
}

#[tokio::test]
async fn truncated_file_on_disk_is_dropped_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let (d, b) = blob("some content that will be truncated");
    {
        let store = DiskStore::open(dir.path(), 0).unwrap();
        store.put(&d, b).await.unwrap();
        fs::write(store.path_of(&d), b"some").unwrap();
    }
    let store = DiskStore::open(dir.path(), 0).unwrap();
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
    assert!(matches!(
        store.read(&d, 0, None).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn interrupted_writes_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = DiskStore::open(dir.path(), 0).unwrap();
        fs::write(store.staging_dir().join("partial"), b"half a blo").unwrap();
    }
    let store = DiskStore::open(dir.path(), 0).unwrap();
    assert_eq!(fs::read_dir(store.staging_dir()).unwrap().count(), 0);
    assert_eq!(store.stats().blobs, 0);
}

#[tokio::test]
async fn lru_eviction_spares_pinned_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 20).unwrap();
    let (a, ab) = blob("aaaaaaaaaa");
    let (b, bb) = blob("bbbbbbbbbb");
    let (c, cb) = blob("cccccccccc");
    store.put(&a, ab).await.unwrap();
    store.put(&b, bb).await.unwrap();
    store.pin(&[a]);
    store.put(&c, cb).await.unwrap();
    // a is the oldest but pinned, so b goes.
    assert_eq!(store.find_missing(&[a, b, c]).await.unwrap(), vec![b]);
    assert!(!store.path_of(&b).exists());
    assert_eq!(store.stats().bytes, 20);
}

/// Rewrites the file it reads after its first read, as a process the
/// action left behind might while outputs are collected.
struct RewrittenWhileRead {
    file: fs::File,
    path: PathBuf,
    rewritten: bool,
}

impl Read for RewrittenWhileRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = buf.len().min(4);
        let n = self.file.read(&mut buf[..len])?;
        if !self.rewritten {
            self.rewritten = true;
            fs::write(&self.path, b"EVILEVILEVIL")?;
        }
        Ok(n)
    }
}

#[test]
fn ingest_stores_exactly_the_bytes_it_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&dir.path().join("s"), 0).unwrap();
    let path = dir.path().join("out");
    fs::write(&path, b"good output!").unwrap();
    let mut source = RewrittenWhileRead {
        file: fs::File::open(&path).unwrap(),
        path: path.clone(),
        rewritten: false,
    };
    let d = store.ingest(&mut source).unwrap();
    let stored = fs::read(store.path_of(&d)).unwrap();
    assert_eq!(
        Digest::of(&stored),
        d,
        "the blob is stored under its own digest"
    );
    assert_eq!(d.size(), 12);
}

/// Sources longer than the in-memory buffer go through a staging file;
/// short, empty and already stored ones do not need one. All are stored
/// under the digest of the bytes read.
#[test]
fn ingest_of_every_size_stores_what_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&dir.path().join("s"), 0).unwrap();
    for len in [
        0,
        1,
        INGEST_BUFFER - 1,
        INGEST_BUFFER,
        INGEST_BUFFER + 1,
        3 * INGEST_BUFFER + 7,
    ] {
        let data = big_blob(len);
        for _ in 0..2 {
            // The second time the blob is already stored.
            let d = store.ingest(&mut data.as_slice()).unwrap();
            assert_eq!(d, Digest::of(&data), "{len} bytes");
            if len > 0 {
                assert_eq!(fs::read(store.path_of(&d)).unwrap(), data, "{len} bytes");
            }
        }
    }
    assert_eq!(fs::read_dir(store.staging_dir()).unwrap().count(), 0);
    let path = dir.path().join("out");
    fs::write(&path, big_blob(2 * INGEST_BUFFER)).unwrap();
    let mut source = RewrittenWhileRead {
        file: fs::File::open(&path).unwrap(),
        path: path.clone(),
        rewritten: false,
    };
    let d = store.ingest(&mut source).unwrap();
    assert_eq!(Digest::of(&fs::read(store.path_of(&d)).unwrap()), d);
}

#[tokio::test]
async fn adopt_and_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&dir.path().join("s"), 0).unwrap();
    let src = dir.path().join("f");
    fs::write(&src, b"file body").unwrap();
    let d = store
        .ingest_file(fs::File::open(&src).unwrap())
        .await
        .unwrap();
    assert_eq!(d, Digest::of(b"file body"));
    assert!(src.exists(), "ingest copies");
    let wrong = Digest::of(b"nope");
    assert!(store.adopt_file(&wrong, &src).await.is_err());
    fs::write(&src, b"other body").unwrap();
    store
        .adopt_file(&Digest::of(b"other body"), &src)
        .await
        .unwrap();
    assert!(!src.exists(), "adopt_file takes the file");
    assert_eq!(
        store
            .read(&Digest::of(b"other body"), 0, None)
            .await
            .unwrap(),
        Bytes::from("other body")
    );
}

/// Every blob the index holds has its file, with the right bytes.
fn assert_index_matches_disk(store: &DiskStore, blobs: &[(Digest, Bytes)]) {
    for (d, b) in blobs {
        if store.contains(d) {
            let on_disk = fs::read(store.path_of(d))
                .unwrap_or_else(|e| panic!("{d} is indexed but its file is gone: {e}"));
            assert_eq!(on_disk, b.as_ref());
        }
    }
}

/// Eviction unlinks outside the index lock. A put of the blob being
/// unlinked, arriving between its removal from the index and the unlink,
/// must not have its new file deleted by that unlink: it waits, then
/// writes the file anew.
#[test]
fn a_reinsert_during_the_unlink_of_its_eviction_keeps_the_new_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(dir.path(), 20).unwrap());
    let (a, ab) = blob("aaaaaaaaaa");
    let (b, bb) = blob("bbbbbbbbbb");
    let (c, cb) = blob("cccccccccc");
    store.inner.write_bytes(&a, &ab).unwrap();
    store.inner.write_bytes(&b, &bb).unwrap();
    let reinsert: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    let armed = Arc::new(AtomicBool::new(true));
    {
        let (store2, reinsert, armed, ab) =
            (store.clone(), reinsert.clone(), armed.clone(), ab.clone());
        *store.inner.before_unlink.lock().unwrap() = Some(Box::new(move |d: &Digest| {
            if *d != a || !armed.swap(false, Ordering::SeqCst) {
                return;
            }
            // a is out of the index, its file still there: put it again now.
            let (store3, ab) = (store2.clone(), ab.clone());
            let t = std::thread::spawn(move || store3.inner.write_bytes(&a, &ab).unwrap());
            // Give the put every chance to finish before the unlink (it
            // would, were it not held back); it must not.
            let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
            while !t.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(!t.is_finished(), "the re-insert went ahead of the unlink");
            *reinsert.lock().unwrap() = Some(t);
        }));
    }
    // c pushes the store over its bound; a is the least recently used.
    store.inner.write_bytes(&c, &cb).unwrap();
    let t = reinsert.lock().unwrap().take().expect("a was evicted");
    t.join().unwrap();
    assert!(store.contains(&a), "the re-inserted blob is present");
    assert_index_matches_disk(&store, &[(a, ab), (b, bb), (c, cb)]);
    assert!(store.stats().bytes <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_under_a_tight_bound_keep_index_and_disk_agreeing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(dir.path(), 100).unwrap());
    let blobs: Vec<(Digest, Bytes)> = (0..12)
        .map(|i| blob(&format!("blob number {i:02}")))
        .collect();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (store, blobs) = (store.clone(), blobs.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                let (d, b) = &blobs[(i * 7 + t) % blobs.len()];
                store.put(d, b.clone()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_index_matches_disk(&store, &blobs);
    let files: usize = (0..=255u8)
        .map(|i| {
            fs::read_dir(dir.path().join("cas").join(hex::encode([i])))
                .unwrap()
                .count()
        })
        .sum();
    assert_eq!(
        files as u64,
        store.stats().blobs,
        "no file outside the index"
    );
}

fn big_blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn a_sink_streams_a_blob_in_and_verifies_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 0).unwrap();
    let data = big_blob(3 * 1024 * 1024 + 17);
    let d = Digest::of(&data);
    let mut sink = store.sink(d);
    for c in data.chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(c)).await.unwrap();
    }
    sink.finish().await.unwrap();
    assert_eq!(fs::read(store.path_of(&d)).unwrap(), data);
    let mut f = store.open_blob(&d).unwrap();
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
}

#[tokio::test]
async fn a_sink_rejects_wrong_short_and_long_content_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), 0).unwrap();
    let data = big_blob(256 * 1024);
    let d = Digest::of(&data);
    // Same length, one byte changed.
    let mut wrong = data.clone();
    wrong[1000] ^= 1;
    let mut sink = store.sink(d);
    sink.send(Bytes::from(wrong)).await.unwrap();
    let e = sink.finish().await.unwrap_err();
    assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
    // Too short.
    let mut sink = store.sink(d);
    sink.send(Bytes::copy_from_slice(&data[..1000]))
        .await
        .unwrap();
    assert!(matches!(
        sink.finish().await,
        Err(StoreError::Mismatch { .. })
    ));
    // Too long: refused as soon as it is, not at the end.
    let mut sink = store.sink(d);
    let mut refused = false;
    for _ in 0..100 {
        if sink.send(Bytes::copy_from_slice(&data)).await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "an over-long blob is cut off");
    // Abandoned mid-way.
    let mut sink = store.sink(d);
    sink.send(Bytes::copy_from_slice(&data[..10]))
        .await
        .unwrap();
    drop(sink);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(store.stats().blobs, 0);
    assert!(!store.path_of(&d).exists());
    assert_eq!(
        fs::read_dir(store.staging_dir()).unwrap().count(),
        0,
        "no staging file left"
    );
}
