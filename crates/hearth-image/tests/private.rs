//! Private images stay private, tested as attacks on the conversion cache. A cached
//! conversion is reused only for the registry and repository it was pulled from, and
//! only once that registry has just let this request's credentials (or anonymous
//! access) read the manifest. Registry passwords never reach errors, logs or the cache
//! directory. The private registries are real `docker-registry` processes with
//! htpasswd auth; the one fake is an attacker's endpoint that lies about digests.

mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use hearth_image::{Credentials, ImageError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Alice's password on the private registries: distinctive, so a leak is found.
const PASSWORD: &str = "pw-9f1c-alice-private-image";
/// A wrong guess at it, which must not leak either.
const WRONG: &str = "pw-3b7e-wrong-guess";

fn alice() -> Credentials {
    Credentials {
        username: "alice".into(),
        password: PASSWORD.into(),
    }
}

fn wrong() -> Credentials {
    Credentials {
        username: "alice".into(),
        password: WRONG.into(),
    }
}

/// Someone with credentials of their own, none of them valid on the victim's registry.
fn mallory() -> Credentials {
    Credentials {
        username: "mallory".into(),
        password: "mallorys-own".into(),
    }
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything this test binary logs, at every level: hearth-image's events and the
/// HTTP client's `log` records (bridged by tracing-subscriber).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(w.clone()))
            .init();
        buf
    })
    .clone()
}

/// Neither password appears in `text`, as such or as a basic-auth header value.
fn assert_secret_free(what: &str, text: &str) {
    for secret in [PASSWORD, WRONG] {
        let basic = openssl::base64::encode_block(format!("alice:{secret}").as_bytes());
        assert!(
            !text.contains(secret) && !text.contains(&basic),
            "{what} holds a password: {text}"
        );
    }
}

fn assert_error_secret_free(err: &ImageError) {
    assert_secret_free(
        "an error",
        &format!("{err} / {err:?} / {}", err.to_status()),
    );
}

fn assert_logs_and_cache_secret_free(cache: &std::path::Path) {
    let text =
        String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    // The capture works: hearth-image's own events and the HTTP client's are in it.
    assert!(
        text.contains("image converted") && text.contains("hyper_util"),
        "the log capture is not working: {text}"
    );
    assert_secret_free("the logs", &text);
    for f in walk(cache) {
        if !f.ends_with(".ext4") {
            let content = std::fs::read(&f).unwrap_or_default();
            assert_secret_free(&f, &String::from_utf8_lossy(&content));
        }
    }
}

/// A real `docker-registry` where every request needs alice's password.
struct Private {
    reg: Registry,
    push: Pusher,
    _htpasswd: tempfile::TempDir,
}

fn private_registry() -> Private {
    let htpasswd = tempfile::tempdir().unwrap();
    let reg = Registry::start(&Registry::htpasswd_yaml(htpasswd.path(), "alice", PASSWORD));
    let basic = openssl::base64::encode_block(format!("alice:{PASSWORD}").as_bytes());
    let push = Pusher::new(&reg.host, Some(format!("Basic {basic}")));
    Private {
        reg,
        push,
        _htpasswd: htpasswd,
    }
}

/// Pushes `REPO:v1`, one layer with /etc/version = `content`; its manifest digest.
async fn push_image(push: &Pusher, repo: &str, content: &str) -> String {
    push.image(
        repo,
        "v1",
        config_json("amd64", &[], "", ""),
        &[small_layer(content)],
    )
    .await
}

/// Pushes a multi-arch `REPO:both` (an index of an arm64 and an amd64 image, the latter
/// with /etc/version = `content`); returns (index digest, amd64 manifest digest). The
/// same content gives the same digests in every repository and registry.
async fn push_multi(push: &Pusher, repo: &str, content: &str) -> (String, String) {
    let mut entries = Vec::new();
    for (arch, version) in [("arm64", "arm"), ("amd64", content)] {
        let digest = push
            .image_typed(
                repo,
                arch,
                config_json(arch, &[], "", ""),
                &[small_layer(version)],
                OCI_MANIFEST,
            )
            .await;
        // The registry checks the sizes in an index against the manifests.
        let mut get = reqwest::Client::new()
            .get(format!("http://{}/v2/{repo}/manifests/{digest}", push.host))
            .header("Accept", OCI_MANIFEST);
        if let Some(auth) = &push.auth {
            get = get.header("Authorization", auth);
        }
        let size = get.send().await.unwrap().bytes().await.unwrap().len();
        entries.push(
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch}}),
        );
    }
    let amd = entries[1]["digest"].as_str().unwrap().to_string();
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
    let index = push
        .manifest(
            repo,
            "both",
            OCI_INDEX,
            &serde_json::to_vec(&index).unwrap(),
        )
        .await;
    (index, amd)
}

/// The status a plain anonymous `HEAD` of a manifest gets.
async fn head_status(host: &str, repo: &str, target: &str) -> u16 {
    reqwest::Client::new()
        .head(format!("http://{host}/v2/{repo}/manifests/{target}"))
        .header(
            "Accept",
            format!("{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}"),
        )
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// An attacker's endpoint: a `HEAD` of `/v2/<any repo>/manifests/<tag>` answers 200
/// with the digest `tags` gives that tag (a digest target: the digest itself) in
/// `Docker-Content-Digest`, as any registry can claim; everything else is 404, since
/// it has none of the content behind those digests.
async fn lying_registry(tags: Vec<(String, String)>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let tags = Arc::new(tags);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tags = tags.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 4096];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let target = path
                    .strip_prefix("/v2/")
                    .and_then(|p| p.rsplit_once("/manifests/"))
                    .map(|(_, t)| t.to_string());
                let digest = target.and_then(|t| {
                    if t.starts_with("sha256:") {
                        Some(t)
                    } else {
                        tags.iter()
                            .find(|(tag, _)| *tag == t)
                            .map(|(_, d)| d.clone())
                    }
                });
                let resp = match digest {
                    Some(d) if method == "HEAD" => format!(
                        "HTTP/1.1 200 OK\r\nDocker-Content-Digest: {d}\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                    _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string(),
                };
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    host
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_image_is_never_served_from_cache_without_the_right_credentials() {
    logs();
    let p = private_registry();
    let digest = push_image(&p.push, "private/img", "secret").await;
    let cache = tempfile::tempdir().unwrap();
    let images = store(cache.path(), &p.reg);
    let reference = format!("{}/private/img:v1", p.reg.host);
    let pinned = format!("{}/private/img@{digest}", p.reg.host);

    let img = images.resolve(&reference, Some(&alice())).await.unwrap();
    assert_eq!(img.manifest_digest, digest);
    assert_eq!(debugfs(&img.path, "cat /etc/version"), "secret");
    assert_eq!(images.conversions(), 1);

    // The conversion is on disk and in memory; a restarted store reads it back.
    let restarted = store(cache.path(), &p.reg);
    for s in [&images, &restarted] {
        for r in [&reference, &pinned] {
            for creds in [None, Some(wrong()), Some(mallory())] {
                let err = s.resolve(r, creds.as_ref()).await.unwrap_err();
                eprintln!("{err}");
                assert!(
                    matches!(err, ImageError::PermissionDenied { .. }),
                    "{r} with {creds:?} must be denied, not served from the cache: {err}"
                );
                assert_eq!(err.grpc_code(), tonic::Code::PermissionDenied);
                assert_error_secret_free(&err);
            }
        }
        // Alice herself still gets the one conversion.
        let again = s.resolve(&reference, Some(&alice())).await.unwrap();
        assert_eq!(
            (again.manifest_digest, again.path),
            (digest.clone(), img.path.clone())
        );
    }
    assert_eq!(images.conversions() + restarted.conversions(), 1);
    assert_logs_and_cache_secret_free(cache.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_claiming_the_private_digest_gets_nothing() {
    logs();
    let p = private_registry();
    let digest = push_image(&p.push, "private/img", "secret").await;
    let (index, amd) = push_multi(&p.push, "private/multi", "secret-multi").await;
    let cache = tempfile::tempdir().unwrap();
    let liar = lying_registry(vec![
        ("v1".into(), digest.clone()),
        ("both".into(), index.clone()),
    ])
    .await;
    let images = store_with(cache.path(), &[&p.reg.host, &liar]);
    let img = images
        .resolve(&format!("{}/private/img:v1", p.reg.host), Some(&alice()))
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, digest);
    // Through the index, so its `.index` record (index → linux/amd64 digest) exists too.
    let multi = images
        .resolve(
            &format!("{}/private/multi:both", p.reg.host),
            Some(&alice()),
        )
        .await
        .unwrap();
    assert_eq!(multi.manifest_digest, amd);
    assert_eq!(images.conversions(), 2);

    let attacks = [
        format!("{liar}/private/img:v1"),
        format!("{liar}/private/img@{digest}"),
        format!("{liar}/elsewhere/name:v1"),
        format!("{liar}/private/multi:both"),
        format!("{liar}/private/multi@{index}"),
        format!("{liar}/private/multi@{amd}"),
    ];
    let restarted = store_with(cache.path(), &[&p.reg.host, &liar]);
    for s in [&images, &restarted] {
        for attack in &attacks {
            for creds in [None, Some(mallory())] {
                let err = match s.resolve(attack, creds.as_ref()).await {
                    Ok(img) => panic!(
                        "{attack} was served {} ({}) though that endpoint has none of it",
                        img.manifest_digest,
                        img.path.display()
                    ),
                    Err(e) => e,
                };
                eprintln!("{err}");
                // The liar was asked for the manifest itself, and has none.
                assert!(
                    matches!(err, ImageError::NotFound { .. }),
                    "{attack}: {err}"
                );
            }
        }
    }
    assert_eq!(images.conversions() + restarted.conversions(), 2);
    assert_logs_and_cache_secret_free(cache.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_digest_in_another_repository_is_pulled_from_there() {
    logs();
    let reg = Registry::start("");
    let push = Pusher::new(&reg.host, None);
    let mut digests = Vec::new();
    for repo in ["team-a/multi", "team-b/multi", "team-c/multi"] {
        digests.push(push_multi(&push, repo, "shared").await);
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    let (index, amd) = digests.swap_remove(0);
    // team-b keeps its manifests but loses its blobs: the registry links blobs to
    // repositories, so a blob GET there is now 404 while manifest HEADs still succeed.
    std::fs::remove_dir_all(
        reg.dir
            .path()
            .join("data/docker/registry/v2/repositories/team-b/multi/_layers"),
    )
    .unwrap();
    assert_eq!(head_status(&reg.host, "team-b/multi", "both").await, 200);
    assert_eq!(head_status(&reg.host, "team-b/multi", &amd).await, 200);

    let cache = tempfile::tempdir().unwrap();
    let images = store(cache.path(), &reg);
    let a = images
        .resolve(&format!("{}/team-a/multi:both", reg.host), None)
        .await
        .unwrap();
    assert_eq!(
        (a.manifest_digest.as_str(), images.conversions()),
        (amd.as_str(), 1)
    );

    // The index (through its `.index` record) and the amd64 manifest itself.
    for target in [":both".to_string(), format!("@{index}"), format!("@{amd}")] {
        let attack = format!("{}/team-b/multi{target}", reg.host);
        let err = match images.resolve(&attack, None).await {
            Ok(img) => panic!(
                "{attack} was served team-a's conversion {}",
                img.path.display()
            ),
            Err(e) => e,
        };
        eprintln!("{err}");
        assert!(
            matches!(err, ImageError::NotFound { .. }) && err.to_string().contains("blob"),
            "{attack}: {err}"
        );
    }

    // Where the content really is, it is pulled from there: a conversion of its own,
    // reporting the real digest.
    let c = images
        .resolve(&format!("{}/team-c/multi:both", reg.host), None)
        .await
        .unwrap();
    assert_eq!(c.manifest_digest, amd);
    assert_ne!(c.path, a.path);
    assert_eq!(debugfs(&c.path, "cat /etc/version"), "shared");
    assert_eq!(images.conversions(), 2);
    // Each repository's conversion is reused for that repository.
    let again = images
        .resolve(&format!("{}/team-a/multi@{amd}", reg.host), None)
        .await
        .unwrap();
    assert_eq!((again.path, images.conversions()), (a.path.clone(), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_digest_on_another_registry_is_pulled_and_verified_there() {
    logs();
    let p = private_registry();
    let digest = push_image(&p.push, "private/img", "secret").await;
    // Two anonymous registries with the same image: one serves a tampered layer.
    let tampered = Registry::start("");
    let honest = Registry::start("");
    for reg in [&tampered, &honest] {
        let d = push_image(&Pusher::new(&reg.host, None), "private/img", "secret").await;
        assert_eq!(d, digest);
    }
    let data = tampered.blob_data_path(&sha256(&small_layer("secret")));
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let cache = tempfile::tempdir().unwrap();
    let images = store_with(cache.path(), &[&p.reg.host, &tampered.host, &honest.host]);
    let private = images
        .resolve(&format!("{}/private/img:v1", p.reg.host), Some(&alice()))
        .await
        .unwrap();

    for reference in [
        format!("{}/private/img:v1", tampered.host),
        format!("{}/private/img@{digest}", tampered.host),
    ] {
        let err = match images.resolve(&reference, None).await {
            Ok(img) => panic!("{reference} was served {}", img.path.display()),
            Err(e) => e,
        };
        eprintln!("{err}");
        assert!(
            matches!(err, ImageError::BadImage { .. }),
            "{reference}: {err}"
        );
    }
    let img = images
        .resolve(&format!("{}/private/img:v1", honest.host), None)
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, digest);
    assert_ne!(img.path, private.path);
    assert_eq!(debugfs(&img.path, "cat /etc/version"), "secret");
    assert_eq!(images.conversions(), 2);
    assert_logs_and_cache_secret_free(cache.path());
}

/// Names in the cache directory but its work area.
fn cache_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "tmp")
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_entries_of_older_versions_are_not_reused() {
    logs();
    let p = private_registry();
    let digest = push_image(&p.push, "private/img", "secret").await;
    let cache = tempfile::tempdir().unwrap();
    let images = store(cache.path(), &p.reg);
    let reference = format!("{}/private/img:v1", p.reg.host);
    let img = images.resolve(&reference, Some(&alice())).await.unwrap();
    let current = img.path.clone();
    // What an older version left: `<digest hex>.ext4` and `.json`, with no source.
    let hex = &digest[7..];
    std::fs::copy(&img.path, cache.path().join(format!("{hex}.ext4"))).unwrap();
    let record = serde_json::json!({"manifest_digest": digest, "reference": "x/y:1",
        "config": {"env": [], "working_dir": "", "user": "", "entrypoint": [], "cmd": []}});
    std::fs::write(cache.path().join(format!("{hex}.json")), record.to_string()).unwrap();
    std::fs::write(cache.path().join(format!("{hex}.index")), &digest).unwrap();
    drop((img, images));

    let liar = lying_registry(vec![("v1".into(), digest.clone())]).await;
    let restarted = store_with(cache.path(), &[&p.reg.host, &liar]);
    let names = cache_files(cache.path());
    assert!(
        !names.iter().any(|n| n.starts_with(&format!("{hex}."))),
        "old-format entries are removed on open: {names:?}"
    );
    let err = restarted
        .resolve(&format!("{liar}/x/y:v1"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    // The current entry stays, and is reused for its own source.
    let again = restarted.resolve(&reference, Some(&alice())).await.unwrap();
    assert_eq!((again.path, restarted.conversions()), (current, 0));
    assert_logs_and_cache_secret_free(cache.path());
}
