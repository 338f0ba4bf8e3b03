//! Assembling the pieces: stores, scheduler and services for the server; a
//! local cache, runners and a session for the executor; both for `up`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use hearth_executor::{
    client, session, Executor, ExecutorConfig, GrpcStore, HostRunner, LocalCas, Runner, Sandbox,
};
use hearth_storage::DiskStore;
use tokio::net::TcpListener;

use crate::cli::{ExecutorArgs, ExecutorOptions, ServerArgs, UpArgs};
use crate::observe;
use crate::server::{build_server, serve, shutdown_on_signal, Server};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

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

fn session_config(opts: &ExecutorOptions, vms: VmOffer) -> session::SessionConfig {
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
        properties,
        capacity,
        description: format!(
            "hearth {} on {}{}",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            match vms.accel {
                Some(hearth_vm::Accel::Kvm) => ", microVMs on KVM",
                Some(hearth_vm::Accel::Tcg) => ", microVMs under software emulation (TCG)",
                None => "",
            }
        ),
        vm_unavailable: vms.unavailable,
        report_interval: session::REPORT_INTERVAL,
    }
}

/// Whether an executor offers microVMs: on which accelerator, or why not.
#[derive(Default)]
struct VmOffer {
    accel: Option<hearth_vm::Accel>,
    /// Empty when it offers them.
    unavailable: String,
}

/// The executor's runners, and what it offers of microVMs.
async fn runners(
    opts: &ExecutorOptions,
    work_dir: &std::path::Path,
    sandbox: Option<Sandbox>,
    cas: &LocalCas,
) -> (Vec<Arc<dyn Runner>>, VmOffer) {
    let mut runners: Vec<Arc<dyn Runner>> = vec![Arc::new(HostRunner::new(sandbox))];
    let offer = match crate::vm::runner(&opts.vm, work_dir, cas).await {
        Ok((vm, accel)) => {
            runners.push(vm);
            VmOffer {
                accel: Some(accel),
                unavailable: String::new(),
            }
        }
        Err(why) => VmOffer {
            accel: None,
            unavailable: why,
        },
    };
    (runners, offer)
}

/// The metrics recorder, when --metrics-listen asks for one (installed
/// before anything records).
fn recorder(addr: Option<std::net::SocketAddr>) -> Result<Option<PrometheusHandle>> {
    addr.map(|_| observe::install_recorder()).transpose()
}

/// Starts what operators look at: /metrics and the web view, as asked.
async fn observe_server(
    server: &mut Server,
    args: &ServerArgs,
    handle: Option<PrometheusHandle>,
    web: Option<std::net::SocketAddr>,
    shutdown: &CancellationToken,
) -> Result<()> {
    if let (Some(addr), Some(handle)) = (args.metrics_listen, handle) {
        let refresh = observe::server_refresh(&server.ctx, server.ac.clone());
        observe::serve_metrics(addr, handle, refresh, shutdown.clone()).await?;
    }
    if let Some(addr) = web {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("serving the web view on {addr} (--web-listen ADDR or off)")
        })?;
        let bound = listener.local_addr()?;
        let ctx = server.ctx.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = hearth_web::serve(listener, ctx, stop).await {
                tracing::error!(error = %e, "the web view stopped");
            }
        });
        tracing::info!(addr = %bound, "serving the web view");
        server.web = Some(bound);
    }
    Ok(())
}

/// The web view's address: `off`, an address, or (None) the default given.
fn web_addr(
    flag: Option<&str>,
    default: Option<std::net::SocketAddr>,
) -> Result<Option<std::net::SocketAddr>> {
    match flag.map(str::trim) {
        Some("off") => Ok(None),
        Some(a) => a
            .parse()
            .map(Some)
            .with_context(|| format!("--web-listen {a:?}: expected HOST:PORT or off")),
        None => Ok(default),
    }
}

pub async fn server(args: ServerArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let handle = recorder(args.metrics_listen)?;
    let mut server = build_server(&args).await?;
    let web = web_addr(args.web_listen.as_deref(), None)?;
    observe_server(&mut server, &args, handle, web, &shutdown).await?;
    server
        .health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    serve(server, vec![], shutdown).await
}

pub async fn up(args: UpArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let handle = recorder(args.server.metrics_listen)?;
    let mut server = build_server(&args.server).await?;
    let (addr, tls) = server.local_url()?;
    // By default the web view is on the gRPC address's IP and the next port
    // (a free one when the gRPC port was picked freely).
    let next = match args.server.listen.port() {
        0 => 0,
        p => p.checked_add(1).unwrap_or(0),
    };
    let default_web = std::net::SocketAddr::new(args.server.listen.ip(), next);
    let web = web_addr(args.server.web_listen.as_deref(), Some(default_web))?;
    observe_server(&mut server, &args.server, handle, web, &shutdown).await?;
    observe::serving_once_executor_joins(
        server.health.clone(),
        server.ctx.scheduler.clone(),
        shutdown.clone(),
    );
    // The local executor connects in plaintext over loopback: to the main
    // listener, or (when that one is TLS) to a loopback listener of its own.
    let mut extra = Vec::new();
    let connect = if tls {
        let own = TcpListener::bind("127.0.0.1:0")
            .await
            .context("listening on loopback for the local executor")?;
        let url = format!("grpc://{}", own.local_addr()?);
        extra.push(own);
        url
    } else if addr.ip().is_unspecified() {
        format!("grpc://127.0.0.1:{}", addr.port())
    } else {
        format!("grpc://{addr}")
    };
    let address = hearth_executor::client::ServerAddress {
        url: connect.clone(),
        api_key: server.local_executor_key(),
        ..Default::default()
    };
    let cas = match &server.slow {
        None => LocalCas::shared(server.store.clone()),
        Some(slow) => LocalCas::tiered(server.store.clone(), slow.clone()),
    };
    let sandbox = host_sandbox(&args.executor).await?;
    let config = executor_config(
        &args.executor,
        args.server.data_dir.join("executor"),
        sandbox.as_ref(),
    );
    let (channel, servers) =
        client::connect_any(std::slice::from_ref(&address)).map_err(anyhow::Error::msg)?;
    let opts = args.executor.clone();
    let stop = shutdown.clone();
    // The executor joins once its runners are ready (a VM probe boot takes
    // seconds); the server answers meanwhile.
    let sess = tokio::spawn(async move {
        let (runners, vms) = runners(&opts, &config.work_dir, sandbox, &cas).await;
        match Executor::new(config, cas, runners) {
            Ok(executor) => {
                let sc = session_config(&opts, vms);
                let executor = Arc::new(executor);
                session::run(executor.clone(), sc, channel, servers, stop).await;
                executor.shutdown().await;
            }
            Err(e) => tracing::error!("starting the executor: {e}"),
        }
    });
    let result = serve(server, extra, shutdown.clone()).await;
    shutdown.cancel();
    let _ = sess.await;
    result
}

pub async fn executor(args: ExecutorArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    if let Some(addr) = args.metrics_listen {
        let handle = observe::install_recorder()?;
        // The executor's gauges (pools, snapshots) are set as they change.
        observe::serve_metrics(addr, handle, Arc::new(|| {}), shutdown.clone()).await?;
    }
    let addresses = args
        .server
        .iter()
        .map(|s| args.client.address(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let url = args.server.join(", ");
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let local = Arc::new(
        DiskStore::open(&args.work_dir.join("cache"), args.cache_max_bytes)
            .context("opening the local cache")?,
    );
    let (channel, servers) = client::connect_any(&addresses).map_err(anyhow::Error::msg)?;
    let upstream = Arc::new(GrpcStore::new(channel.clone(), args.instance.clone()));
    let cas = LocalCas::caching(local, upstream);
    let sandbox = host_sandbox(&args.options).await?;
    let config = executor_config(&args.options, args.work_dir.clone(), sandbox.as_ref());
    let (runners, vms) = runners(&args.options, &args.work_dir, sandbox, &cas).await;
    let executor = Arc::new(Executor::new(config, cas, runners).context("starting the executor")?);
    tracing::info!(executor = executor.id(), server = %url, "executor starting");
    session::run(
        executor.clone(),
        session_config(&args.options, vms),
        channel,
        servers,
        shutdown,
    )
    .await;
    executor.shutdown().await;
    Ok(())
}
