//! The server's assembly: storage, scheduler, API keys, TLS and the
//! listeners the gRPC services are served on.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hearth_api::auth::{Auth, AuthLayer, Capability};
use hearth_api::{Context, RequestMetricsLayer};
use hearth_fleet::{FleetConfig, SharedQueue};
use hearth_scheduler::{Scheduler, SchedulerConfig};
use hearth_storage::{BlobStore, DiskActionCache, DiskStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::cli::ServerArgs;

/// Cancels the token on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// Reloads the keys file on SIGHUP; a file that does not parse leaves the
/// keys in force and says why.
fn reload_keys_on_sighup(auth: Auth) {
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGHUP; keys will not reload");
                return;
            }
        };
        while hup.recv().await.is_some() {
            match auth.reload() {
                Ok(n) => tracing::info!(keys = n, "reloaded the API keys"),
                Err(e) => tracing::error!(error = %e, "keeping the API keys in force"),
            }
        }
    });
}

pub struct Server {
    /// The local disk store (the whole CAS, or the cache in front of S3).
    pub store: Arc<DiskStore>,
    /// The durable tier behind it, when `--cas-store` names one.
    pub slow: Option<Arc<dyn BlobStore>>,
    /// The action cache on disk, when it is there (for its gauges).
    pub ac: Option<Arc<DiskActionCache>>,
    pub listener: TcpListener,
    pub ctx: Context,
    /// The status `grpc.health.v1.Health` answers with.
    pub health: HealthReporter,
    health_service: HealthServer<HealthService>,
    /// Where the web view listens, once started.
    pub web: Option<SocketAddr>,
    tls: Option<ServerTlsConfig>,
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

fn tls_config(args: &ServerArgs) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read(cert, "--tls-cert")?,
        read(key, "--tls-key")?,
    ));
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
    }
    Ok(Some(tls))
}

pub async fn build_server(args: &ServerArgs) -> Result<Server> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let storage = crate::storage::open(
        &args.data_dir,
        args.cas_max_bytes,
        &args.cas_store,
        &args.s3,
    )?;
    let store = storage.disk.clone();
    let (ac, disk_ac) = crate::storage::open_action_cache(
        &args.data_dir,
        args.ac_max_bytes,
        &args.state,
        Duration::from_secs(args.ac_ttl_secs),
    )
    .await?;
    let scheduler = Scheduler::new(SchedulerConfig {
        queue_timeout: Duration::from_secs(args.queue_timeout_secs),
        max_attempts: args.max_attempts,
        reconnect_grace: Duration::from_secs(args.executor_grace_secs),
        executor_silence: Duration::from_secs(args.executor_silence_secs),
        abandon_unwatched: Duration::from_secs(args.abandon_unwatched_secs),
        ..Default::default()
    });
    scheduler.spawn_sweeper();
    let mut ctx = Context::new(storage.cas.clone(), ac, scheduler.clone());
    if let crate::storage::StateStore::Redis(url) = &args.state {
        let fleet = FleetConfig {
            queue_timeout: Duration::from_secs(args.queue_timeout_secs),
            max_attempts: args.max_attempts,
            abandon_unwatched: Duration::from_secs(args.abandon_unwatched_secs.max(1)),
            ..Default::default()
        };
        let queue = SharedQueue::start(url, scheduler, fleet)
            .await
            .map_err(anyhow::Error::msg)
            .context("sharing the queue through Redis")?;
        ctx.queue = Arc::new(queue);
    }
    ctx.pins = Some(store.clone());
    ctx.occupancy = Some(store.clone());
    ctx.spool = store.staging_dir().to_path_buf();
    if storage.slow.is_some() {
        ctx.limits.batch_parallelism = 32;
    }
    ctx.instances = Arc::new(args.instances.clone());
    ctx.limits.max_metadata_blob_bytes = args.max_metadata_blob_bytes;
    ctx.limits.partial_upload_idle = Duration::from_secs(args.partial_upload_idle_secs);
    ctx.limits.partial_upload_max_bytes = args.partial_upload_max_bytes;
    if let Some(file) = &args.auth_keys {
        ctx.auth = Auth::from_file(file.clone()).map_err(anyhow::Error::msg)?;
        ctx.owners = Some(
            crate::storage::open_owners(
                &args.data_dir,
                &args.state,
                Duration::from_secs(args.ac_ttl_secs),
            )
            .await?,
        );
        reload_keys_on_sighup(ctx.auth.clone());
        tracing::info!(file = %file.display(), "API keys required");
    } else if !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "serving without --auth-keys on a non-loopback address: anyone who can reach it \
             can read the cache, run actions and connect executors"
        );
    }
    let tls = tls_config(args)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    // NOT_SERVING until the caller says otherwise (storage is open now; `up`
    // also waits for its executor).
    let health = HealthReporter::new();
    let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    Ok(Server {
        ac: disk_ac,
        store,
        slow: storage.slow,
        listener,
        ctx,
        health,
        health_service,
        web: None,
        tls,
    })
}

impl Server {
    /// The URL a local client reaches this server at, and whether TLS.
    pub fn local_url(&self) -> Result<(SocketAddr, bool)> {
        let addr = self.listener.local_addr()?;
        Ok((addr, self.tls.is_some()))
    }

    /// A key for `hearth up`'s own executor, valid for this process only.
    pub fn local_executor_key(&self) -> Option<String> {
        if !self.ctx.auth.enabled() {
            return None;
        }
        let key = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.ctx
            .auth
            .add_internal_key(&key, "hearth-up", BTreeSet::from([Capability::Executor]));
        Some(key)
    }
}

/// How long in-flight calls may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Serves the services on the server's listener (with TLS when set up) and
/// on `extra` plaintext loopback listeners (the local executor's, when the
/// main one is TLS), until `shutdown`.
pub async fn serve(
    server: Server,
    extra: Vec<TcpListener>,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = server.listener.local_addr()?;
    // Tests and scripts read these lines to find the ports.
    crate::observe::announce(&format!("hearth listening on {addr}"));
    if let Some(web) = server.web {
        crate::observe::announce(&format!("hearth web view on http://{web}/"));
    }
    tracing::info!(%addr, tls = server.tls.is_some(), "serving");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server.tls.clone() {
        builder = builder.tls_config(tls).context("the TLS configuration")?;
    }
    let layer = AuthLayer::new(server.ctx.auth.clone());
    crate::observe::not_serving_at_shutdown(server.health.clone(), shutdown.clone());
    let routes =
        || hearth_api::routes(server.ctx.clone()).add_service(server.health_service.clone());
    let incoming = TcpIncoming::from(server.listener).with_nodelay(Some(true));
    let main = builder
        .layer(RequestMetricsLayer)
        .layer(layer.clone())
        .add_routes(routes())
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let mut servers = vec![tokio::spawn(main)];
    for listener in extra {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        servers.push(tokio::spawn(
            tonic::transport::Server::builder()
                .layer(RequestMetricsLayer)
                .layer(layer.clone())
                .add_routes(routes())
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
        ));
    }
    let serving = async {
        for s in servers {
            s.await
                .context("the gRPC server task")?
                .context("gRPC server")?;
        }
        Ok::<(), anyhow::Error>(())
    };
    // A graceful shutdown waits for clients to hang up; idle clients (Bazel
    // keeps its connections) may never do, so in-flight calls get a grace
    // period and then the server stops.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = serving => r,
        _ = grace => {
            tracing::info!("clients still connected after the grace period; stopping");
            Ok(())
        }
    }
}
