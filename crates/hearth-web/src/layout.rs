//! The frame every page shares: navigation, the style sheet (inline, no
//! external assets) and headers that keep the browser from running or
//! sniffing anything.

use std::time::{Duration, SystemTime};

use axum::http::header;
use axum::response::{IntoResponse, Response};
use hearth_api::auth::Principal;
use maud::{html, Markup, PreEscaped, DOCTYPE};

const STYLE: &str = r#"
:root { --fg:#1d2330; --muted:#687083; --line:#e3e6ec; --bg:#f7f8fa; --ok:#1f8f4e; --bad:#c93434; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif; color:var(--fg); background:var(--bg); }
header { background:#1d2330; color:#fff; padding:10px 24px; display:flex; gap:24px; align-items:center; }
header a { color:#cfd6e4; text-decoration:none; } header a:hover { color:#fff; }
header .brand { font-weight:600; color:#fff; margin-right:12px; }
header .who { margin-left:auto; color:#9aa3b5; font-size:12px; }
main { padding:18px 24px; max-width:1400px; }
h1 { font-size:20px; margin:4px 0 14px; } h2 { font-size:16px; margin:22px 0 8px; }
table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--line); }
th, td { text-align:left; padding:6px 9px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#eef0f4; font-weight:600; font-size:12px; color:#444c5c; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.nowrap { white-space:nowrap; } table.narrow { width:auto; min-width:360px; }
code, pre { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:12.5px; }
pre { background:#fff; border:1px solid var(--line); padding:10px; overflow:auto; max-height:480px; white-space:pre-wrap; word-break:break-all; }
a { color:#2257c4; }
.muted { color:var(--muted); }
.ok { color:var(--ok); font-weight:600; } .bad { color:var(--bad); font-weight:600; }
.cards { display:flex; gap:12px; flex-wrap:wrap; margin-bottom:14px; }
.card { background:#fff; border:1px solid var(--line); padding:10px 14px; min-width:150px; }
.card b { display:block; font-size:20px; }
.bar { display:flex; width:220px; height:12px; background:#eef0f4; }
.bar span { display:block; height:12px; }
.s-queue { background:#b8c0cf; } .s-fetch { background:#5b8def; } .s-vm { background:#e5a03a; }
.s-run { background:#2f9e62; } .s-upload { background:#9b6ad6; }
.legend span { display:inline-block; width:10px; height:10px; margin:0 4px 0 12px; }
form.filters { margin:0 0 12px; display:flex; gap:8px; align-items:center; }
"#;

/// A whole page.
pub(crate) fn page(title: &str, who: Option<&Principal>, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Hearth" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    span.brand { "Hearth" }
                    a href="/executions" { "Executions" }
                    a href="/executors" { "Executors" }
                    a href="/cache" { "Cache" }
                    @if let Some(w) = who {
                        span.who {
                            @if w.is_anonymous() { "no API keys on this server" }
                            @else { "tenant " (w.tenant) " · key " (w.key_id) }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // No scripts, frames, or outside fetches: only the inline style.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response()
}

/// "12.3 s", "340 ms", "2 min 5 s".
pub(crate) fn duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        let s = d.as_secs();
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// How long ago, e.g. "5 s ago".
pub(crate) fn ago(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) if d.as_secs() < 60 => format!("{} s ago", d.as_secs()),
        Ok(d) if d.as_secs() < 3600 => format!("{} min ago", d.as_secs() / 60),
        Ok(d) if d.as_secs() < 86_400 => format!("{} h ago", d.as_secs() / 3600),
        Ok(d) => format!("{} d ago", d.as_secs() / 86_400),
        Err(_) => "now".into(),
    }
}

/// "1.5 GiB", "340 B".
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A page's answer for something the viewer may not see or that is gone.
pub(crate) fn not_found(who: &Principal, what: &str) -> Response {
    let body = html! { h1 { "Not found" } p.muted { (what) } };
    let mut r = page("Not found", Some(who), body);
    *r.status_mut() = axum::http::StatusCode::NOT_FOUND;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(bytes(340), "340 B");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_millis(340)), "340 ms");
        assert_eq!(duration(Duration::from_millis(12_340)), "12.3 s");
        assert_eq!(duration(Duration::from_secs(125)), "2 min 5 s");
    }
}
