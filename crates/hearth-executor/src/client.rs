//! The executor's (and `hearth status`'s) connection to a server: plain
//! gRPC (`grpc://`) or TLS (`grpcs://`, rustls, with the operator's CA),
//! and the API key sent with every call. An executor may name several
//! server replicas: it uses one at a time and moves to the next when its
//! session with the current one fails ([`Servers::fail_over`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// A channel to the server that adds the API key to every call.
pub type ServerChannel = InterceptedService<Failover, ApiKey>;

/// Calls go to the current one of several channels (one per replica).
/// tonic's balanced channel would spread calls over all of them; an
/// executor wants one replica at a time, in the order given, so this small
/// service picks the current channel when it is polled ready.
#[derive(Clone)]
pub struct Failover {
    channels: Arc<[Channel]>,
    servers: Servers,
    /// The channel `call` uses, and which of `channels` it is.
    active: Channel,
    active_index: usize,
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Failover {
    type Response = <Channel as tonic::codegen::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
    >>::Response;
    type Error = <Channel as tonic::codegen::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
    >>::Error;
    type Future = <Channel as tonic::codegen::Service<
        tonic::codegen::http::Request<tonic::body::Body>,
    >>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The channel polled ready is the one `call` uses.
        let index = self.servers.index();
        if index != self.active_index {
            self.active = self.channels[index].clone();
            self.active_index = index;
        }
        tonic::codegen::Service::poll_ready(&mut self.active, cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        tonic::codegen::Service::call(&mut self.active, req)
    }
}

/// Which of the configured servers is in use.
#[derive(Clone, Debug)]
pub struct Servers {
    urls: Arc<[String]>,
    current: Arc<AtomicUsize>,
}

impl Servers {
    fn index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.urls.len()
    }

    /// The server calls go to now.
    pub fn current(&self) -> &str {
        &self.urls[self.index()]
    }

    /// Moves to the next server (the first after the last) and names it.
    pub fn fail_over(&self) -> &str {
        if self.urls.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
        self.current()
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }
}

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

/// Picks rustls's ring provider for the process, once. tonic's TLS uses
/// ring; object_store's S3 client compiles rustls's aws-lc-rs provider in
/// as well, and with two providers rustls cannot choose a default: the
/// first TLS set-up would panic. Idempotent; call before any TLS.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connects (lazily; the channel reconnects by itself).
pub fn connect(addr: &ServerAddress) -> Result<ServerChannel, String> {
    connect_any(std::slice::from_ref(addr)).map(|(channel, _)| channel)
}

/// Connects to the first of several replicas, lazily; [`Servers`] moves
/// the channel to the next.
pub fn connect_any(addrs: &[ServerAddress]) -> Result<(ServerChannel, Servers), String> {
    install_crypto_provider();
    let Some(first) = addrs.first() else {
        return Err("no server to connect to".into());
    };
    let channels: Arc<[Channel]> = addrs
        .iter()
        .map(channel)
        .collect::<Result<Vec<_>, _>>()?
        .into();
    let servers = Servers {
        urls: addrs.iter().map(|a| a.url.clone()).collect(),
        current: Arc::default(),
    };
    let key = ApiKey::new(first.api_key.as_deref())?;
    let failover = Failover {
        active: channels[0].clone(),
        active_index: 0,
        channels,
        servers: servers.clone(),
    };
    Ok((InterceptedService::new(failover, key), servers))
}

fn channel(addr: &ServerAddress) -> Result<Channel, String> {
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
    Ok(endpoint.connect_lazy())
}
