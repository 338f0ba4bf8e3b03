//! A small client for the OCI distribution API: manifest HEAD/GET and blob GET, with
//! sha256 verification and progress logging. Authentication is in [`crate::auth`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::{denied, Authz};

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::info;

use crate::manifest::ACCEPTED_MANIFEST_TYPES;
use crate::reference::is_sha256_digest;
use crate::{Credentials, ImageError, Reference};

/// One repository in one registry, as seen by one caller (with its credentials).
pub(crate) struct Repo<'a> {
    pub reference: &'a Reference,
    /// The reference as the caller wrote it, for error messages.
    pub shown: &'a str,
    pub credentials: Option<&'a Credentials>,
}

/// A fetched manifest and the sha256 digest of its bytes.
pub(crate) struct FetchedManifest {
    pub digest: String,
    pub media_type: String,
    pub body: Vec<u8>,
}

/// Shared by all callers. Tokens are cached per (registry, repository, credentials),
/// so one caller's credentials never authorize another caller's request.
pub(crate) struct RegistryClient {
    pub(crate) http: reqwest::Client,
    insecure: Vec<String>,
    pub(crate) authz: Mutex<HashMap<(String, String, String), Authz>>,
}

impl RegistryClient {
    pub fn new(insecure: Vec<String>) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("hearth-image/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("building HTTP client: {e}"))?;
        Ok(RegistryClient {
            http,
            insecure,
            authz: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn is_insecure(&self, host: &str) -> bool {
        self.insecure.iter().any(|h| h == host)
    }

    fn url(&self, repo: &Repo<'_>, tail: &str) -> String {
        let host = repo.reference.api_host();
        let scheme = if self.is_insecure(&repo.reference.registry) || self.is_insecure(host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}/v2/{}/{tail}", repo.reference.repository)
    }

    /// HEAD of the manifest: its digest from `Docker-Content-Digest`, if the registry sends it.
    pub async fn head_manifest(
        &self,
        repo: &Repo<'_>,
        target: &str,
    ) -> Result<Option<String>, ImageError> {
        let url = self.url(repo, &format!("manifests/{target}"));
        let resp = self
            .send(repo, || {
                self.http
                    .request(Method::HEAD, &url)
                    .header(ACCEPT, ACCEPTED_MANIFEST_TYPES.join(", "))
            })
            .await?;
        if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
            return Ok(None); // no HEAD here: the caller GETs
        }
        let resp = check(repo, resp, &format!("manifest {target}")).await?;
        Ok(header(resp.headers(), "docker-content-digest").filter(|d| is_sha256_digest(d)))
    }

    /// GET of a manifest by tag or digest. A digest target is verified against the body.
    pub async fn get_manifest(
        &self,
        repo: &Repo<'_>,
        target: &str,
    ) -> Result<FetchedManifest, ImageError> {
        let url = self.url(repo, &format!("manifests/{target}"));
        let resp = self
            .send(repo, || {
                self.http
                    .get(&url)
                    .header(ACCEPT, ACCEPTED_MANIFEST_TYPES.join(", "))
            })
            .await?;
        let resp = check(repo, resp, &format!("manifest {target}")).await?;
        let media_type = header(resp.headers(), CONTENT_TYPE.as_str()).unwrap_or_default();
        let body = read_limited(repo, resp, 4 << 20, "manifest").await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if target.starts_with("sha256:") && target != digest {
            return Err(ImageError::bad_image(
                repo.shown,
                format!("manifest {target} has digest {digest}: content does not match"),
            ));
        }
        Ok(FetchedManifest {
            digest,
            media_type,
            body,
        })
    }

    /// A small blob (the image config), verified.
    pub async fn get_blob_bytes(
        &self,
        repo: &Repo<'_>,
        digest: &str,
        limit: usize,
    ) -> Result<Vec<u8>, ImageError> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(repo, || self.http.get(&url)).await?;
        let resp = check(repo, resp, &format!("blob {digest}")).await?;
        let body = read_limited(repo, resp, limit, "blob").await?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if actual != digest {
            return Err(ImageError::bad_image(
                repo.shown,
                format!("blob {digest} has digest {actual}"),
            ));
        }
        Ok(body)
    }

    /// Streams a blob into `dest`, checking its size and sha256, logging progress.
    pub async fn download_blob(
        &self,
        repo: &Repo<'_>,
        digest: &str,
        size: u64,
        dest: &Path,
        label: &str,
    ) -> Result<(), ImageError> {
        let started = Instant::now();
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(repo, || self.http.get(&url)).await?;
        let mut resp = check(repo, resp, &format!("blob {digest}")).await?;
        let io = |e: std::io::Error| {
            ImageError::internal(repo.shown, format!("writing {}: {e}", dest.display()))
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut done: u64 = 0;
        let mut last_log = Instant::now();
        info!(
            image = repo.shown,
            layer = label,
            digest,
            size,
            "pulling layer"
        );
        loop {
            let chunk = resp.chunk().await.map_err(|e| {
                ImageError::unavailable(
                    repo.shown,
                    format!("reading blob {digest}: {}", error_chain(&e)),
                )
            })?;
            let Some(chunk) = chunk else { break };
            done += chunk.len() as u64;
            if done > size {
                return Err(ImageError::bad_image(
                    repo.shown,
                    format!("blob {digest} is larger than its {size} bytes"),
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                info!(
                    image = repo.shown,
                    layer = label,
                    digest,
                    done,
                    size,
                    "pulling layer: {} of {} MiB",
                    done >> 20,
                    size >> 20
                );
            }
        }
        file.flush().await.map_err(io)?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if done != size || actual != digest {
            return Err(ImageError::bad_image(
                repo.shown,
                format!("blob {digest} does not match its digest: got {done} bytes (expected {size}) with digest {actual}"),
            ));
        }
        info!(
            image = repo.shown,
            layer = label,
            digest,
            size,
            ms = started.elapsed().as_millis() as u64,
            "pulled layer"
        );
        Ok(())
    }
}

/// Maps a non-success status to the error it means.
async fn check(repo: &Repo<'_>, resp: Response, what: &str) -> Result<Response, ImageError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    let detail = registry_errors(&body);
    let reason = format!(
        "{what} in {}/{}: {status}{detail}",
        repo.reference.registry, repo.reference.repository
    );
    Err(match status {
        StatusCode::NOT_FOUND => ImageError::NotFound {
            reference: repo.shown.to_string(),
            reason,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => denied(repo, reason),
        _ => ImageError::unavailable(repo.shown, reason),
    })
}

/// `{"errors":[{"code":…,"message":…}]}` → `" (CODE: message; …)"`.
fn registry_errors(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(e) if !e.errors.is_empty() => {
            let items: Vec<String> = e
                .errors
                .iter()
                .map(|i| format!("{}: {}", i.code, i.message))
                .collect();
            format!(" ({})", items.join("; "))
        }
        _ if body.is_empty() => String::new(),
        _ => format!(" ({})", snippet(body)),
    }
}

async fn read_limited(
    repo: &Repo<'_>,
    mut resp: Response,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, ImageError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        ImageError::unavailable(repo.shown, format!("reading {what}: {}", error_chain(&e)))
    })? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Err(ImageError::bad_image(
                repo.shown,
                format!("{what} larger than {limit} bytes"),
            ));
        }
    }
    Ok(body)
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

pub(crate) fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The error and its sources, so "connection refused" is not lost behind "error sending request".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
