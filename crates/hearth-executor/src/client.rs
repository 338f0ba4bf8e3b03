//! The executor's (and `hearth status`'s) connection to a server: plain
//! gRPC (`grpc://`) or TLS (`grpcs://`, rustls, with the operator's CA),
//! and the API key sent with every call.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// A channel to the server that adds the API key to every call.
pub type ServerChannel = InterceptedService<Channel, ApiKey>;

/// Adds `x-hearth-api-key` to each call (nothing without a key).
#[derive(Clone, Default)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl ApiKey {
    pub fn new(key: Option<&str>) -> Result<ApiKey, String> {
        key.map(|k| {
            MetadataValue::try_from(k.trim())
                .map_err(|_| "the API key holds characters a header cannot carry".to_string())
        })
        .transpose()
        .map(ApiKey)
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            request
                .metadata_mut()
                .insert("x-hearth-api-key", key.clone());
        }
        Ok(request)
    }
}

/// How to reach the server.
#[derive(Debug, Clone, Default)]
pub struct ServerAddress {
    /// `grpc://HOST:PORT` or `grpcs://HOST:PORT` (`http://`, `https://` too).
    pub url: String,
    /// PEM CA certificate(s) that sign the server's certificate (grpcs; the
    /// system's roots when absent).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for a server that requires them.
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
    /// The API key (the contents of --api-key-file).
    pub api_key: Option<String>,
}

/// The `http://`/`https://` form tonic wants, and whether it is TLS.
pub fn url_for_tonic(s: &str) -> Result<(String, bool), String> {
    for (scheme, tls) in [
        ("grpc://", false),
        ("http://", false),
        ("grpcs://", true),
        ("https://", true),
    ] {
        if let Some(rest) = s.strip_prefix(scheme) {
            let base = if tls { "https" } else { "http" };
            return Ok((format!("{base}://{rest}"), tls));
        }
    }
    if s.contains("://") {
        return Err(format!(
            "{s}: expected grpc://HOST:PORT or grpcs://HOST:PORT"
        ));
    }
    Ok((format!("http://{s}"), false))
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {what} {}: {e}", path.display()))
}

/// Connects (lazily; the channel reconnects by itself).
pub fn connect(addr: &ServerAddress) -> Result<ServerChannel, String> {
    let (url, tls) = url_for_tonic(&addr.url)?;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| format!("{}: {e}", addr.url))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    if tls {
        let mut config = ClientTlsConfig::new();
        config = match &addr.tls_ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "--tls-ca")?)),
            None => config.with_native_roots(),
        };
        match (&addr.tls_client_cert, &addr.tls_client_key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read(cert, "--tls-client-cert")?,
                    read(key, "--tls-client-key")?,
                ));
            }
            (None, None) => {}
            _ => return Err("--tls-client-cert and --tls-client-key go together".into()),
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS to {}: {e}", addr.url))?;
    } else if addr.tls_ca.is_some() {
        return Err(format!("--tls-ca given, but {} is not grpcs://", addr.url));
    }
    let key = ApiKey::new(addr.api_key.as_deref())?;
    Ok(InterceptedService::new(endpoint.connect_lazy(), key))
}
