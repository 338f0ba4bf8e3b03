//! `/executors`: each executor with its isolation types, slots, warm
//! runners by key (pooled or saved on it, and whether shared through the
//! CAS), accelerator (in its description) and uptime. Affinity keys are
//! hashes that do not say whose they are, so only admins see them.

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use hearth_api::Context;
use hearth_scheduler::ExecutorSnapshot;
use maud::{html, Markup};

use crate::executions::short_hash;
use crate::layout;
use crate::viewer::{tenant_scope, viewer};

pub(crate) async fn page(State(ctx): State<Context>, headers: HeaderMap) -> Response {
    let who = match viewer(&ctx, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let stats = ctx.scheduler.stats(tenant_scope(&who).as_deref());
    let admin = who.sees_all_tenants();
    let slots: u32 = stats.executors.iter().map(|e| e.info.capacity).sum();
    let busy: u32 = stats.executors.iter().map(|e| e.running).sum();
    let warm: u32 = stats.executors.iter().map(|e| e.warm_runners).sum();
    let body = html! {
        h1 { "Executors" }
        div.cards {
            div.card { b { (stats.executors.len()) } span.muted { "executors" } }
            div.card { b { (busy) " / " (slots) } span.muted { "slots busy" } }
            div.card { b { (warm) } span.muted { "warm runners" } }
            div.card { b { (stats.shared_snapshots_total) } span.muted { "runner snapshots in the CAS" } }
        }
        table {
            thead { tr {
                th { "executor" } th { "runs" } th.num { "slots busy" } th { "warm runners" } th.num { "up" }
            } }
            tbody {
                @for e in &stats.executors { (row(e, admin)) }
                @if stats.executors.is_empty() {
                    tr { td colspan="5" { span.muted { "No executor is connected." } } }
                }
            }
        }
    };
    layout::page("Executors", Some(&who), body)
}

fn row(e: &ExecutorSnapshot, admin: bool) -> Markup {
    html! {
        tr {
            td {
                b { (e.info.id) }
                @if e.reconnecting { " " span.bad { "reconnecting" } }
                br;
                span.muted { (e.info.description) }
            }
            td {
                (e.info.isolation_types.join(", "))
                @if !e.info.vm_unavailable.is_empty() {
                    br; span.muted { "no microVMs: " (e.info.vm_unavailable) }
                }
            }
            td.num { (e.running) " / " (e.info.capacity) }
            td {
                (e.warm_runners)
                @if admin && !e.warm_keys.is_empty() {
                    table {
                        @for k in &e.warm_keys {
                            tr {
                                td { code { (short_hash(&k.affinity_key)) } }
                                td.num { "×" (k.count) }
                                td { @if k.shared { "also in the CAS" } }
                            }
                        }
                    }
                }
            }
            td.num { (layout::duration(Duration::from_secs(e.connected_seconds))) }
        }
    }
}
