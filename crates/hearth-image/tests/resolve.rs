//! `ImageStore::resolve` against a real local registry (Debian's `docker-registry`),
//! checking the resulting ext4 images with `debugfs`.

mod common;

use std::sync::Arc;

use common::*;
use hearth_image::ImageError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_layer_image_with_whiteouts_links_and_owners() {
    let reg = Registry::start("");
    let cache = tempfile::tempdir().unwrap();
    let lower = LayerBuilder::default()
        .dir("etc/")
        .file("etc/hostname", b"lower")
        .file("etc/remove-me", b"x")
        .dir("opaque/")
        .file("opaque/old", b"old")
        .dir("opaque/old-sub/")
        .file("opaque/old-sub/deep", b"deep")
        .dir("bin/")
        .file_mode("bin/tool", b"#!/bin/sh\necho tool\n", 0o755, 0)
        .dir("home/")
        .file_mode("home/secret", b"s", 0o640, 1000)
        .gz();
    let upper = LayerBuilder::default()
        .file("etc/.wh.remove-me", b"")
        .file("opaque/.wh..wh..opq", b"")
        .file("opaque/new", b"new")
        .file("etc/hostname", b"upper")
        .file_xattr("etc/tagged", b"t", "user.hearth", "yes")
        .symlink("bin/sh", "tool")
        .hardlink("bin/tool-hard", "bin/tool")
        .gz();
    let config = config_json(
        "amd64",
        &["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
        "/work",
        "1000:1000",
    );
    let digest = Pusher::new(&reg.host, None)
        .image("library/layered", "v1", config, &[lower, upper])
        .await;

    let images = store(cache.path(), &reg);
    let reference = format!("{}/library/layered:v1", reg.host);
    let img = images.resolve(&reference, None).await.unwrap();
    assert_eq!(img.manifest_digest, digest);
    // `<digest hex>-<source id>.ext4`: cached per registry and repository.
    let name = img.path.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(img.path.parent(), Some(cache.path()));
    assert!(
        name.starts_with(&format!("{}-", &digest[7..])) && name.ends_with(".ext4"),
        "{name}"
    );
    assert_eq!(img.size_bytes, std::fs::metadata(&img.path).unwrap().len());
    assert!(img.size_bytes >= 64 << 20, "{}", img.size_bytes);
    assert_eq!(
        img.config.env,
        vec!["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]
    );
    assert_eq!(
        (img.config.working_dir.as_str(), img.config.user.as_str()),
        ("/work", "1000:1000")
    );
    assert_eq!(img.config.cmd, vec!["/bin/sh"]);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.path.with_extension("json")).unwrap()).unwrap();
    assert_eq!(
        record["config"]["env"][0],
        "PATH=/usr/local/bin:/usr/bin:/bin"
    );
    assert_eq!(
        (&record["registry"], &record["repository"]),
        (&reg.host.clone().into(), &"library/layered".into())
    );

    // Contents, whiteouts, opaque directory.
    assert_eq!(debugfs(&img.path, "cat /etc/hostname"), "upper");
    assert_eq!(ls(&img.path, "/etc"), vec!["hostname", "tagged"]);
    let xattrs = debugfs(&img.path, "ea_list /etc/tagged");
    assert!(
        xattrs.contains("user.hearth") && xattrs.contains("yes"),
        "{xattrs}"
    );
    assert_eq!(ls(&img.path, "/opaque"), vec!["new"]);
    assert_eq!(
        ls(&img.path, "/"),
        vec!["bin", "etc", "home", "lost+found", "opaque"]
    );
    // Symlink, hardlink, modes and owners.
    let sh = stat(&img.path, "/bin/sh");
    assert!(
        sh.contains("Type: symlink") && sh.contains("Fast link dest: \"tool\""),
        "{sh}"
    );
    let (a, b) = (
        stat(&img.path, "/bin/tool"),
        stat(&img.path, "/bin/tool-hard"),
    );
    let inode = |s: &str| s.split_whitespace().nth(1).unwrap().to_string(); // "Inode: N ..."
    assert_eq!(inode(&a), inode(&b));
    assert!(a.contains("Links: 2") && a.contains("Mode:  0755"), "{a}");
    let secret = stat(&img.path, "/home/secret");
    assert!(
        secret.contains("User:  1000")
            && secret.contains("Group:  1000")
            && secret.contains("Mode:  0640"),
        "{secret}"
    );
    // The staging tree is gone, and the file system is clean.
    let leftovers = settled_files(&cache.path().join("tmp"));
    assert!(leftovers.is_empty(), "left in tmp: {leftovers:?}");
    e2fsck_clean(&img.path);
}

fn e2fsck_clean(image: &std::path::Path) {
    let tool = ["/usr/sbin/e2fsck", "/sbin/e2fsck"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("e2fsck");
    let out = std::process::Command::new(tool)
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_and_uncompressed_layers() {
    let reg = Registry::start("");
    let layers = [
        (
            LayerBuilder::default()
                .file("a", b"zstd layer")
                .file("b", b"lower b")
                .zstd(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            LayerBuilder::default()
                .file(".wh.b", b"")
                .file("c", b"plain tar")
                .tar(),
            "application/vnd.oci.image.layer.v1.tar",
        ),
        (
            LayerBuilder::default().file("d", b"gzip").gz(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
    ];
    let digest = Pusher::new(&reg.host, None)
        .image_layers(
            "mixed",
            "v1",
            config_json("amd64", &[], "", ""),
            &layers,
            OCI_MANIFEST,
        )
        .await;
    let cache = tempfile::tempdir().unwrap();
    let img = store(cache.path(), &reg)
        .resolve(&format!("{}/mixed:v1", reg.host), None)
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, digest);
    assert_eq!(ls(&img.path, "/"), vec!["a", "c", "d", "lost+found"]);
    assert_eq!(debugfs(&img.path, "cat /a"), "zstd layer");
    assert_eq!(debugfs(&img.path, "cat /c"), "plain tar");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_by_digest_but_tags_are_resolved_every_time() {
    let reg = Registry::start("");
    let cache = tempfile::tempdir().unwrap();
    let push = Pusher::new(&reg.host, None);
    let d1 = push
        .image(
            "app",
            "latest",
            config_json("amd64", &[], "", ""),
            &[small_layer("one")],
        )
        .await;
    let images = store(cache.path(), &reg);
    let reference = format!("{}/app", reg.host); // :latest implied
    let first = images.resolve(&reference, None).await.unwrap();
    let mtime = std::fs::metadata(&first.path).unwrap().modified().unwrap();
    assert_eq!(images.conversions(), 1);

    let again = images.resolve(&reference, None).await.unwrap();
    let by_digest = images
        .resolve(&format!("{}/app@{d1}", reg.host), None)
        .await
        .unwrap();
    assert_eq!((again.clone(), by_digest), (first.clone(), first.clone()));
    assert_eq!(images.conversions(), 1);
    assert_eq!(
        std::fs::metadata(&first.path).unwrap().modified().unwrap(),
        mtime
    );
    // Another store on the same cache directory (an executor restart) converts nothing.
    let restarted = store(cache.path(), &reg);
    assert_eq!(restarted.resolve(&reference, None).await.unwrap(), first);
    assert_eq!(restarted.conversions(), 0);

    // The tag moves: the next resolve notices and converts the new digest.
    let d2 = push
        .image(
            "app",
            "latest",
            config_json("amd64", &[], "", ""),
            &[small_layer("two")],
        )
        .await;
    assert_ne!(d1, d2);
    let moved = images.resolve(&reference, None).await.unwrap();
    assert_eq!(moved.manifest_digest, d2);
    assert_eq!(debugfs(&moved.path, "cat /etc/version"), "two");
    assert_eq!(images.conversions(), 2);
    assert_eq!(debugfs(&first.path, "cat /etc/version"), "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resolves_convert_once() {
    let reg = Registry::start("");
    let cache = tempfile::tempdir().unwrap();
    let big = LayerBuilder::default()
        .file("blob", &vec![7u8; 8 << 20])
        .gz();
    let digest = Pusher::new(&reg.host, None)
        .image_typed(
            "oci/img",
            "1",
            config_json("amd64", &[], "", ""),
            &[big, small_layer("c")],
            OCI_MANIFEST,
        )
        .await;
    let images = Arc::new(store(cache.path(), &reg));
    let reference = format!("{}/oci/img:1", reg.host);
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (images, reference) = (images.clone(), reference.clone());
            tokio::spawn(async move { images.resolve(&reference, None).await })
        })
        .collect();
    for t in tasks {
        let img = t.await.unwrap().unwrap();
        assert_eq!(img.manifest_digest, digest);
    }
    assert_eq!(images.conversions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_indexes_resolve_to_linux_amd64() {
    let reg = Registry::start("");
    let push = Pusher::new(&reg.host, None);
    let arm = push
        .image_typed(
            "multi",
            "arm64",
            config_json("arm64", &[], "", ""),
            &[small_layer("arm64")],
            OCI_MANIFEST,
        )
        .await;
    let amd = push
        .image_typed(
            "multi",
            "amd64",
            config_json("amd64", &[], "", ""),
            &[small_layer("amd64")],
            OCI_MANIFEST,
        )
        .await;
    let entry = |d: &str, arch: &str| serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": 0, "platform": {"os": "linux", "architecture": arch}});
    // Sizes must be right for the registry to accept the index.
    let size = |tag: &str| {
        let host = reg.host.clone();
        let tag = tag.to_string();
        async move {
            reqwest::Client::new()
                .get(format!("http://{host}/v2/multi/manifests/{tag}"))
                .header("Accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .len()
        }
    };
    let (arm_size, amd_size) = (size("arm64").await, size("amd64").await);
    let mut entries = vec![entry(&arm, "arm64"), entry(&amd, "amd64")];
    entries[0]["size"] = arm_size.into();
    entries[1]["size"] = amd_size.into();
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    push.manifest(
        "multi",
        "both",
        OCI_INDEX,
        &serde_json::to_vec(&index).unwrap(),
    )
    .await;
    let only_arm = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entries[0].clone()]});
    push.manifest(
        "multi",
        "arm-only",
        OCI_INDEX,
        &serde_json::to_vec(&only_arm).unwrap(),
    )
    .await;

    let cache = tempfile::tempdir().unwrap();
    let images = store(cache.path(), &reg);
    let img = images
        .resolve(&format!("{}/multi:both", reg.host), None)
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, amd);
    assert_eq!(debugfs(&img.path, "cat /etc/version"), "amd64");
    let again = images
        .resolve(&format!("{}/multi:both", reg.host), None)
        .await
        .unwrap();
    assert_eq!((again, images.conversions()), (img, 1));

    let err = images
        .resolve(&format!("{}/multi:arm-only", reg.host), None)
        .await
        .unwrap_err();

    eprintln!("{err}");
    assert!(
        matches!(err, ImageError::BadImage { .. }) && err.to_string().contains("linux/amd64"),
        "{err}"
    );
    // A single-arch image for another architecture is refused too.
    let err = images
        .resolve(&format!("{}/multi:arm64", reg.host), None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, ImageError::BadImage { .. }) && err.to_string().contains("arm64"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_bounded_evicting_least_recently_used_images_not_in_use() {
    let reg = Registry::start("");
    let push = Pusher::new(&reg.host, None);
    for name in ["a", "b", "c"] {
        push.image(
            &format!("lru/{name}"),
            "1",
            config_json("amd64", &[], "", ""),
            &[small_layer(name)],
        )
        .await;
    }
    let reference = |name: &str| format!("{}/lru/{name}:1", reg.host);
    // One image's size on disk, measured with an unbounded store.
    let probe = tempfile::tempdir().unwrap();
    let one = store(probe.path(), &reg);
    drop(one.resolve(&reference("a"), None).await.unwrap());
    let size = one.cache_bytes();
    assert!(size > 0);
    // Room for two images, not three.
    let bound = size * 5 / 2;
    let cache = tempfile::tempdir().unwrap();
    let images = store_bounded(cache.path(), &[&reg.host], bound);
    let exists = |path: &std::path::Path| (path.exists(), path.with_extension("json").exists());
    let a = images.resolve(&reference("a"), None).await.unwrap();
    let b = images.resolve(&reference("b"), None).await.unwrap();
    // a is used again after b was made: b is now the least recently used.
    drop(images.resolve(&reference("a"), None).await.unwrap());
    // (Paths only: a DiskImage, or a clone of one, holds the image.)
    let (a_path, b_path) = (a.path.clone(), b.path.clone());
    drop((a, b));
    let c = images.resolve(&reference("c"), None).await.unwrap();
    assert_eq!(images.conversions(), 3);
    assert_eq!(exists(&b_path), (false, false), "b was evicted");
    assert_eq!(exists(&a_path), (true, true));
    assert!(a_path.exists() && c.path.exists());
    assert!(images.cache_bytes() <= bound);
    drop(c);

    // An image in use is never evicted, even when least recently used.
    let a = images.resolve(&reference("a"), None).await.unwrap();
    let c = images.resolve(&reference("c"), None).await.unwrap();
    let c_path = c.path.clone();
    drop(c);
    // a is held and the least recently used: c goes instead.
    let b = images.resolve(&reference("b"), None).await.unwrap();
    assert_eq!(images.conversions(), 4, "b was converted again");
    assert!(a.path.exists(), "the image in use stays");
    assert!(!c_path.exists(), "c was evicted");
    assert!(b.path.exists());
    assert_eq!(debugfs(&b.path, "cat /etc/version"), "b");

    // With everything held the cache goes over its bound rather than delete
    // an image in use.
    let c = images.resolve(&reference("c"), None).await.unwrap();
    assert!(a.path.exists() && b.path.exists() && c.path.exists());
    assert!(images.cache_bytes() > bound);
    drop((a, b, c));
    // Released, the one over the bound goes (in the background).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while images.cache_bytes() > bound {
        assert!(std::time::Instant::now() < deadline, "never evicted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ext4s = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
            .count()
    };
    assert_eq!(ext4s(cache.path()), 2);
    drop(images);

    // A restart with a smaller bound evicts down to it, from what is on disk.
    let restarted = store_bounded(cache.path(), &[&reg.host], size * 3 / 2);
    assert!(restarted.cache_bytes() <= size * 3 / 2);
    assert_eq!(ext4s(cache.path()), 1);
}
