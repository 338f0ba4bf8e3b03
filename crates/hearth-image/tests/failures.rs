//! How `ImageStore::resolve` fails: every error names the reference, its cause, and
//! maps to the right gRPC code; nothing is left behind.

mod common;

use common::*;
use hearth_image::{Credentials, ImageError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_repositories_and_tags_are_not_found() {
    let reg = Registry::start("");
    let cache = tempfile::tempdir().unwrap();
    Pusher::new(&reg.host, None)
        .image(
            "exists",
            "v1",
            config_json("amd64", &[], "", ""),
            &[small_layer("x")],
        )
        .await;
    let images = store(cache.path(), &reg);
    for reference in [
        format!("{}/exists:no-such-tag", reg.host),
        format!("{}/no/such/repo:v1", reg.host),
        format!("{}/exists@sha256:{}", reg.host, "0".repeat(64)),
    ] {
        let err = images.resolve(&reference, None).await.unwrap_err();
        eprintln!("{err}");
        assert!(
            matches!(err, ImageError::NotFound { .. }),
            "{reference}: {err}"
        );
        assert_eq!(err.grpc_code(), tonic::Code::NotFound);
        assert!(err.to_string().contains(&reference), "{err}");
    }
}

#[tokio::test]
async fn malformed_references_are_invalid_arguments() {
    let cache = tempfile::tempdir().unwrap();
    let images = store_with(cache.path(), &[]);
    for reference in ["", "Bad/Upper", "repo@sha256:1234", "a:b:c", "host:port/x"] {
        let err = images.resolve(reference, None).await.unwrap_err();
        eprintln!("{err}");
        assert!(
            matches!(err, ImageError::InvalidReference { .. }),
            "{reference:?}: {err}"
        );
        assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains(&format!("{reference:?}")), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry_needs_the_right_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(&Registry::htpasswd_yaml(dir.path(), "alice", "s3cret"));
    let basic = format!("Basic {}", openssl::base64::encode_block(b"alice:s3cret"));
    Pusher::new(&reg.host, Some(basic))
        .image(
            "private/img",
            "v1",
            config_json("amd64", &[], "", ""),
            &[small_layer("p")],
        )
        .await;
    let cache = tempfile::tempdir().unwrap();
    let images = store(cache.path(), &reg);
    let reference = format!("{}/private/img:v1", reg.host);

    let err = images.resolve(&reference, None).await.unwrap_err();

    eprintln!("{err}");
    assert!(matches!(err, ImageError::PermissionDenied { .. }), "{err}");
    assert!(
        err.to_string().contains(&reference) && err.to_string().contains("credentials"),
        "{err}"
    );
    assert_eq!(err.grpc_code(), tonic::Code::PermissionDenied);

    let good = Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    };
    let img = images.resolve(&reference, Some(&good)).await.unwrap();
    assert_eq!(debugfs(&img.path, "cat /etc/version"), "p");

    // Neither a wrong password nor no credentials ride on alice's earlier success.
    let wrong = Credentials {
        username: "alice".into(),
        password: "guess".into(),
    };
    let err = images.resolve(&reference, Some(&wrong)).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, ImageError::PermissionDenied { .. }), "{err}");
    assert!(err.to_string().contains("alice"), "{err}");
    let err = images.resolve(&reference, None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, ImageError::PermissionDenied { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_slip_layers_are_rejected_and_write_nothing_outside() {
    let reg = Registry::start("");
    let base = tempfile::tempdir().unwrap();
    let cache = base.path().join("cache");
    let evil = LayerBuilder::default()
        .file("etc/ok", b"ok")
        .file("../escape", b"pwned")
        .gz();
    Pusher::new(&reg.host, None)
        .image("evil", "v1", config_json("amd64", &[], "", ""), &[evil])
        .await;
    let images = store(&cache, &reg);
    let reference = format!("{}/evil:v1", reg.host);
    let err = images.resolve(&reference, None).await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, ImageError::BadImage { .. }), "{err}");
    assert_eq!(err.grpc_code(), tonic::Code::FailedPrecondition);
    assert!(
        err.to_string().contains("..") && err.to_string().contains(&reference),
        "{err}"
    );
    let mut found = settled_files(&cache.join("tmp"));
    found.extend(
        walk(base.path())
            .into_iter()
            .filter(|p| !p.contains("/cache/tmp/")),
    );
    assert!(found.is_empty(), "files left behind: {found:?}");
    assert!(!base.path().join("escape").exists() && !cache.join("escape").exists());
    assert_eq!(images.conversions(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_that_do_not_match_their_digest_are_refused() {
    let reg = Registry::start("");
    let layer = small_layer("genuine");
    let push = Pusher::new(&reg.host, None);
    push.image(
        "tampered",
        "v1",
        config_json("amd64", &[], "", ""),
        std::slice::from_ref(&layer),
    )
    .await;
    let data = reg.blob_data_path(&sha256(&layer));
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let err = store(cache.path(), &reg)
        .resolve(&format!("{}/tampered:v1", reg.host), None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, ImageError::BadImage { .. }), "{err}");
    assert!(err.to_string().contains(&sha256(&layer)), "{err}");
    assert!(!walk(cache.path()).iter().any(|p| p.ends_with(".ext4")));
}

#[tokio::test]
async fn unreachable_registries_are_unavailable() {
    let cache = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there
    let host = format!("127.0.0.1:{port}");
    let images = store_with(cache.path(), &[&host]);
    let err = images
        .resolve(&format!("{host}/x:1"), None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, ImageError::Unavailable { .. }), "{err}");
    assert_eq!(err.grpc_code(), tonic::Code::Unavailable);
    assert!(err.to_string().contains(&host), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_for_insecure_registries() {
    let reg = Registry::start("");
    Pusher::new(&reg.host, None)
        .image(
            "x",
            "1",
            config_json("amd64", &[], "", ""),
            &[small_layer("x")],
        )
        .await;
    let cache = tempfile::tempdir().unwrap();
    let images = store_with(cache.path(), &[]);
    let err = images
        .resolve(&format!("{}/x:1", reg.host), None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, ImageError::Unavailable { .. }),
        "HTTPS to a plain-HTTP registry must fail: {err}"
    );
}
