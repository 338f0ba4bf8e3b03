//! The production path: HTTPS to a registry that is not in `insecure_registries`.
//! `docker-registry` serves TLS with a certificate for 127.0.0.1 that this test makes;
//! the client trusts it through `SSL_CERT_FILE`, which OpenSSL (native-tls) honours, as
//! it would a corporate CA. (Own test binary: the environment is per process.)

mod common;

use common::*;
use hearth_image::ImageError;
use openssl::hash::MessageDigest;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};

/// A self-signed certificate for `127.0.0.1`; returns (cert PEM, key PEM).
fn certificate() -> (Vec<u8>, Vec<u8>) {
    let (key, mut b) = self_signed("127.0.0.1");
    b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .ip("127.0.0.1")
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(san).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (
        b.build().to_pem().unwrap(),
        key.private_key_to_pem_pkcs8().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_registry_with_a_trusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    // SAFETY: set before any client exists, in this test binary's only test.
    unsafe { std::env::set_var("SSL_CERT_FILE", &cert_path) };
    let tls = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        cert_path.display(),
        key_path.display()
    );
    let reg = Registry::start_with("", &tls, dir);

    let mut push = Pusher::new(&reg.host, None);
    push.scheme = "https";
    let digest = push
        .image(
            "secure/img",
            "v1",
            config_json("amd64", &[], "", ""),
            &[small_layer("tls")],
        )
        .await;

    let cache = tempfile::tempdir().unwrap();
    let images = store_with(cache.path(), &[]);
    let img = images
        .resolve(&format!("{}/secure/img:v1", reg.host), None)
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, digest);
    assert_eq!(debugfs(&img.path, "cat /etc/version"), "tls");

    // Listed as insecure, the same registry is spoken to in plain HTTP, which it refuses.
    let plain = store_with(cache.path(), &[&reg.host]);
    let err = plain
        .resolve(&format!("{}/secure/img:v1", reg.host), None)
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, ImageError::Unavailable { .. }), "{err}");
}
