//! `/blobs/<hash>/<size>`: a blob from the CAS as the viewer may read it,
//! streamed in chunks, always as a download (`attachment`, `nosniff`) so
//! an action's output is never rendered as a page of this site.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream;
use hearth_api::Context;
use hearth_proto::reapi;
use hearth_storage::Digest;

use crate::executions::urlencode;
use crate::layout;
use crate::viewer::viewer;

/// Bytes read from the store per chunk of a download.
const CHUNK: u64 = 1 << 20;

/// The link that downloads `d` as a file called `name`.
pub(crate) fn blob_link(d: &reapi::Digest, name: &str) -> String {
    format!(
        "/blobs/{}/{}?name={}",
        d.hash,
        d.size_bytes,
        urlencode(name)
    )
}

#[derive(serde::Deserialize)]
pub(crate) struct Params {
    name: Option<String>,
}

/// A file name fit for Content-Disposition: its last path part, with
/// anything but a safe set of characters replaced.
fn file_name(name: Option<&str>, d: &Digest) -> String {
    let base = name
        .and_then(|n| n.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.chars()
                .take(100)
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        });
    base.unwrap_or_else(|| d.hash_hex())
}

pub(crate) async fn download(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path((hash, size)): Path<(String, i64)>,
    Query(params): Query<Params>,
) -> Response {
    let who = match viewer(&ctx, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let digest = match Digest::parse(&hash, size) {
        Ok(d) => d,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let cas = ctx.store_for(&who);
    // Missing to this viewer (never uploaded by its tenant) reads as gone.
    match cas.find_missing(&[digest]).await {
        Ok(missing) if missing.is_empty() => {}
        Ok(_) => return layout::not_found(&who, &format!("No blob {digest} here.")),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
    let chunks = stream::try_unfold(0u64, move |offset| {
        let cas = cas.clone();
        async move {
            if offset >= digest.size() {
                return Ok::<_, std::io::Error>(None);
            }
            let limit = CHUNK.min(digest.size() - offset);
            let bytes = cas
                .read(&digest, offset, Some(limit))
                .await
                .map_err(std::io::Error::other)?;
            if bytes.is_empty() {
                return Err(std::io::Error::other("the blob ended early"));
            }
            let next = offset + bytes.len() as u64;
            Ok(Some((bytes, next)))
        }
    });
    let disposition = format!(
        "attachment; filename=\"{}\"",
        file_name(params.name.as_deref(), &digest)
    );
    let mut response = Body::from_stream(chunks).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(digest.size()));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_cannot_break_the_header() {
        let d = Digest::of(b"x");
        assert_eq!(file_name(Some("out/lib.so"), &d), "lib.so");
        assert_eq!(
            file_name(Some("a\"; evil=\r\n.txt"), &d),
            "a___evil=__.txt".replace('=', "_")
        );
        assert_eq!(file_name(None, &d), d.hash_hex());
        assert_eq!(file_name(Some("dir/"), &d), d.hash_hex());
    }
}
