//! The bearer-token flow real registries use (Docker Hub, GHCR, …), against
//! `docker-registry` configured with `auth: token:` and a token service written here
//! that signs ES256 JWTs with a self-signed certificate the registry trusts.
//! Anonymous users get pull access to `public/*` only; `bob:hunter2` gets everything.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use hearth_image::{Credentials, ImageError};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVICE: &str = "hearth-test-registry";
const ISSUER: &str = "hearth-test-issuer";

fn b64url(data: &[u8]) -> String {
    openssl::base64::encode_block(data)
        .replace('+', "-")
        .replace('/', "_")
        .trim_end_matches('=')
        .to_string()
}

fn key_and_cert() -> (PKey<Private>, X509) {
    let (key, mut b) = self_signed("hearth test token signer");
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (key, b.build())
}

fn jwt(key: &PKey<Private>, cert: &X509, subject: &str, access: serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [openssl::base64::encode_block(&cert.to_der().unwrap())]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 600, "nbf": now - 60, "iat": now - 60,
        "jti": format!("{now}-{subject}"), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&header).unwrap()),
        b64url(&serde_json::to_vec(&claims).unwrap())
    );
    let mut signer = openssl::sign::Signer::new(MessageDigest::sha256(), key).unwrap();
    signer.update(signing_input.as_bytes()).unwrap();
    let sig = EcdsaSig::from_der(&signer.sign_to_vec().unwrap()).unwrap();
    let mut raw = sig.r().to_vec_padded(32).unwrap();
    raw.extend(sig.s().to_vec_padded(32).unwrap());
    format!("{signing_input}.{}", b64url(&raw))
}

/// A minimal token service: `GET /token?service=…&scope=repository:NAME:ACTIONS`.
struct TokenServer {
    url: String,
    requests: Arc<AtomicUsize>,
}

async fn token_server(key: PKey<Private>, cert: X509) -> TokenServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let (key, cert, count) = (Arc::new(key), Arc::new(cert), requests.clone());
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let (key, cert, count) = (key.clone(), cert.clone(), count.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 4096];
                    let n = conn.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                count.fetch_add(1, Ordering::SeqCst);
                let head = String::from_utf8_lossy(&buf).to_string();
                let target = head.split_whitespace().nth(1).unwrap_or("");
                let query = reqwest::Url::parse(&format!("http://x{target}")).unwrap();
                let scope = query
                    .query_pairs()
                    .find(|(k, _)| k == "scope")
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default();
                let auth = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("Authorization: Basic ")
                            .or_else(|| l.strip_prefix("authorization: Basic "))
                    })
                    .map(|b| {
                        String::from_utf8(openssl::base64::decode_block(b.trim()).unwrap()).unwrap()
                    });
                let user = match auth.as_deref() {
                    None => None,
                    Some("bob:hunter2") => Some("bob"),
                    Some(_) => {
                        let body = r#"{"details":"invalid username or password"}"#;
                        let resp = format!("HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                        let _ = conn.write_all(resp.as_bytes()).await;
                        return;
                    }
                };
                let mut access = Vec::new();
                let mut parts = scope.splitn(3, ':');
                if let (Some("repository"), Some(name), Some(actions)) =
                    (parts.next(), parts.next(), parts.next())
                {
                    if user.is_some() || name.starts_with("public/") {
                        let actions: Vec<&str> = actions
                            .split(',')
                            .filter(|a| user.is_some() || *a == "pull")
                            .collect();
                        access.push(serde_json::json!({"type": "repository", "name": name, "actions": actions}));
                    }
                }
                let token = jwt(
                    &key,
                    &cert,
                    user.unwrap_or(""),
                    serde_json::Value::Array(access),
                );
                let body = serde_json::json!({"token": token, "expires_in": 300}).to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    TokenServer { url, requests }
}

async fn push_token(server: &TokenServer, repo: &str) -> String {
    let mut url = reqwest::Url::parse(&server.url).unwrap();
    url.query_pairs_mut()
        .append_pair("service", SERVICE)
        .append_pair("scope", &format!("repository:{repo}:pull,push"));
    let resp = reqwest::Client::new()
        .get(url)
        .basic_auth("bob", Some("hunter2"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    format!("Bearer {}", v["token"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_anonymous_and_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = key_and_cert();
    std::fs::write(dir.path().join("root.crt"), cert.to_pem().unwrap()).unwrap();
    let tokens = token_server(key, cert).await;
    let auth = format!(
        "  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        tokens.url,
        dir.path().join("root.crt").display()
    );
    let reg = Registry::start(&auth);
    for repo in ["public/tool", "private/tool"] {
        let push = Pusher::new(&reg.host, Some(push_token(&tokens, repo).await));
        push.image(
            repo,
            "v1",
            config_json("amd64", &["PATH=/bin"], "", ""),
            &[LayerBuilder::default().file("who", repo.as_bytes()).gz()],
        )
        .await;
    }
    let cache = tempfile::tempdir().unwrap();
    let images = store_with(cache.path(), &[&reg.host]);

    // Anonymous token for a public repository, as for Docker Hub's library images.
    let public = format!("{}/public/tool:v1", reg.host);
    let before = tokens.requests.load(Ordering::SeqCst);
    let img = images.resolve(&public, None).await.unwrap();
    assert_eq!(debugfs(&img.path, "cat /who"), "public/tool");
    assert_eq!(
        tokens.requests.load(Ordering::SeqCst),
        before + 1,
        "one token for manifest and blobs"
    );
    images.resolve(&public, None).await.unwrap();
    assert_eq!(
        tokens.requests.load(Ordering::SeqCst),
        before + 1,
        "the token is reused"
    );

    // A private repository: the anonymous token grants nothing.
    let private = format!("{}/private/tool:v1", reg.host);
    let err = images.resolve(&private, None).await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, ImageError::PermissionDenied { .. }) && err.to_string().contains(&private),
        "{err}"
    );
    let wrong = Credentials {
        username: "bob".into(),
        password: "nope".into(),
    };
    let err = images.resolve(&private, Some(&wrong)).await.unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, ImageError::PermissionDenied { .. }) && err.to_string().contains("\"bob\""),
        "{err}"
    );
    // The error names the user, never a password (neither the one tried nor the real one).
    let shown = format!("{err} {err:?} {}", err.to_status());
    assert!(
        !shown.contains("nope") && !shown.contains("hunter2"),
        "{shown}"
    );
    let bob = Credentials {
        username: "bob".into(),
        password: "hunter2".into(),
    };
    let img = images.resolve(&private, Some(&bob)).await.unwrap();
    assert_eq!(debugfs(&img.path, "cat /who"), "private/tool");
    assert_eq!(img.config.env, vec!["PATH=/bin"]);
    // Bob's token is his alone.
    let err = images.resolve(&private, None).await.unwrap_err();
    assert!(matches!(err, ImageError::PermissionDenied { .. }), "{err}");
}
