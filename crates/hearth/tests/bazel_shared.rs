//! Real Bazel against a shared Hearth: API keys in the header BuildBuddy
//! users already send, TLS with the operator's CA and a client certificate
//! standing for a key, and the error a wrong key gives. (See bazel_e2e.rs
//! for how the Bazel tests run.)
//!
//! Each client does what it can: Debian's Bazel 4.2 sends `--remote_header`
//! but cannot speak TLS at all (its bundled Netty has no ALPN: "JDK
//! provider does not support ALPN protocol", before it connects); Bazel 2.1
//! speaks TLS but ignores `--remote_header` (no header reaches the server)
//! and has no `--tls_client_certificate`, so it sends its key in the URL,
//! `grpcs://KEY@host:port`, as BuildBuddy users write it.

mod bazel_support;
#[path = "common/tls.rs"]
mod tls;

use std::path::Path;

use bazel_support::*;

const KEYS: &str = r#"
[[key]]
key = "team-a-secret"
tenant = "team-a"
capabilities = ["cas-read", "cas-write", "execute"]
"#;

/// `hearth up` with the keys above (and TLS when `certs` is given).
fn shared_up(dir: &Path, certs: Option<&tls::Certs>) -> (Hearth, u16) {
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, KEYS).expect("writing keys.toml");
    let mut args = vec![
        "--vm".to_string(),
        "off".into(),
        "--auth-keys".into(),
        keys.to_str().expect("utf-8 path").into(),
    ];
    if let Some(c) = certs {
        for (flag, path) in [("--tls-cert", &c.cert), ("--tls-key", &c.key)] {
            args.push(flag.into());
            args.push(path.to_str().expect("utf-8 path").into());
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    hearth_up(dir, &args)
}

/// Remote execution flags for `url`, with `key` (if any) in BuildBuddy's
/// header.
fn shared_flags(url: &str, key: Option<&str>) -> Vec<String> {
    let mut flags: Vec<String> = remote_flags(0)
        .into_iter()
        .filter(|f| !f.starts_with("--remote_executor="))
        .collect();
    flags.push(format!("--remote_executor={url}"));
    if let Some(key) = key {
        flags.push(format!("--remote_header=x-buildbuddy-api-key={key}"));
    }
    flags
}

fn build_passes(version: &'static str, root: &Path, flags: &[String]) {
    let out = bazel(
        version,
        root,
        "test",
        &flags_with(flags, &["//..."]),
        "shared",
    );
    assert_success(&out, "`bazel test //...` on a shared Hearth");
    let counts = process_counts(&out.text);
    let remote = assert_only(&counts, "remote", &out.text);
    assert!(remote >= 8, "only {remote} remote processes:\n{}", out.text);
}

#[test]
fn bazel_4_2_builds_with_an_api_key_header() {
    require_bazel("4.2");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let (_hearth, port) = shared_up(tmp.path(), None);
    let root = tmp.path().join("bazel-4.2");
    let _server = BazelServer {
        version: "4.2",
        root: root.clone(),
    };
    let flags = shared_flags(&format!("grpc://127.0.0.1:{port}"), Some("team-a-secret"));
    build_passes("4.2", &root, &flags);
}

#[test]
fn bazel_2_1_builds_over_grpcs_with_the_key_in_the_url() {
    require_bazel("2.1");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let certs = tls::make_certs(tmp.path());
    let (_hearth, port) = shared_up(tmp.path(), Some(&certs));
    let root = tmp.path().join("bazel-2.1");
    let _server = BazelServer {
        version: "2.1",
        root: root.clone(),
    };
    let mut flags = shared_flags(&format!("grpcs://team-a-secret@localhost:{port}"), None);
    flags.push(format!("--tls_certificate={}", certs.ca.display()));
    build_passes("2.1", &root, &flags);
}

#[test]
fn a_wrong_key_gives_bazel_a_readable_unauthenticated_error() {
    require_bazel("4.2");
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("temp dir");
    let (_hearth, port) = shared_up(tmp.path(), None);
    let root = tmp.path().join("bazel-4.2");
    let _server = BazelServer {
        version: "4.2",
        root: root.clone(),
    };
    let flags = shared_flags(&format!("grpc://127.0.0.1:{port}"), Some("not-a-key"));
    let out = bazel(
        "4.2",
        &root,
        "build",
        &flags_with(&flags, &["//..."]),
        "wrong-key",
    );
    assert!(!out.status.success(), "a build with a wrong key failed");
    assert!(
        out.text.contains("UNAUTHENTICATED") && out.text.contains("the API key is not valid"),
        "Bazel's output names the problem:\n{}",
        out.text
    );
}
