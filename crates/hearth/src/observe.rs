//! What operators see besides logs: the Prometheus exporter and its
//! `/metrics` listener, the gRPC health service's status, and the web
//! view's listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::routing::get;
use metrics::gauge;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Histogram buckets, in seconds: 1 ms to 10 min, for everything from a
/// cache lookup to a long test.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Sets gauges from live state just before a scrape.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// Installs the process's metrics recorder (once; every `metrics::` call in
/// any crate then records into it).
pub fn install_recorder() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("the metrics histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
}

/// Binds `addr` and serves `/metrics` there until `shutdown`.
pub async fn serve_metrics(
    addr: SocketAddr,
    handle: PrometheusHandle,
    refresh: Refresh,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-listen {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            let refresh = refresh.clone();
            async move {
                refresh();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics");
    Ok(bound)
}

/// The server's gauges from its scheduler and stores.
pub fn server_refresh(
    ctx: &hearth_api::Context,
    ac: Option<Arc<hearth_storage::DiskActionCache>>,
) -> Refresh {
    let ctx = ctx.clone();
    Arc::new(move || {
        hearth_scheduler::metrics::publish(&ctx.scheduler.stats(None));
        let cas = ctx.cas_stats();
        gauge!("hearth_cas_bytes").set(cas.bytes as f64);
        gauge!("hearth_cas_blobs").set(cas.blobs as f64);
        gauge!("hearth_cas_limit_bytes").set(cas.limit_bytes as f64);
        // An action cache in Redis is measured by Redis.
        if let Some(ac) = &ac {
            let (entries, bytes) = ac.stats();
            gauge!("hearth_action_cache_entries").set(entries as f64);
            gauge!("hearth_action_cache_bytes").set(bytes as f64);
        }
        gauge!("hearth_uptime_seconds").set(ctx.started.elapsed().as_secs_f64());
    })
}

/// Health for `hearth up`: NOT_SERVING until the local executor has joined
/// (a VM probe boot takes seconds), then SERVING.
pub fn serving_once_executor_joins(
    reporter: HealthReporter,
    scheduler: Arc<hearth_scheduler::Scheduler>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if !scheduler.stats(None).executors.is_empty() {
                reporter
                    .set_service_status("", ServingStatus::Serving)
                    .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// NOT_SERVING as soon as a graceful shutdown begins.
pub fn not_serving_at_shutdown(reporter: HealthReporter, shutdown: CancellationToken) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    });
}

/// Prints a line on stdout for scripts and tests; a reader that went away
/// is no error.
pub fn announce(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
