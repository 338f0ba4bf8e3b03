use super::*;

fn meta(key: &str, saved: u64) -> CleanMeta {
    CleanMeta {
        format: CLEAN_FORMAT,
        key: key.into(),
        vcpus: 1,
        memory_mib: 512,
        network: false,
        dockerd: false,
        work_size: 1 << 30,
        saved_unix_secs: saved,
    }
}

/// A saved VM of `kib` KiB of real blocks, in a staging directory.
fn saved(store: &CleanStore, tag: &str, kib: usize) -> PathBuf {
    let dir = store.staging().unwrap();
    std::fs::write(dir.join("mem"), vec![tag.as_bytes()[0]; kib * 1024]).unwrap();
    std::fs::write(dir.join("state"), tag).unwrap();
    dir
}

fn mem_of(s: &CleanSnapshot) -> u8 {
    std::fs::read(s.dir.join("mem")).unwrap()[0]
}

#[test]
fn a_snapshot_serves_many_clones_and_is_never_consumed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CleanStore::open(tmp.path(), 1 << 30).unwrap();
    assert!(store.get("k").is_none());
    let staging = saved(&store, "a", 64);
    store.put(&staging, &meta("k", 1)).unwrap();
    assert!(!staging.exists(), "moved into place");
    let first = store.get("k").unwrap();
    let second = store.get("k").unwrap();
    assert_eq!(first.dir, second.dir);
    assert_eq!(mem_of(&first), b'a');
    drop((first, second));
    assert_eq!(store.get("k").unwrap().meta, meta("k", 1), "still there");
}

#[test]
fn a_newer_snapshot_replaces_the_old_once_no_clone_is_made_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CleanStore::open(tmp.path(), 1 << 30).unwrap();
    store.put(&saved(&store, "a", 8), &meta("k", 1)).unwrap();
    let preparing = store.get("k").unwrap();
    store.put(&saved(&store, "b", 8), &meta("k", 2)).unwrap();
    assert_eq!(mem_of(&store.get("k").unwrap()), b'b', "the new one serves");
    assert!(preparing.dir.exists(), "the old one waits for its clone");
    assert_eq!(mem_of(&preparing), b'a');
    let old = preparing.dir.clone();
    drop(preparing);
    store
        .put(&saved(&store, "c", 8), &meta("other", 3))
        .unwrap();
    assert!(!old.exists(), "deleted at the next change");
}

#[test]
fn the_store_keeps_within_its_bytes_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for two snapshots of 1 MiB of blocks, not three.
    let store = CleanStore::open(tmp.path(), 2_500 * 1024).unwrap();
    store.put(&saved(&store, "a", 1024), &meta("a", 1)).unwrap();
    store.put(&saved(&store, "b", 1024), &meta("b", 2)).unwrap();
    assert!(store.get("a").is_some(), "a is now the more recently used");
    store.put(&saved(&store, "c", 1024), &meta("c", 3)).unwrap();
    assert!(store.get("b").is_none(), "b was used least recently");
    assert!(store.get("a").is_some() && store.get("c").is_some());
    assert!(store.bytes() <= 2_500 * 1024, "{}", store.bytes());
}

#[test]
fn a_held_snapshot_is_evicted_only_once_let_go() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CleanStore::open(tmp.path(), 1_500 * 1024).unwrap();
    store.put(&saved(&store, "a", 1024), &meta("a", 1)).unwrap();
    let held = store.get("a").unwrap();
    store.put(&saved(&store, "b", 1024), &meta("b", 2)).unwrap();
    assert!(store.get("a").is_none(), "no longer offered");
    assert!(
        held.dir.join("mem").exists(),
        "but not deleted under its clone"
    );
    let dir = held.dir.clone();
    drop(held);
    store.put(&saved(&store, "c", 1024), &meta("c", 3)).unwrap();
    assert!(!dir.exists());
}

#[test]
fn opening_drops_interrupted_saves_other_formats_and_older_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = CleanStore::open(tmp.path(), 1 << 30).unwrap();
        store.put(&saved(&store, "a", 8), &meta("k", 1)).unwrap();
        let _interrupted = saved(&store, "x", 8);
    }
    // A snapshot of another format, and an older one of the same key.
    for (name, m) in [
        (
            "old-format",
            CleanMeta {
                format: CLEAN_FORMAT + 1,
                ..meta("f", 1)
            },
        ),
        ("older", meta("k", 0)),
    ] {
        let d = tmp.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("mem"), name).unwrap();
        std::fs::write(d.join(META_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
    }
    let store = CleanStore::open(tmp.path(), 1 << 30).unwrap();
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(store.get("k").unwrap().meta.saved_unix_secs, 1);
    assert!(store.get("f").is_none());
}

#[test]
fn a_discarded_snapshot_goes_but_a_newer_one_of_its_key_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let store = CleanStore::open(tmp.path(), 1 << 30).unwrap();
    store.put(&saved(&store, "a", 8), &meta("k", 1)).unwrap();
    let bad = store.get("k").unwrap();
    let dir = bad.dir.clone();
    store.discard(&bad);
    assert!(store.get("k").is_none(), "not handed out again");
    assert!(dir.exists(), "kept while a clone is made from it");
    drop(bad);
    store.put(&saved(&store, "b", 8), &meta("k", 2)).unwrap();
    assert!(!dir.exists(), "deleted once let go");

    // A clone of an old snapshot that fails does not take the newer one.
    let old = store.get("k").unwrap();
    store.put(&saved(&store, "c", 8), &meta("k", 3)).unwrap();
    store.discard(&old);
    assert_eq!(mem_of(&store.get("k").unwrap()), b'c');

    assert!(
        store.age("k").is_some_and(|a| a.as_secs() > 1000),
        "saved at 3"
    );
    store.discard_key("k");
    assert!(store.get("k").is_none());
    assert!(store.age("k").is_none());
    store.discard_key("never-stored");
}
