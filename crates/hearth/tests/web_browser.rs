//! The web view in a real browser: headless Chromium (Debian's `chromium`)
//! against `hearth up` after real Bazel 4.2 actions. The executions page
//! lists them with their exit codes, an execution's page shows its stdout,
//! the executors page shows the warm runner a `recycle-runner` action left,
//! and `/metrics` counted the VM start. Screenshots of each page are kept
//! in `target/tmp/web-screenshots/`.

mod bazel_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bazel_support::*;

const CHROMIUM: &str = "/usr/bin/chromium";

fn chromium(profile: &Path, args: &[&str]) -> String {
    let out = Command::new(CHROMIUM)
        .args([
            "--headless=new",
            // Root in CI: Chromium's own sandbox needs an unprivileged user.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1366,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {CHROMIUM} (scripts/test.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "chromium {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM as the browser built it.
fn dom(profile: &Path, url: &str) -> String {
    chromium(profile, &["--dump-dom", url])
}

fn screenshot(profile: &Path, url: &str, file: &Path) {
    chromium(profile, &[&format!("--screenshot={}", file.display()), url]);
    let png = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is a PNG",
        file.display()
    );
    assert!(png.len() > 10_000, "{} has a rendered page", file.display());
}

/// Table rows of a page, as HTML.
fn rows(html: &str) -> Vec<&str> {
    html.split("<tr>").skip(1).collect()
}

fn links_to_executions(html: &str) -> Vec<String> {
    html.split("href=\"/executions/")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|name| name.to_string())
        .collect()
}

#[test]
fn the_pages_show_bazel_actions_in_a_real_browser() {
    require_bazel("4.2");
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium"
    );
    let _serial = serial();
    std::env::set_var(
        "HEARTH_E2E_WORKSPACE",
        repo_root().join("tests/e2e/web-workspace"),
    );
    let tmp = tempfile::tempdir().expect("temp dir");
    let web = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let (hearth, port) = hearth_up(
        tmp.path(),
        &[
            "--vm",
            "tcg",
            "--web-listen",
            &web,
            "--metrics-listen",
            &metrics,
        ],
    );
    let root = tmp.path().join("bazel-4.2");
    let _bazel_server = BazelServer {
        version: "4.2",
        root: root.clone(),
    };
    let out = bazel(
        "4.2",
        &root,
        "test",
        &flags_with(
            &remote_flags(port),
            &["--keep_going", "//:fails_test", "//:greet", "//:warm"],
        ),
        "web",
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "bazel test: only fails_test fails:\n{}",
        out.text
    );
    assert!(out.text.contains("//:fails_test") && out.text.contains("FAILED"));

    let shots: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let profile = tmp.path().join("chromium");
    let base = format!("http://{web}");

    // Executions: each action with its exit code.
    let list = dom(&profile, &format!("{base}/executions"));
    let all = rows(&list);
    let failed = all
        .iter()
        .find(|r| r.contains("test-setup.sh"))
        .unwrap_or_else(|| panic!("the test's execution is listed:\n{list}"));
    assert!(failed.contains("exit 3"), "fails_test's row: {failed}");
    let genrules: Vec<_> = all
        .iter()
        .filter(|r| r.contains("genrule-setup.sh"))
        .collect();
    assert_eq!(genrules.len(), 2, "both genrules are listed:\n{list}");
    assert!(genrules.iter().all(|r| r.contains("exit 0")));
    assert!(
        genrules.iter().any(|r| r.contains("firecracker")),
        "the VM action is listed with its isolation"
    );
    screenshot(
        &profile,
        &format!("{base}/executions"),
        &shots.join("executions.png"),
    );

    // An execution's page shows the genrule's stdout.
    let greet = links_to_executions(&list)
        .into_iter()
        .find(|name| {
            dom(&profile, &format!("{base}/executions/{name}"))
                .contains("<h2>stdout</h2><pre>hello-from-the-web-view")
        })
        .unwrap_or_else(|| panic!("no execution page shows greet's stdout:\n{list}"));
    screenshot(
        &profile,
        &format!("{base}/executions/{greet}"),
        &shots.join("execution.png"),
    );

    // Executors: the warm VM `//:warm` left (its report may take a moment).
    let executors = poll(
        "a warm runner on the executors page",
        Duration::from_secs(60),
        || {
            let page = dom(&profile, &format!("{base}/executors"));
            page.contains("×1").then_some(page)
        },
    );
    assert!(
        executors.contains("software emulation (TCG)"),
        "the accelerator is shown:\n{executors}"
    );
    screenshot(
        &profile,
        &format!("{base}/executors"),
        &shots.join("executors.png"),
    );
    let cache = dom(&profile, &format!("{base}/cache"));
    assert!(
        cache.contains("blobs") && cache.contains("hit rate"),
        "{cache}"
    );
    screenshot(&profile, &format!("{base}/cache"), &shots.join("cache.png"));

    // /metrics counted the VM start, by kind.
    let m = http_get(&metrics, "/metrics");
    let starts: f64 = m
        .lines()
        .filter(|l| l.starts_with("hearth_vm_starts_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(starts >= 1.0, "hearth_vm_starts_total:\n{m}");
    assert!(m.contains("hearth_vm_start_seconds_bucket{kind="), "{m}");
    drop(hearth);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The body of a plain HTTP/1.0 GET.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("answer");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}
