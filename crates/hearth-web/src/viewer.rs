//! Who is looking: the API key a page request carries, in the
//! `x-hearth-api-key` (or `x-buildbuddy-api-key`, or `Authorization:
//! Bearer`) header or in the `hearth_key` cookie the login form sets.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use hearth_api::auth::{Presented, Principal};
use hearth_api::Context;
use maud::html;

use crate::layout;

const COOKIE: &str = "hearth_key";
/// The path the web view checks keys against: any valid key may look.
const VIEW_PATH: &str = "/hearth.web.v1.Web/View";

/// The caller of a page, or the response that asks for a key.
pub(crate) fn viewer(ctx: &Context, headers: &HeaderMap) -> Result<Arc<Principal>, Box<Response>> {
    let mut presented = headers.clone();
    if let Some(key) = cookie(headers, COOKIE) {
        if !presented.contains_key("x-hearth-api-key") {
            if let Ok(v) = HeaderValue::from_str(&key) {
                presented.insert("x-hearth-api-key", v);
            }
        }
    }
    let creds = Presented {
        headers: &presented,
        userinfo: None,
        subject: None,
    };
    ctx.auth
        .check(VIEW_PATH, &creds)
        .map_err(|status| Box::new(login_page(StatusCode::UNAUTHORIZED, status.message())))
}

/// Only this tenant's records, unless the viewer sees every tenant's.
pub(crate) fn tenant_scope(who: &Principal) -> Option<String> {
    (!who.sees_all_tenants()).then(|| who.tenant.clone())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

fn login_page(status: StatusCode, why: &str) -> Response {
    let body = html! {
        h1 { "Sign in" }
        p.muted { (why) }
        form method="post" action="/login" {
            label for="key" { "API key " }
            input id="key" name="key" type="password" autocomplete="off" size="40";
            " "
            button type="submit" { "Show" }
        }
    };
    (status, layout::page("Sign in", None, body)).into_response()
}

#[derive(serde::Deserialize)]
pub(crate) struct Login {
    key: String,
}

/// Checks the key and keeps it in a cookie that only this site's own pages
/// send (`SameSite=Strict`, `HttpOnly`: no script can read it).
pub(crate) async fn login(State(ctx): State<Context>, Form(form): Form<Login>) -> Response {
    let key = form.key.trim().to_string();
    let mut headers = HeaderMap::new();
    let Ok(value) = HeaderValue::from_str(&key) else {
        return login_page(StatusCode::UNAUTHORIZED, "that is not an API key");
    };
    headers.insert("x-hearth-api-key", value);
    if let Err(resp) = viewer(&ctx, &headers) {
        return *resp;
    }
    let cookie = format!("{COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict");
    match HeaderValue::from_str(&cookie) {
        Ok(c) => ([(header::SET_COOKIE, c)], Redirect::to("/executions")).into_response(),
        Err(_) => login_page(
            StatusCode::BAD_REQUEST,
            "that key cannot be kept in a cookie",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; hearth_key=k2 ; b=3"),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("k2"));
        assert_eq!(cookie(&h, "none"), None);
    }
}
