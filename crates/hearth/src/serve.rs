//! Assembling the pieces: stores, scheduler and services for the server; a
//! local cache, runners and a session for the executor; both for `up`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hearth_api::Context;
use hearth_executor::{
    session, Executor, ExecutorConfig, GrpcStore, HostRunner, LocalCas, Runner, Sandbox,
};
use hearth_scheduler::{Scheduler, SchedulerConfig};
use hearth_storage::{DiskActionCache, DiskStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::cli::{server_url, ExecutorArgs, ExecutorOptions, ServerArgs, UpArgs};

/// Cancels the token on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
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

struct Server {
    store: Arc<DiskStore>,
    listener: TcpListener,
    ctx: Context,
}

async fn build_server(args: &ServerArgs) -> Result<Server> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let store = Arc::new(
        DiskStore::open(&args.data_dir, args.cas_max_bytes)
            .with_context(|| format!("opening the CAS in {}", args.data_dir.display()))?,
    );
    let ac = Arc::new(
        DiskActionCache::open(&args.data_dir, args.ac_max_bytes)
            .context("opening the action cache")?,
    );
    let scheduler = Scheduler::new(SchedulerConfig {
        queue_timeout: Duration::from_secs(args.queue_timeout_secs),
        max_attempts: args.max_attempts,
        ..Default::default()
    });
    scheduler.spawn_sweeper();
    let mut ctx = Context::new(store.clone(), ac, scheduler);
    ctx.instances = Arc::new(args.instances.clone());
    ctx.limits.max_metadata_blob_bytes = args.max_metadata_blob_bytes;
    ctx.limits.partial_upload_idle = Duration::from_secs(args.partial_upload_idle_secs);
    ctx.limits.partial_upload_max_bytes = args.partial_upload_max_bytes;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    Ok(Server {
        store,
        listener,
        ctx,
    })
}

async fn serve(server: Server, shutdown: CancellationToken) -> Result<()> {
    let addr = server.listener.local_addr()?;
    // Tests and scripts read this line to find the port.
    println!("hearth listening on {addr}");
    tracing::info!(%addr, "serving");
    let incoming = TcpIncoming::from(server.listener).with_nodelay(Some(true));
    let serving = tonic::transport::Server::builder()
        .add_routes(hearth_api::routes(server.ctx))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    // A graceful shutdown waits for clients to hang up; idle clients (Bazel
    // keeps its connections) may never do, so in-flight calls get a grace
    // period and then the server stops.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = serving => r.context("gRPC server"),
        _ = grace => {
            tracing::info!("clients still connected after the grace period; stopping");
            Ok(())
        }
    }
}

/// How long in-flight calls may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The host sandbox as the flags ask for it; an error if it is asked for
/// and cannot work here (never a silent fallback to running unconfined).
async fn host_sandbox(opts: &ExecutorOptions) -> Result<Option<Sandbox>> {
    if opts.host_sandbox == "off" {
        tracing::warn!(
            "--host-sandbox off: host actions run unconfined as this process's user and can \
             change the store; use it only for trusted builds"
        );
        return Ok(None);
    }
    let binary = hearth_executor::find_static_binary("hearth-sandbox").ok_or_else(|| {
        anyhow::anyhow!(
            "the host sandbox: no static hearth-sandbox near {} (scripts/install.sh builds it), \
             or pass --host-sandbox off",
            std::env::current_exe().unwrap_or_default().display()
        )
    })?;
    let sandbox = Sandbox::for_user(&opts.run_as, opts.sandbox_visible.clone(), binary)
        .map_err(|e| anyhow::anyhow!("the host sandbox: {e}"))?;
    sandbox
        .check()
        .await
        .map_err(|e| anyhow::anyhow!("the host sandbox does not work on this host: {e}"))?;
    Ok(Some(sandbox))
}

fn executor_config(
    opts: &ExecutorOptions,
    work_dir: std::path::PathBuf,
    sandbox: Option<&Sandbox>,
) -> ExecutorConfig {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "executor".into());
    let id = opts.executor_id.clone().unwrap_or_else(|| {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{}-{}", host.trim(), &suffix[..8])
    });
    ExecutorConfig {
        id,
        work_dir,
        default_timeout: Duration::from_secs(opts.default_timeout_secs),
        max_timeout: Duration::from_secs(opts.max_timeout_secs),
        action_owner: sandbox.map(|s| (s.uid, s.gid)),
    }
}

fn session_config(
    opts: &ExecutorOptions,
    server: String,
    vm_unavailable: String,
) -> session::SessionConfig {
    let capacity = opts.capacity.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let mut properties = opts.properties.clone();
    for (name, value) in [
        ("OSFamily", std::env::consts::OS),
        ("Arch", std::env::consts::ARCH),
    ] {
        if !properties.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
            properties.push((name.to_string(), value.to_string()));
        }
    }
    session::SessionConfig {
        server,
        properties,
        capacity,
        description: format!(
            "hearth {} on {}",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS
        ),
        vm_unavailable,
    }
}

/// The executor's runners, and why microVMs are not among them (empty if
/// they are).
async fn runners(
    opts: &ExecutorOptions,
    work_dir: &std::path::Path,
    sandbox: Option<Sandbox>,
) -> (Vec<Arc<dyn Runner>>, String) {
    let mut runners: Vec<Arc<dyn Runner>> = vec![Arc::new(HostRunner::new(sandbox))];
    let vm_unavailable = match crate::vm::runner(&opts.vm, work_dir).await {
        Ok(vm) => {
            runners.push(vm);
            String::new()
        }
        Err(why) => why,
    };
    (runners, vm_unavailable)
}

pub async fn server(args: ServerArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let server = build_server(&args).await?;
    serve(server, shutdown).await
}

pub async fn up(args: UpArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let server = build_server(&args.server).await?;
    let addr = server.listener.local_addr()?;
    let connect = if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", addr.port())
    } else {
        format!("http://{addr}")
    };
    let cas = LocalCas::shared(server.store.clone());
    let sandbox = host_sandbox(&args.executor).await?;
    let config = executor_config(
        &args.executor,
        args.server.data_dir.join("executor"),
        sandbox.as_ref(),
    );
    let channel = session::channel(&connect)?;
    let opts = args.executor.clone();
    let stop = shutdown.clone();
    // The executor joins once its runners are ready (a VM probe boot takes
    // seconds); the server answers meanwhile.
    let sess = tokio::spawn(async move {
        let (runners, vm_unavailable) = runners(&opts, &config.work_dir, sandbox).await;
        match Executor::new(config, cas, runners) {
            Ok(executor) => {
                let sc = session_config(&opts, connect, vm_unavailable);
                let executor = Arc::new(executor);
                session::run(executor.clone(), sc, channel, stop).await;
                executor.shutdown().await;
            }
            Err(e) => tracing::error!("starting the executor: {e}"),
        }
    });
    let result = serve(server, shutdown.clone()).await;
    shutdown.cancel();
    let _ = sess.await;
    result
}

pub async fn executor(args: ExecutorArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let url = server_url(&args.server).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let local = Arc::new(
        DiskStore::open(&args.work_dir.join("cache"), args.cache_max_bytes)
            .context("opening the local cache")?,
    );
    let channel = session::channel(&url)?;
    let upstream = Arc::new(GrpcStore::new(
        channel.clone(),
        args.instance.clone(),
        args.work_dir.join("cache").join("staging"),
    ));
    let cas = LocalCas::caching(local, upstream);
    let sandbox = host_sandbox(&args.options).await?;
    let config = executor_config(&args.options, args.work_dir.clone(), sandbox.as_ref());
    let (runners, vm_unavailable) = runners(&args.options, &args.work_dir, sandbox).await;
    let executor = Arc::new(Executor::new(config, cas, runners).context("starting the executor")?);
    tracing::info!(executor = executor.id(), server = %url, "executor starting");
    session::run(
        executor.clone(),
        session_config(&args.options, url, vm_unavailable),
        channel,
        shutdown,
    )
    .await;
    executor.shutdown().await;
    Ok(())
}
