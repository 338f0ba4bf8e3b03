//! `push_busybox_image` against a real registry: the manifest and the layer blob read
//! back over HTTP, the layer's entries read with the tar crate.

use std::collections::BTreeMap;
use std::io::Read;

use hearth_testkit::{push_busybox_image, sha256, Registry, BUSYBOX, DOCKER_MANIFEST};
use tar::EntryType;

struct Item {
    kind: EntryType,
    mode: u32,
    uid: u64,
    link: Option<String>,
    data: Vec<u8>,
}

async fn get(url: &str, accept: &str) -> Vec<u8> {
    let resp = reqwest::Client::new()
        .get(url)
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {url}");
    resp.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn busybox_image_layer_has_busybox_and_sh() {
    let reg = Registry::start("");
    let digest = push_busybox_image(
        &reg.host,
        "testkit/busybox",
        "v1",
        &[
            ("/etc/hello", b"hi\n", 0o600),
            ("opt/tool/run", b"#!/bin/sh\n", 0o755),
        ],
    )
    .await;

    let base = format!("http://{}/v2/testkit/busybox", reg.host);
    let manifest = get(&format!("{base}/manifests/v1"), DOCKER_MANIFEST).await;
    assert_eq!(sha256(&manifest), digest);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);

    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = get(&format!("{base}/blobs/{config_digest}"), "*/*").await;
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!(["PATH=/bin:/usr/bin"])
    );
    assert_eq!(config["os"], "linux");

    let layer_digest = layers[0]["digest"].as_str().unwrap();
    let blob = get(&format!("{base}/blobs/{layer_digest}"), "*/*").await;
    assert_eq!(sha256(&blob), layer_digest);
    assert_eq!(layers[0]["size"], blob.len());

    let mut items = BTreeMap::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let path = path.trim_end_matches('/').to_string();
        let h = entry.header().clone();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        let item = Item {
            kind: h.entry_type(),
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            link: h.link_name().unwrap().map(|l| l.display().to_string()),
            data,
        };
        assert!(items.insert(path.clone(), item).is_none(), "{path} twice");
    }

    let busybox = &items["bin/busybox"];
    assert_eq!(busybox.kind, EntryType::Regular);
    assert_eq!(busybox.mode, 0o755);
    assert_eq!(busybox.data, std::fs::read(BUSYBOX).unwrap());

    for applet in ["sh", "ls", "cat", "mount"] {
        let link = &items[&format!("bin/{applet}")];
        assert_eq!(link.kind, EntryType::Symlink, "bin/{applet}");
        assert_eq!(link.link.as_deref(), Some("busybox"), "bin/{applet}");
    }

    let passwd = String::from_utf8(items["etc/passwd"].data.clone()).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("root:x:0:0:")),
        "{passwd}"
    );
    assert!(
        passwd
            .lines()
            .any(|l| l == "builder:x:1000:1000::/home/builder:/bin/sh"),
        "{passwd}"
    );
    assert!(items.contains_key("etc/group"));
    assert_eq!(items["tmp"].kind, EntryType::Directory);
    assert_eq!(items["tmp"].mode, 0o1777);
    assert_eq!(items["home/builder"].uid, 1000);

    assert_eq!(items["etc/hello"].data, b"hi\n");
    assert_eq!(items["etc/hello"].mode, 0o600);
    assert_eq!(items["opt/tool"].kind, EntryType::Directory);
    assert_eq!(items["opt/tool/run"].mode, 0o755);
}
