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
use crate::server::{build_server, serve, shutdown_on_signal};

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
        report_interval: session::REPORT_INTERVAL,
    }
}

/// The executor's runners, and why microVMs are not among them (empty if
/// they are).
async fn runners(
    opts: &ExecutorOptions,
    work_dir: &std::path::Path,
    sandbox: Option<Sandbox>,
    cas: &LocalCas,
) -> (Vec<Arc<dyn Runner>>, String) {
    let mut runners: Vec<Arc<dyn Runner>> = vec![Arc::new(HostRunner::new(sandbox))];
    let vm_unavailable = match crate::vm::runner(&opts.vm, work_dir, cas).await {
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
    serve(server, vec![], shutdown).await
}

pub async fn up(args: UpArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let server = build_server(&args.server).await?;
    let (addr, tls) = server.local_url()?;
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
    let cas = LocalCas::shared(server.store.clone());
    let sandbox = host_sandbox(&args.executor).await?;
    let config = executor_config(
        &args.executor,
        args.server.data_dir.join("executor"),
        sandbox.as_ref(),
    );
    let channel = client::connect(&address).map_err(anyhow::Error::msg)?;
    let opts = args.executor.clone();
    let stop = shutdown.clone();
    // The executor joins once its runners are ready (a VM probe boot takes
    // seconds); the server answers meanwhile.
    let sess = tokio::spawn(async move {
        let (runners, vm_unavailable) = runners(&opts, &config.work_dir, sandbox, &cas).await;
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
    let result = serve(server, extra, shutdown.clone()).await;
    shutdown.cancel();
    let _ = sess.await;
    result
}

pub async fn executor(args: ExecutorArgs) -> Result<()> {
    let shutdown = shutdown_on_signal();
    let address = args
        .client
        .address(&args.server)
        .map_err(anyhow::Error::msg)?;
    let url = args.server.clone();
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let local = Arc::new(
        DiskStore::open(&args.work_dir.join("cache"), args.cache_max_bytes)
            .context("opening the local cache")?,
    );
    let channel = client::connect(&address).map_err(anyhow::Error::msg)?;
    let upstream = Arc::new(GrpcStore::new(
        channel.clone(),
        args.instance.clone(),
        args.work_dir.join("cache").join("staging"),
    ));
    let cas = LocalCas::caching(local, upstream);
    let sandbox = host_sandbox(&args.options).await?;
    let config = executor_config(&args.options, args.work_dir.clone(), sandbox.as_ref());
    let (runners, vm_unavailable) = runners(&args.options, &args.work_dir, sandbox, &cas).await;
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
