use std::sync::Arc;

use hearth_storage::DiskStore;

use super::*;

const KEY: &str = "aff.conf";

/// Fetches the snapshot `shared` names into the empty directory `into`
/// (chunks already in the local cache are not fetched again), as an
/// executor does, and returns its metadata.
async fn fetch(
    share: &Sharing,
    shared: &SharedSnapshot,
    runner_key: &str,
    into: &Path,
) -> Result<CleanMeta, VmError> {
    let manifest = share.manifest(shared, runner_key).await?;
    let meta = manifest.meta.clone();
    share.unpack(manifest, into).await?;
    Ok(meta)
}

fn meta() -> CleanMeta {
    CleanMeta {
        format: CLEAN_FORMAT,
        key: runner_snapshot_key(KEY),
        vcpus: 1,
        memory_mib: 64,
        network: false,
        dockerd: true,
        work_size: 1 << 30,
        saved_unix_secs: 7,
    }
}

/// A saved VM: a small state file, a sparse memory file with data in two
/// chunks (one compressible, one not) and a zeroed chunk written out, and
/// a scratch disk whose first chunk equals the memory's first.
fn saved_vm(dir: &Path) {
    std::fs::write(dir.join(STATE_FILE), b"device state").unwrap();
    let mem = File::create(dir.join(MEMORY_FILE)).unwrap();
    mem.set_len(64 << 20).unwrap();
    mem.write_all_at(&vec![0xaa; CHUNK_SIZE as usize], 0)
        .unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..CHUNK_SIZE as usize)
        .map(|_| {
            // xorshift64: incompressible enough for zstd.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    mem.write_all_at(&noise, 5 * CHUNK_SIZE + 123).unwrap();
    mem.write_all_at(&vec![0; CHUNK_SIZE as usize], 20 * CHUNK_SIZE)
        .unwrap();
    let disk = File::create(dir.join(SCRATCH_FILE)).unwrap();
    disk.set_len(16 << 20).unwrap();
    disk.write_all_at(&vec![0xaa; CHUNK_SIZE as usize], 0)
        .unwrap();
}

fn sharing(root: &Path) -> (Sharing, Arc<DiskStore>) {
    let store = Arc::new(DiskStore::open(&root.join("cas"), 0).unwrap());
    (Sharing::new(LocalCas::shared(store.clone())), store)
}

#[tokio::test]
async fn a_snapshot_round_trips_through_the_cas_in_deduplicated_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("vm");
    std::fs::create_dir(&vm).unwrap();
    saved_vm(&vm);
    let (share, store) = sharing(tmp.path());
    let digest = share.publish(KEY, "aff", &vm, &meta()).await.unwrap();
    let published = share.take_published();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].manifest, Some(digest));
    assert_eq!(published[0].affinity_key, "aff");
    assert!(share.take_published().is_empty(), "taken once");
    assert!(!share.due(KEY), "not republished at once");

    let body = store.read(&digest, 0, None).await.unwrap();
    let m = parse_manifest(&body, KEY).unwrap();
    let mem = m.files.iter().find(|f| f.name == MEMORY_FILE).unwrap();
    // Chunks 0, 5 and 6 hold data; the zeroed chunk 20 and the holes are
    // left out.
    let indexes: Vec<u64> = mem.chunks.iter().map(|c| c.index).collect();
    assert_eq!(indexes, [0, 5, 6]);
    assert!(mem.chunks[0].zstd, "a repetitive chunk is compressed");
    assert!(!mem.chunks[1].zstd, "noise is stored as it is");
    let disk = m.files.iter().find(|f| f.name == SCRATCH_FILE).unwrap();
    assert_eq!(
        disk.chunks[0].blob, mem.chunks[0].blob,
        "equal chunks are one blob"
    );
    // state, mem 0 (= scratch 0), mem 5, mem 6, the manifest.
    assert_eq!(hearth_storage::Occupancy::stats(&*store).blobs, 5);

    let into = tmp.path().join("fetched");
    std::fs::create_dir(&into).unwrap();
    let shared = SharedSnapshot {
        affinity_key: "aff".into(),
        runner_key: KEY.into(),
        manifest: Some(digest),
    };
    assert_eq!(fetch(&share, &shared, KEY, &into).await.unwrap(), meta());

    share.withdraw(KEY, "aff");
    assert!(share.due(KEY), "the next one is published at once");
    let withdrawn = share.take_published();
    assert_eq!(withdrawn[0].manifest, None);
    let e = fetch(&share, &withdrawn[0], KEY, &into).await.unwrap_err();
    assert!(e.to_string().contains("withdrawn"), "{e}");
    for f in FILES {
        assert_eq!(
            std::fs::read(vm.join(f)).unwrap(),
            std::fs::read(into.join(f)).unwrap(),
            "{f} is the same"
        );
    }
    let allocated = std::fs::metadata(into.join(MEMORY_FILE)).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&allocated) * 512 < 16 << 20,
        "the fetched memory file stays sparse"
    );
}

#[tokio::test]
async fn a_damaged_chunk_another_format_or_another_configuration_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("vm");
    std::fs::create_dir(&vm).unwrap();
    saved_vm(&vm);
    let (share, store) = sharing(tmp.path());
    let digest = share.publish(KEY, "aff", &vm, &meta()).await.unwrap();
    let body = store.read(&digest, 0, None).await.unwrap();
    let m = parse_manifest(&body, KEY).unwrap();
    let shared = SharedSnapshot {
        affinity_key: "aff".into(),
        runner_key: KEY.into(),
        manifest: Some(digest),
    };

    // Another VM configuration (the runner key covers QEMU, kernel, agent,
    // image and size).
    let e = fetch(&share, &shared, "aff.other", tmp.path())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("another VM configuration"), "{e}");
    assert!(parse_manifest(&body, "aff.other").is_err());

    // Another format.
    let mut newer = m.clone();
    newer.format = SHARE_FORMAT + 1;
    let e = parse_manifest(&serde_json::to_vec(&newer).unwrap(), KEY).unwrap_err();
    assert!(e.to_string().contains("format"), "{e}");
    let mut older = m.clone();
    older.meta.format = CLEAN_FORMAT + 1;
    assert!(parse_manifest(&serde_json::to_vec(&older).unwrap(), KEY).is_err());

    // Hostile manifests: unknown file names, chunks out of bounds.
    let mut odd = m.clone();
    odd.files[0].name = "../../etc/passwd".into();
    assert!(parse_manifest(&serde_json::to_vec(&odd).unwrap(), KEY).is_err());
    let mut far = m.clone();
    let mem = far
        .files
        .iter_mut()
        .find(|f| f.name == MEMORY_FILE)
        .unwrap();
    mem.chunks[0].index = 1 << 40;
    assert!(parse_manifest(&serde_json::to_vec(&far).unwrap(), KEY).is_err());

    // A chunk whose stored bytes were damaged.
    let mem = m.files.iter().find(|f| f.name == MEMORY_FILE).unwrap();
    let noise = &mem.chunks[1];
    let path = store.path_of(&noise.digest().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, &bytes).unwrap();
    let into = tmp.path().join("fetched");
    std::fs::create_dir(&into).unwrap();
    let e = fetch(&share, &shared, KEY, &into).await.unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");
}
