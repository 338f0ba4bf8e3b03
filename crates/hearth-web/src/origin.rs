//! Requests from other sites. A page on any website can make the browser
//! of someone running `hearth up` send requests to 127.0.0.1; with DNS
//! rebinding it can even read the answers, as if it were this site. So on a
//! loopback address the web view answers only requests whose `Host` names
//! the loopback address it listens on, and it takes a sign-in form (the
//! one request that changes anything) only from its own pages.

use std::net::SocketAddr;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The `Host` values a loopback listener on `port` accepts.
fn loopback_host(host: &str, port: u16) -> bool {
    [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ]
    .iter()
    .any(|h| h.eq_ignore_ascii_case(host))
}

/// Whether a request may be answered by a listener bound to `bound`.
pub(crate) fn allowed(req: &Request, bound: SocketAddr) -> Result<(), &'static str> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if bound.ip().is_loopback() && !loopback_host(host, bound.port()) {
        return Err("this web view answers only to its loopback address");
    }
    if req.method() == axum::http::Method::POST {
        // Browsers send Origin with every cross-site POST.
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .is_some_and(|(_, h)| h.eq_ignore_ascii_case(host));
            if !same {
                return Err("a form from another site");
            }
        }
    }
    Ok(())
}

/// The middleware: refuses what [`allowed`] does not let through.
pub(crate) async fn guard(bound: SocketAddr, req: Request, next: Next) -> Response {
    match allowed(&req, bound) {
        Ok(()) => next.run(req).await,
        Err(why) => (StatusCode::FORBIDDEN, why).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, host: &str, origin: Option<&str>) -> Request {
        let mut b = axum::http::Request::builder()
            .method(method)
            .uri("/")
            .header(header::HOST, host);
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn rebinding_and_cross_site_forms_are_refused() {
        let lo: SocketAddr = "127.0.0.1:1986".parse().unwrap();
        assert!(allowed(&req("GET", "127.0.0.1:1986", None), lo).is_ok());
        assert!(allowed(&req("GET", "localhost:1986", None), lo).is_ok());
        assert!(allowed(&req("GET", "evil.example:1986", None), lo).is_err());
        assert!(allowed(&req("GET", "127.0.0.1:1987", None), lo).is_err());
        assert!(allowed(
            &req("POST", "127.0.0.1:1986", Some("http://127.0.0.1:1986")),
            lo
        )
        .is_ok());
        assert!(allowed(
            &req("POST", "127.0.0.1:1986", Some("http://evil.example")),
            lo
        )
        .is_err());
        let any: SocketAddr = "0.0.0.0:1986".parse().unwrap();
        assert!(allowed(&req("GET", "hearth.internal:1986", None), any).is_ok());
        assert!(allowed(
            &req("POST", "hearth.internal:1986", Some("https://evil.example")),
            any
        )
        .is_err());
    }
}
