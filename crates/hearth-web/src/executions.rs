//! `/` and `/executions`: recent operations, newest first, filterable by
//! status, tenant and instance, a page at a time.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use hearth_api::Context;
use hearth_scheduler::{ExecutionRecord, HistoryFilter};
use maud::{html, Markup};

use crate::layout;
use crate::timing::{legend, Phases};
use crate::viewer::{tenant_scope, viewer};

/// Rows per page.
pub(crate) const PAGE_ROWS: usize = 100;

#[derive(serde::Deserialize, Default)]
pub(crate) struct Params {
    status: Option<String>,
    tenant: Option<String>,
    instance: Option<String>,
    #[serde(default)]
    skip: usize,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_ref()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub(crate) async fn page(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let who = match viewer(&ctx, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    // A tenant's own scope always wins over the filter it asks for.
    let tenant = tenant_scope(&who).or_else(|| nonempty(&params.tenant));
    let filter = HistoryFilter {
        tenant,
        instance_name: nonempty(&params.instance),
        status: nonempty(&params.status)
            .filter(|s| ["ok", "failed", "cached"].contains(&s.as_str())),
    };
    let history = ctx.scheduler.history();
    let (rows, total) = history.recent(&filter, params.skip, PAGE_ROWS);
    let stats = ctx.scheduler.stats(tenant_scope(&who).as_deref());
    let body = html! {
        h1 { "Executions" }
        div.cards {
            div.card { b { (stats.queued) } span.muted { "queued" } }
            div.card { b { (stats.running) } span.muted { "running" } }
            div.card { b { (total) } span.muted { "kept, matching" } }
        }
        (filters(&filter, !who.sees_all_tenants()))
        (legend())
        table {
            thead { tr {
                th { "finished" } th { "operation" } th { "command" } th { "isolation" }
                th { "runner start" } th { "result" } th.num { "total" } th { "where the time went" }
            } }
            tbody {
                @for r in &rows { (row(r)) }
                @if rows.is_empty() {
                    tr { td colspan="8" { span.muted { "No executions kept that match." } } }
                }
            }
        }
        (pager(&filter, params.skip, total))
    };
    layout::page("Executions", Some(&who), body)
}

fn filters(f: &HistoryFilter, own_tenant_only: bool) -> Markup {
    let status = f.status.clone().unwrap_or_default();
    html! {
        form.filters method="get" action="/executions" {
            label { "status " select name="status" {
                @for (v, label) in [("", "any"), ("ok", "succeeded"), ("failed", "failed"), ("cached", "cached")] {
                    option value=(v) selected[status == v] { (label) }
                }
            } }
            @if !own_tenant_only {
                label { "tenant " input name="tenant" value=(f.tenant.clone().unwrap_or_default()) size="12"; }
            }
            label { "instance " input name="instance" value=(f.instance_name.clone().unwrap_or_default()) size="12"; }
            button type="submit" { "Filter" }
        }
    }
}

fn pager(f: &HistoryFilter, skip: usize, total: usize) -> Markup {
    let link = |skip: usize| {
        let mut q = vec![format!("skip={skip}")];
        for (k, v) in [
            ("status", &f.status),
            ("tenant", &f.tenant),
            ("instance", &f.instance_name),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", urlencode(v)));
            }
        }
        format!("/executions?{}", q.join("&"))
    };
    html! {
        p.muted {
            @if skip > 0 { a href=(link(skip.saturating_sub(PAGE_ROWS))) { "← newer" } " " }
            (skip.min(total)) "–" ((skip + PAGE_ROWS).min(total)) " of " (total)
            @if skip + PAGE_ROWS < total { " " a href=(link(skip + PAGE_ROWS)) { "older →" } }
        }
    }
}

/// Percent-encodes a query value (letters, digits and `-_.~` pass).
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The command line as a row shows it: the first argument's file name and
/// the rest, cut short.
pub(crate) fn command_line(r: &ExecutionRecord, max: usize) -> String {
    let Some(first) = r.base.arguments.first() else {
        return String::new();
    };
    let name = first.rsplit('/').next().unwrap_or(first);
    let mut line = name.to_string();
    for a in &r.base.arguments[1..] {
        line.push(' ');
        line.push_str(a);
        if line.len() > max {
            break;
        }
    }
    if line.len() > max {
        let mut cut = max;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// What an execution ended with: exit code, or the status that stopped it.
pub(crate) fn result_cell(r: &ExecutionRecord) -> Markup {
    html! {
        @if r.status_code != 0 {
            span.bad title=(r.status_message) { "error " (status_name(r.status_code)) }
        } @else if let Some(code) = r.exit_code() {
            @if code == 0 { span.ok { "exit 0" } } @else { span.bad { "exit " (code) } }
            @if r.cached { " " span.muted { "(cached)" } }
        } @else {
            span.muted { "—" }
        }
    }
}

pub(crate) fn status_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from(code))
}

fn row(r: &ExecutionRecord) -> Markup {
    let phases = Phases::of(r);
    let total = r
        .finished_at
        .duration_since(r.base.queued_at)
        .unwrap_or_default();
    html! {
        tr {
            td.muted.nowrap { (layout::ago(r.finished_at)) }
            td {
                a href=(format!("/executions/{}", r.base.operation_name)) { code { (short_op(&r.base.operation_name)) } }
                br;
                span.muted { code { (short_hash(&r.base.action_digest.hash_hex())) } }
                @if !r.base.tenant.is_empty() { " " span.muted { "· " (r.base.tenant) } }
            }
            td { code { (command_line(r, 80)) } }
            td { (if r.base.isolation.is_empty() { "—" } else { &r.base.isolation }) }
            td { @match r.runner_start() { Some(s) => (s.kind), None => span.muted { "—" } } }
            td.nowrap { (result_cell(r)) }
            td.num { (layout::duration(total)) }
            td { (phases.bar()) }
        }
    }
}

/// `operations/1b2c…` → its first 8 characters after the prefix.
pub(crate) fn short_op(name: &str) -> String {
    let id = name.strip_prefix("operations/").unwrap_or(name);
    id.chars().take(13).collect()
}

pub(crate) fn short_hash(hex: &str) -> String {
    hex.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(urlencode("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(urlencode("team-1_x.y~"), "team-1_x.y~");
    }
}
