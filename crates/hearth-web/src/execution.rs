//! `/executions/<operation name>`: one execution: its platform, timing,
//! stdout and stderr (from the CAS, cut to [`SHOWN_OUTPUT_BYTES`] with a
//! download link), output files, the executor and attempts.

use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use hearth_api::Context;
use hearth_proto::reapi;
use hearth_scheduler::history::to_system;
use hearth_scheduler::ExecutionRecord;
use hearth_storage::{BlobStore, Digest};
use maud::{html, Markup};

use crate::blobs::blob_link;
use crate::executions::{command_line, result_cell, short_hash};
use crate::layout;
use crate::timing::Phases;
use crate::viewer::{tenant_scope, viewer};

/// How much of stdout and stderr a page shows.
pub(crate) const SHOWN_OUTPUT_BYTES: u64 = 64 * 1024;

pub(crate) async fn page(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let who = match viewer(&ctx, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let name = name.trim_start_matches('/');
    let Some(r) = ctx
        .scheduler
        .history()
        .find(name, tenant_scope(&who).as_deref())
    else {
        return layout::not_found(&who, &format!("No execution {name:?} is kept."));
    };
    let cas = ctx.store_for(&who);
    let result = r.result.clone().unwrap_or_default();
    let stdout = output_text(cas.as_ref(), &result.stdout_digest).await;
    let stderr = output_text(cas.as_ref(), &result.stderr_digest).await;
    let body = html! {
        h1 { "Execution " code { (name) } }
        table {
            tbody {
                tr { th { "result" } td { (result_cell(&r)) } }
                @if r.status_code != 0 { tr { th { "status" } td { (r.status_message) } } }
                tr { th { "command" } td { code { (r.base.arguments.join(" ")) } } }
                tr { th { "action" } td { code { (r.base.action_digest.hash_hex()) "/" (r.base.action_digest.size()) } } }
                @if !r.base.tenant.is_empty() { tr { th { "tenant" } td { (r.base.tenant) } } }
                @if !r.base.instance_name.is_empty() { tr { th { "instance" } td { (r.base.instance_name) } } }
                tr { th { "executor" } td { (r.base.executor.clone().unwrap_or_else(|| "—".into())) } }
                tr { th { "attempts" } td { (r.base.attempts) } }
                tr { th { "runner start" } td {
                    @match r.runner_start() {
                        Some(s) => { (s.kind) " · ready in " (s.ready_millis) " ms" }
                        None => span.muted { "— (host runner or cache hit)" }
                    }
                } }
            }
        }
        h2 { "Where the time went" }
        table.narrow { tbody { (Phases::of(&r).rows()) } }
        h2 { "stdout" }
        (output_block(&stdout, &result.stdout_digest, "stdout"))
        h2 { "stderr" }
        (output_block(&stderr, &result.stderr_digest, "stderr"))
        h2 { "Output files" }
        (outputs(&r, &result))
        h2 { "Platform" }
        (platform(&r))
        h2 { "Timestamps" }
        (timestamps(&r, &result))
    };
    layout::page("Execution", Some(&who), body)
}

/// The text of an output blob as far as a page shows it: None when there
/// is none, Err when the viewer may not read it or it is gone.
async fn output_text(
    cas: &dyn BlobStore,
    d: &Option<reapi::Digest>,
) -> Option<Result<(String, bool), String>> {
    let d = d.as_ref()?;
    let digest = match Digest::from_proto(d) {
        Ok(d) => d,
        Err(e) => return Some(Err(e.to_string())),
    };
    if digest.size() == 0 {
        return Some(Ok((String::new(), false)));
    }
    let cut = digest.size() > SHOWN_OUTPUT_BYTES;
    Some(
        cas.read(&digest, 0, Some(SHOWN_OUTPUT_BYTES))
            .await
            .map(|b| (String::from_utf8_lossy(&b).into_owned(), cut))
            .map_err(|e| e.to_string()),
    )
}

fn output_block(
    text: &Option<Result<(String, bool), String>>,
    d: &Option<reapi::Digest>,
    name: &str,
) -> Markup {
    html! {
        @match text {
            None => p.muted { "none" },
            Some(Err(why)) => p.muted { "not readable: " (why) },
            Some(Ok((t, cut))) => {
                @if t.is_empty() { p.muted { "empty" } } @else { pre { (t) } }
                @if let Some(d) = d {
                    p.muted {
                        @if *cut { "Shown: the first " (layout::bytes(SHOWN_OUTPUT_BYTES)) " of " (layout::bytes(d.size_bytes.max(0) as u64)) ". " }
                        a href=(blob_link(d, name)) { "download " (name) }
                    }
                }
            }
        }
    }
}

#[allow(deprecated)] // output_file_symlinks: older executors still fill it
fn outputs(r: &ExecutionRecord, result: &reapi::ActionResult) -> Markup {
    html! {
        @if r.outputs_total == 0 {
            p.muted { "none" }
        } @else {
            table {
                thead { tr { th { "path" } th.num { "size" } th { "digest" } } }
                tbody {
                    @for f in &result.output_files {
                        tr {
                            td { @if let Some(d) = &f.digest { a href=(blob_link(d, &f.path)) { code { (f.path) } } } @else { code { (f.path) } } }
                            td.num { @if let Some(d) = &f.digest { (layout::bytes(d.size_bytes.max(0) as u64)) } }
                            td { @if let Some(d) = &f.digest { code.muted { (short_hash(&d.hash)) } } }
                        }
                    }
                    @for d in &result.output_directories {
                        tr { td { code { (d.path) "/" } } td.num { span.muted { "directory" } } td {} }
                    }
                    @for s in result.output_symlinks.iter().chain(&result.output_file_symlinks) {
                        tr { td { code { (s.path) } } td.num { span.muted { "→ " (s.target) } } td {} }
                    }
                }
            }
            @let shown = result.output_files.len() + result.output_directories.len() + result.output_symlinks.len() + result.output_file_symlinks.len();
            @if r.outputs_total > shown { p.muted { (r.outputs_total - shown) " more not kept." } }
        }
    }
}

fn platform(r: &ExecutionRecord) -> Markup {
    html! {
        @if r.base.platform.is_empty() {
            p.muted { "none" @if r.cached { " (a cache hit's action is not read)" } }
        } @else {
            table { tbody {
                @for (k, v) in &r.base.platform { tr { th { (k) } td { code { (v) } } } }
            } }
        }
    }
}

fn timestamps(r: &ExecutionRecord, result: &reapi::ActionResult) -> Markup {
    let m = result.execution_metadata.clone().unwrap_or_default();
    let rows: [(&str, Option<SystemTime>); 10] = [
        (
            "queued",
            m.queued_timestamp
                .as_ref()
                .and_then(to_system)
                .or(Some(r.base.queued_at)),
        ),
        (
            "worker start",
            m.worker_start_timestamp.as_ref().and_then(to_system),
        ),
        (
            "input fetch start",
            m.input_fetch_start_timestamp.as_ref().and_then(to_system),
        ),
        (
            "input fetch completed",
            m.input_fetch_completed_timestamp
                .as_ref()
                .and_then(to_system),
        ),
        (
            "execution start",
            m.execution_start_timestamp.as_ref().and_then(to_system),
        ),
        (
            "execution completed",
            m.execution_completed_timestamp.as_ref().and_then(to_system),
        ),
        (
            "output upload start",
            m.output_upload_start_timestamp.as_ref().and_then(to_system),
        ),
        (
            "output upload completed",
            m.output_upload_completed_timestamp
                .as_ref()
                .and_then(to_system),
        ),
        (
            "worker completed",
            m.worker_completed_timestamp.as_ref().and_then(to_system),
        ),
        ("finished", Some(r.finished_at)),
    ];
    let origin = rows[0].1;
    html! {
        table.narrow { tbody {
            @for (name, t) in &rows {
                tr {
                    th { (name) }
                    td.num { @match (t, origin) {
                        (Some(t), Some(o)) => { "+" (layout::duration(t.duration_since(o).unwrap_or_default())) }
                        _ => span.muted { "—" },
                    } }
                }
            }
        } }
        @if !m.worker.is_empty() { p.muted { "worker: " (m.worker) } }
        p.muted { "command: " code { (command_line(r, 200)) } }
    }
}
