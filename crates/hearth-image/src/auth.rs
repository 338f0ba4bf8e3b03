//! Registry authentication: anonymous, HTTP basic, and the bearer-token flow
//! (`WWW-Authenticate: Bearer realm=…,service=…` → token service → `Authorization:
//! Bearer`). Tokens are cached per (registry, repository, credentials): one caller's
//! credentials never authorize another caller's request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{RequestBuilder, Response, StatusCode};
use sha2::{Digest, Sha256};
use tracing::debug;

use crate::registry::{error_chain, snippet, RegistryClient, Repo};
use crate::ImageError;

#[derive(Clone)]
pub(crate) enum Authz {
    Basic,
    Bearer { token: String, expires: Instant },
}

impl RegistryClient {
    fn authz_key(repo: &Repo<'_>) -> (String, String, String) {
        let who = match repo.credentials {
            None => String::new(),
            Some(c) => {
                let mut h = Sha256::new();
                h.update(c.username.as_bytes());
                h.update([0]);
                h.update(c.password.as_bytes());
                hex::encode(h.finalize())
            }
        };
        let r = repo.reference;
        (r.api_host().to_string(), r.repository.clone(), who)
    }

    pub(crate) fn authorize(&self, repo: &Repo<'_>, req: RequestBuilder) -> RequestBuilder {
        let cached = self
            .authz
            .lock()
            .unwrap()
            .get(&Self::authz_key(repo))
            .cloned();
        match (cached, repo.credentials) {
            (Some(Authz::Bearer { token, expires }), _) if expires > Instant::now() => {
                req.bearer_auth(token)
            }
            (Some(Authz::Basic), Some(c)) => req.basic_auth(&c.username, Some(&c.password)),
            _ => req,
        }
    }

    /// Sends a request built by `build`, answering one authentication challenge.
    /// Returns the response whatever its status; transport errors are `Unavailable`.
    pub(crate) async fn send(
        &self,
        repo: &Repo<'_>,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, ImageError> {
        let send = |req: RequestBuilder| async {
            req.send().await.map_err(|e| {
                let mut msg = format!("{}: {}", repo.reference.api_host(), error_chain(&e));
                if e.url().is_some_and(|u| u.scheme() == "https")
                    && (msg.contains("SSL") || msg.contains("TLS"))
                {
                    msg.push_str(
                        " (if this registry speaks plain HTTP, list it in insecure_registries)",
                    );
                }
                ImageError::unavailable(repo.shown, msg)
            })
        };
        let resp = send(self.authorize(repo, build())).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(parse_challenge);
        let authz = match challenge {
            Some((scheme, params)) if scheme.eq_ignore_ascii_case("bearer") => {
                self.fetch_token(repo, &params).await?
            }
            Some((scheme, _))
                if scheme.eq_ignore_ascii_case("basic") && repo.credentials.is_some() =>
            {
                Authz::Basic
            }
            _ => {
                return Err(denied(
                    repo,
                    "the registry requires credentials and none were given",
                ));
            }
        };
        {
            let mut cache = self.authz.lock().unwrap();
            let now = Instant::now();
            cache.retain(|_, a| !matches!(a, Authz::Bearer { expires, .. } if *expires <= now));
            cache.insert(Self::authz_key(repo), authz);
        }
        let resp = send(self.authorize(repo, build())).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(match repo.credentials {
                Some(c) => denied(
                    repo,
                    format!(
                        "the registry rejected the credentials of user {:?}",
                        c.username
                    ),
                ),
                None => denied(
                    repo,
                    "anonymous access refused (the repository may not exist, or needs credentials)",
                ),
            });
        }
        Ok(resp)
    }

    async fn fetch_token(
        &self,
        repo: &Repo<'_>,
        params: &HashMap<String, String>,
    ) -> Result<Authz, ImageError> {
        let realm = params
            .get("realm")
            .ok_or_else(|| ImageError::unavailable(repo.shown, "bearer challenge without realm"))?;
        let mut url = reqwest::Url::parse(realm).map_err(|e| {
            ImageError::unavailable(repo.shown, format!("bad token realm {realm:?}: {e}"))
        })?;
        let plain_ok = self.is_insecure(&repo.reference.registry);
        if url.scheme() != "https" && !(url.scheme() == "http" && plain_ok) {
            return Err(ImageError::unavailable(
                repo.shown,
                format!(
                    "token realm {realm:?} is not https (only insecure registries may use http)"
                ),
            ));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair(
                "scope",
                &format!("repository:{}:pull", repo.reference.repository),
            );
        }
        debug!(%url, "fetching registry token");
        let mut req = self.http.get(url.clone());
        if let Some(c) = repo.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| {
            ImageError::unavailable(
                repo.shown,
                format!("token service {realm}: {}", error_chain(&e)),
            )
        })?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let who = repo
                .credentials
                .map(|c| format!(" for user {:?}", c.username))
                .unwrap_or_default();
            return Err(denied(
                repo,
                format!("token service {realm} refused a token{who} ({status})"),
            ));
        }
        if !status.is_success() {
            return Err(ImageError::unavailable(
                repo.shown,
                format!(
                    "token service {realm} answered {status}: {}",
                    snippet(&body)
                ),
            ));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            ImageError::unavailable(repo.shown, format!("token service {realm}: bad JSON: {e}"))
        })?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ImageError::unavailable(
                    repo.shown,
                    format!("token service {realm} returned no token"),
                )
            })?;
        let ttl = t.expires_in.unwrap_or(60).max(60);
        Ok(Authz::Bearer {
            token,
            expires: Instant::now() + Duration::from_secs(ttl - 10),
        })
    }
}

pub(crate) fn denied(repo: &Repo<'_>, reason: impl Into<String>) -> ImageError {
    ImageError::PermissionDenied {
        reference: repo.shown.to_string(),
        reason: reason.into(),
    }
}

/// `Bearer realm="https://x/token",service="x",scope="repository:a:pull,push"`
/// → ("Bearer", {realm, service, scope}).
pub(crate) fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    (scheme.to_string(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/a:pull,push",error="insufficient_scope""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/a:pull,push");
        assert_eq!(p["error"], "insufficient_scope");
        let (s, p) = parse_challenge(r#"Basic realm="hearth test""#);
        assert_eq!((s.as_str(), p["realm"].as_str()), ("Basic", "hearth test"));
        let (_, p) = parse_challenge("Bearer realm=http://x/t, service=y");
        assert_eq!(
            (p["realm"].as_str(), p["service"].as_str()),
            ("http://x/t", "y")
        );
    }
}
