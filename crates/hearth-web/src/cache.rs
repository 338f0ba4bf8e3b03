//! `/cache`: the CAS's size and limit, blob count, the action cache's hit
//! rate and its busiest tenants.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use hearth_api::Context;
use maud::html;

use crate::layout;
use crate::viewer::{tenant_scope, viewer};

/// Tenants the page lists.
const TOP_TENANTS: usize = 20;

pub(crate) async fn page(State(ctx): State<Context>, headers: HeaderMap) -> Response {
    let who = match viewer(&ctx, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let scope = tenant_scope(&who);
    let cas = ctx.cas_stats();
    let totals = ctx.usage.totals(scope.as_deref());
    let lookups = totals.hits + totals.misses;
    let rate = |hits: u64, all: u64| {
        if all == 0 {
            "—".to_string()
        } else {
            format!("{:.1} %", hits as f64 / all as f64 * 100.0)
        }
    };
    let full = if cas.limit_bytes > 0 {
        format!(
            "{:.1} % of {}",
            cas.bytes as f64 / cas.limit_bytes as f64 * 100.0,
            layout::bytes(cas.limit_bytes)
        )
    } else {
        "no limit".into()
    };
    let top = ctx.usage.top(scope.as_deref(), TOP_TENANTS);
    let body = html! {
        h1 { "Cache" }
        div.cards {
            div.card { b { (layout::bytes(cas.bytes)) } span.muted { "in the CAS (" (full) ")" } }
            div.card { b { (cas.blobs) } span.muted { "blobs" } }
            div.card { b { (rate(totals.hits, lookups)) } span.muted { "action-cache hit rate (" (lookups) " lookups)" } }
            div.card { b { (totals.writes) } span.muted { "results stored" } }
        }
        h2 { "Action-cache use by tenant" }
        table {
            thead { tr { th { "tenant" } th.num { "lookups" } th.num { "hits" } th.num { "hit rate" } th.num { "stored" } } }
            tbody {
                @for (tenant, u) in &top {
                    tr {
                        td { @if tenant.is_empty() { span.muted { "(anonymous)" } } @else { (tenant) } }
                        td.num { (u.hits + u.misses) }
                        td.num { (u.hits) }
                        td.num { (rate(u.hits, u.hits + u.misses)) }
                        td.num { (u.writes) }
                    }
                }
                @if top.is_empty() { tr { td colspan="5" { span.muted { "No lookups yet." } } } }
            }
        }
        p.muted { "Counts since the server started." }
    };
    layout::page("Cache", Some(&who), body)
}
