//! A push client for tests: plain HTTP (or HTTPS), monolithic blob uploads, manifests.

use crate::{sha256, DOCKER_MANIFEST, OCI_MANIFEST};

/// Pushes with plain HTTP, as `docker push` would: monolithic blob uploads, then the
/// manifest. `auth` is a full `Authorization` header value, if the registry needs one.
pub struct Pusher {
    pub host: String,
    pub scheme: &'static str,
    pub auth: Option<String>,
    http: reqwest::Client,
}

impl Pusher {
    pub fn new(host: &str, auth: Option<String>) -> Pusher {
        Pusher {
            host: host.to_string(),
            scheme: "http",
            auth,
            http: reqwest::Client::new(),
        }
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.auth {
            Some(a) => r.header("Authorization", a),
            None => r,
        }
    }

    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let url = format!("{}://{}/v2/{repo}/blobs/uploads/", self.scheme, self.host);
        let resp = self.req(reqwest::Method::POST, &url).send().await.unwrap();
        assert_eq!(
            resp.status(),
            202,
            "starting upload: {}",
            resp.text().await.unwrap()
        );
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{}://{}{location}", self.scheme, self.host)
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let resp = self
            .req(
                reqwest::Method::PUT,
                &format!("{location}{sep}digest={digest}"),
            )
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            201,
            "finishing upload: {}",
            resp.text().await.unwrap()
        );
        digest
    }

    pub async fn manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let url = format!("{}://{}/v2/{repo}/manifests/{tag}", self.scheme, self.host);
        let resp = self
            .req(reqwest::Method::PUT, &url)
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            201,
            "pushing manifest: {}",
            resp.text().await.unwrap()
        );
        sha256(body)
    }

    /// Pushes config + gzip layers + a Docker v2 schema 2 manifest; returns its digest.
    pub async fn image(
        &self,
        repo: &str,
        tag: &str,
        config: serde_json::Value,
        layers: &[Vec<u8>],
    ) -> String {
        self.image_typed(repo, tag, config, layers, DOCKER_MANIFEST)
            .await
    }

    pub async fn image_typed(
        &self,
        repo: &str,
        tag: &str,
        config: serde_json::Value,
        layers: &[Vec<u8>],
        media_type: &str,
    ) -> String {
        let layer_type = if media_type == OCI_MANIFEST {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        };
        let typed: Vec<(Vec<u8>, &str)> = layers.iter().map(|l| (l.clone(), layer_type)).collect();
        self.image_layers(repo, tag, config, &typed, media_type)
            .await
    }

    /// Any layer media types; the config type follows the manifest's (OCI or Docker).
    pub async fn image_layers(
        &self,
        repo: &str,
        tag: &str,
        config: serde_json::Value,
        layers: &[(Vec<u8>, &str)],
        media_type: &str,
    ) -> String {
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.blob(repo, &config).await;
        let config_type = if media_type == OCI_MANIFEST {
            "application/vnd.oci.image.config.v1+json"
        } else {
            "application/vnd.docker.container.image.v1+json"
        };
        let mut descs = Vec::new();
        for (l, layer_type) in layers {
            let d = self.blob(repo, l).await;
            descs.push(serde_json::json!({"mediaType": layer_type, "digest": d, "size": l.len()}));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": config.len()},
            "layers": descs,
        });
        self.manifest(
            repo,
            tag,
            media_type,
            &serde_json::to_vec(&manifest).unwrap(),
        )
        .await
    }
}
