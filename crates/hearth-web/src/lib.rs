//! The operator's web view, served by the binary itself: recent executions
//! with their timing, one execution's outputs, executors and their warm
//! runners, the cache. Server-rendered HTML ([`maud`] escapes every value),
//! inline CSS, no scripts and no external assets, so it works offline and a
//! hostile action's output cannot run in an operator's browser.
//!
//! With API keys on, a page needs a key (header or cookie, see
//! [`viewer`]); a tenant sees its own executions, an admin everyone's.

mod blobs;
mod cache;
mod execution;
mod executions;
mod executors;
mod layout;
mod origin;
mod timing;
mod viewer;

use axum::routing::{get, post};
use axum::Router;
use hearth_api::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every route of the web view, for a listener bound to `bound` (see
/// [`origin`] for what that decides).
pub fn router(ctx: Context, bound: std::net::SocketAddr) -> Router {
    let guard = axum::middleware::from_fn(move |req, next| origin::guard(bound, req, next));
    Router::new()
        .route("/", get(executions::page))
        .route("/executions", get(executions::page))
        .route("/executions/{*name}", get(execution::page))
        .route("/executors", get(executors::page))
        .route("/cache", get(cache::page))
        .route("/blobs/{hash}/{size}", get(blobs::download))
        .route("/login", post(viewer::login))
        .layer(guard)
        .with_state(ctx)
}

/// Serves the web view on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ctx: Context,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let bound = listener.local_addr()?;
    axum::serve(listener, router(ctx, bound))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
