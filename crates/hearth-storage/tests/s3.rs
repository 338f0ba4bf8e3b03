//! The object-store tier and the decorators in front of it, against a real
//! S3 server (SeaweedFS, started here).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use hearth_storage::{
    BlobSource, BlobStore, Digest, DiskStore, ExistenceCache, FastSlow, ObjectBlobStore,
    StagedFile, StoreError,
};
use hearth_testkit::SeaweedFs;
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

fn s3(server: &SeaweedFs) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&server.endpoint)
            .with_bucket_name(&server.bucket)
            .with_access_key_id(&server.access_key)
            .with_secret_access_key(&server.secret_key)
            .with_region("us-east-1")
            .with_allow_http(true)
            .build()
            .unwrap(),
    )
}

fn blob(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

async fn collect(store: &dyn BlobStore, d: &Digest) -> Result<Vec<u8>, StoreError> {
    let chunks: Vec<Bytes> = store.read_stream(d, 0, None).await?.try_collect().await?;
    Ok(chunks.concat())
}

#[tokio::test]
async fn put_get_range_missing_and_multipart_against_seaweedfs() {
    let server = SeaweedFs::start();
    let bucket = s3(&server);
    let store = ObjectBlobStore::new(bucket.clone(), "ci/one");

    let small = blob(1000, 1);
    let d = Digest::of(&small);
    let absent = Digest::of(b"never stored");
    assert_eq!(
        store.find_missing(&[d, absent]).await.unwrap(),
        vec![d, absent]
    );
    store.put(&d, small.clone()).await.unwrap();
    assert_eq!(
        store.find_missing(&[d, absent]).await.unwrap(),
        vec![absent]
    );
    assert_eq!(store.read(&d, 0, None).await.unwrap(), small);
    assert_eq!(
        store.read(&d, 100, Some(10)).await.unwrap(),
        small.slice(100..110)
    );
    assert!(matches!(
        store.read(&d, 1001, None).await,
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.read(&absent, 0, None).await,
        Err(StoreError::NotFound(_))
    ));

    // 20 MiB goes up in parts, from memory and from a file.
    let big = blob(20 << 20, 2);
    let bd = Digest::of(&big);
    store.put(&bd, big.clone()).await.unwrap();
    assert_eq!(collect(&store, &bd).await.unwrap(), big);
    let from_file = blob(17 << 20, 3);
    let fd = Digest::of(&from_file);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("upload");
    std::fs::write(&path, &from_file).unwrap();
    store
        .write(&fd, BlobSource::File(StagedFile::new(path.clone())))
        .await
        .unwrap();
    assert!(!path.exists(), "the store takes the file");
    let meta = bucket.head(&store.key(&fd)).await.unwrap();
    assert_eq!(meta.size, from_file.len() as u64);
    assert!(
        meta.e_tag.unwrap_or_default().contains('-'),
        "a multipart upload's ETag names its parts"
    );
    assert_eq!(collect(&store, &fd).await.unwrap(), from_file);
    assert_eq!(
        store.read(&fd, (9 << 20) - 5, Some(10)).await.unwrap(),
        from_file.slice((9 << 20) - 5..(9 << 20) + 5)
    );

    // Bytes that do not match the digest are never stored.
    let wrong = Digest::of(b"the right bytes");
    assert!(matches!(
        store
            .put(&wrong, Bytes::from_static(b"the wrong bytes"))
            .await,
        Err(StoreError::Mismatch { .. })
    ));
    assert!(bucket.head(&store.key(&wrong)).await.is_err());
}

#[tokio::test]
async fn a_corrupted_object_is_detected_on_read_dropped_and_reported_missing() {
    let server = SeaweedFs::start();
    let bucket = s3(&server);
    let store = Arc::new(ObjectBlobStore::new(bucket.clone(), "ci/two"));
    let data = blob(3 << 20, 4);
    let d = Digest::of(&data);
    store.put(&d, data.clone()).await.unwrap();
    // Someone with access to the bucket flips a byte (same size).
    let mut bad = data.to_vec();
    bad[12345] ^= 0xff;
    bucket
        .put(&store.key(&d), PutPayload::from(bad))
        .await
        .unwrap();

    // Through a disk tier: the fill is refused and nothing is cached.
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskStore::open(dir.path(), 0).unwrap());
    let tiered = FastSlow::new(disk.clone(), store.clone());
    assert!(matches!(
        tiered.read(&d, 0, None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(!disk.contains(&d));
    // The bad object is gone, so the client is told to upload it again.
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
    assert_eq!(tiered.find_missing(&[d]).await.unwrap(), vec![d]);

    // The stream read of a bad object ends in an error, never cleanly.
    let mut bad = data.to_vec();
    bad[0] ^= 1;
    bucket
        .put(&store.key(&d), PutPayload::from(bad))
        .await
        .unwrap();
    assert!(matches!(
        collect(store.as_ref(), &d).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn the_disk_tier_fills_from_the_bucket_and_writes_go_through() {
    let server = SeaweedFs::start();
    let bucket = s3(&server);
    let slow: Arc<dyn BlobStore> = Arc::new(ExistenceCache::new(
        Arc::new(ObjectBlobStore::new(bucket.clone(), "ci/three")),
        Duration::from_secs(60),
        10_000,
    ));
    let one = tempfile::tempdir().unwrap();
    let a = FastSlow::new(
        Arc::new(DiskStore::open(one.path(), 0).unwrap()),
        slow.clone(),
    );
    let small = blob(5000, 5);
    let big = blob(9 << 20, 6);
    let (ds, db) = (Digest::of(&small), Digest::of(&big));
    a.put(&ds, small.clone()).await.unwrap();
    let spool = one.path().join("staging").join("upload");
    std::fs::write(&spool, &big).unwrap();
    a.write(&db, BlobSource::File(StagedFile::new(spool)))
        .await
        .unwrap();

    // A second server with an empty disk sees both, and fills on read.
    let two = tempfile::tempdir().unwrap();
    let disk_b = Arc::new(DiskStore::open(two.path(), 0).unwrap());
    let b = FastSlow::new(disk_b.clone(), slow.clone());
    assert!(b.find_missing(&[ds, db]).await.unwrap().is_empty());
    assert!(!disk_b.contains(&db));
    assert_eq!(b.read(&ds, 10, Some(5)).await.unwrap(), small.slice(10..15));
    assert_eq!(collect(&b, &db).await.unwrap(), big);
    assert!(disk_b.contains(&ds) && disk_b.contains(&db));
    // Now served from disk: the bucket could vanish.
    bucket
        .delete(&ObjectBlobStore::new(bucket.clone(), "ci/three").key(&db))
        .await
        .unwrap();
    assert_eq!(collect(&b, &db).await.unwrap(), big);
}
