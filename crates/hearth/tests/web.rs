//! The web view's boundaries, attack first: without a key it shows
//! nothing; a tenant never sees another's executions, outputs or blobs
//! (by list, by filter, by name, by digest); an action's output is text
//! on the page, never markup; downloads cannot be rendered as pages.

mod common;

use common::web::{free_port, get, request, Answer};
use common::*;

fn page(web: &str, path: &str, key: Option<&str>) -> Answer {
    match key {
        Some(k) => get(web, path, &[("x-hearth-api-key", k)]),
        None => get(web, path, &[]),
    }
}

#[tokio::test]
async fn tenants_see_only_their_own_and_outputs_stay_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys_file(dir.path());
    let web = format!("127.0.0.1:{}", free_port());
    let h = up_in(dir, &["--auth-keys", &keys, "--web-listen", &web]);
    let a = channel_with_key(&h, Some("key-a")).await;
    let script = "echo 'team-a-secret <script>alert(1)</script>'; echo on-stderr >&2; exit 7";
    let action = make_action(&a, &ActionSpec::new(script)).await;
    let (ops, r) = execute(&a, action, false).await.expect("Execute");
    let name = ops.last().expect("an operation").name.clone();
    let result = r.result.expect("a result");
    assert_eq!(result.exit_code, 7);
    let stdout = result.stdout_digest.expect("stdout digest");
    let id = name.strip_prefix("operations/").expect("operation name");
    let short = &id[..13];
    let blob = format!("/blobs/{}/{}?name=stdout", stdout.hash, stdout.size_bytes);
    let web2 = web.clone();
    let (name2, short2, blob2) = (name.clone(), short.to_string(), blob.clone());
    tokio::task::spawn_blocking(move || {
        let (web, name, short, blob) = (web2, name2, short2, blob2);
        // No key, or a wrong one: a sign-in page and nothing else.
        for key in [None, Some("not-a-key")] {
            for path in [
                "/executions",
                &format!("/executions/{name}"),
                "/executors",
                "/cache",
                &blob,
            ] {
                let p = page(&web, path, key);
                assert_eq!(p.status, 401, "{path} with {key:?}");
                assert!(p.body.contains("Sign in"));
                assert!(!p.body.contains("team-a-secret") && !p.body.contains(&short));
            }
        }
        // Team A sees its execution, its exit code and its output, as text.
        let list = page(&web, "/executions", Some("key-a"));
        assert_eq!(list.status, 200);
        assert!(list.body.contains(&short), "A's list shows its operation");
        assert!(list.body.contains("exit 7"));
        let csp = list.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'none'"), "no scripts run: {csp}");
        let detail = page(&web, &format!("/executions/{name}"), Some("key-a"));
        assert_eq!(detail.status, 200);
        assert!(detail.body.contains("team-a-secret"));
        assert!(detail.body.contains("on-stderr"));
        assert!(
            detail
                .body
                .contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "the output is escaped"
        );
        assert!(
            !detail.body.contains("<script>"),
            "no markup from the action"
        );
        let dl = page(&web, &blob, Some("key-a"));
        assert_eq!(dl.status, 200);
        assert!(dl.body.starts_with("team-a-secret <script>"));
        assert!(dl
            .header("content-disposition")
            .unwrap_or_default()
            .starts_with("attachment"));
        assert_eq!(dl.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(dl.header("content-type"), Some("application/octet-stream"));

        // Team B, with a valid key: not in its list, not by filter, not by
        // name, not by digest; by header or by cookie.
        for b in [
            vec![("x-hearth-api-key", "key-b")],
            vec![("cookie", "theme=dark; hearth_key=key-b")],
        ] {
            for path in [
                "/executions",
                "/executions?tenant=team-a",
                "/?status=failed",
            ] {
                let p = get(&web, path, &b);
                assert_eq!(p.status, 200, "{path}");
                assert!(!p.body.contains(&short), "{path} shows A's operation to B");
            }
            let d = get(&web, &format!("/executions/{name}"), &b);
            assert_eq!(d.status, 404);
            assert!(!d.body.contains("team-a-secret"));
            let dl = get(&web, &blob, &b);
            assert_eq!(dl.status, 404, "B downloads A's stdout by digest");
            assert!(!dl.body.contains("team-a-secret"));
            let cache = get(&web, "/cache", &b);
            assert!(
                !cache.body.contains("team-a"),
                "B sees only its own cache use"
            );
        }

        // An admin sees everyone's.
        let admin = page(&web, "/executions?tenant=team-a", Some("key-admin"));
        assert!(admin.body.contains(&short));
        let cache = page(&web, "/cache", Some("key-admin"));
        assert!(cache.body.contains("team-a"));
        let bogus = page(&web, "/blobs/zz/1", Some("key-admin"));
        assert_eq!(bogus.status, 400, "a malformed digest is refused");

        // Another site's page in the operator's browser: DNS rebinding (a
        // foreign Host on the loopback listener) and a cross-site sign-in.
        let rebound = get(
            &web,
            "/executions",
            &[
                ("host", "evil.example:80"),
                ("x-hearth-api-key", "key-admin"),
            ],
        );
        assert_eq!(rebound.status, 403);
        assert!(!rebound.body.contains(&short));
        let form = "key=key-b";
        let ctype = ("content-type", "application/x-www-form-urlencoded");
        let cross = request(
            &web,
            "POST",
            "/login",
            &[ctype, ("origin", "http://evil.example")],
            form,
        );
        assert_eq!(cross.status, 403, "a form posted from another site");
        assert!(cross.header("set-cookie").is_none());
        let own = format!("http://{web}");
        let signed = request(&web, "POST", "/login", &[ctype, ("origin", &own)], form);
        assert_eq!(
            signed.status, 303,
            "the sign-in form itself works: {}",
            signed.body
        );
        let cookie = signed.header("set-cookie").unwrap_or_default();
        assert!(cookie.starts_with("hearth_key=key-b;"), "{cookie}");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let wrong = request(&web, "POST", "/login", &[ctype], "key=nope");
        assert_eq!(wrong.status, 401);
        assert!(
            wrong.header("set-cookie").is_none(),
            "no cookie for a bad key"
        );
    })
    .await
    .expect("the page checks");
}
