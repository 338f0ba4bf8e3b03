//! The tower layer that counts gRPC calls by service, method and status
//! code, and times them (`hearth_grpc_requests_total`,
//! `hearth_grpc_request_duration_seconds`).
//!
//! A call's status arrives in the response headers (a "trailers-only"
//! error) or in the trailers at the end of its body, so the body is wrapped
//! and the call is recorded when the body ends or is dropped. Labels come
//! from a fixed table of the methods Hearth serves: a client calling made-up
//! paths cannot grow the label set.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use metrics::{counter, histogram};

/// Every method served, by service.
const METHODS: &[(&str, &[&str])] = &[
    (
        "build.bazel.remote.execution.v2.Execution",
        &["Execute", "WaitExecution"],
    ),
    (
        "build.bazel.remote.execution.v2.ActionCache",
        &["GetActionResult", "UpdateActionResult"],
    ),
    (
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        &[
            "FindMissingBlobs",
            "BatchUpdateBlobs",
            "BatchReadBlobs",
            "GetTree",
            "SplitBlob",
            "SpliceBlob",
        ],
    ),
    (
        "build.bazel.remote.execution.v2.Capabilities",
        &["GetCapabilities"],
    ),
    (
        "google.bytestream.ByteStream",
        &["Read", "Write", "QueryWriteStatus"],
    ),
    (
        "google.longrunning.Operations",
        &[
            "ListOperations",
            "GetOperation",
            "DeleteOperation",
            "CancelOperation",
            "WaitOperation",
        ],
    ),
    ("hearth.worker.v1.WorkerService", &["Session", "Status"]),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
];

/// The (service, method) labels of a request path; `unknown` for both when
/// it names no method Hearth serves.
pub fn labels(path: &str) -> (&'static str, &'static str) {
    let parsed = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .and_then(|(service, method)| {
            let (s, methods) = METHODS.iter().find(|(s, _)| *s == service)?;
            let m = methods.iter().find(|m| **m == method)?;
            Some((*s, *m))
        });
    parsed.unwrap_or(("unknown", "unknown"))
}

/// The name of a gRPC status code, as Prometheus label values go.
fn code_name(code: &str) -> &'static str {
    match code.parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::Unknown) => "UNKNOWN",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        Err(_) => "UNKNOWN",
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<&'static str> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(code_name)
}

#[derive(Clone, Default)]
pub struct RequestMetricsLayer;

impl<S> tower_layer::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics { inner }
    }
}

#[derive(Clone)]
pub struct RequestMetrics<S> {
    inner: S,
}

/// One call being timed: recorded once, when its status is known or its
/// body goes away.
struct Call {
    service: &'static str,
    method: &'static str,
    started: Instant,
    /// The status the headers carried, if any.
    header_status: Option<&'static str>,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Option<&'static str>) {
        if self.done {
            return;
        }
        self.done = true;
        // A body dropped before its trailers is a call the client cancelled
        // (or a connection that broke).
        let code = code.or(self.header_status).unwrap_or("CANCELLED");
        counter!(
            "hearth_grpc_requests_total",
            "service" => self.service,
            "method" => self.method,
            "code" => code
        )
        .increment(1);
        histogram!(
            "hearth_grpc_request_duration_seconds",
            "service" => self.service,
            "method" => self.method
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(None);
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call when it ends.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Call,
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.call.finish(status_in(trailers));
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(Some("UNKNOWN")),
            Poll::Ready(None) => {
                let code = this.call.header_status;
                this.call.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B, R> tower_service::Service<http::Request<B>> for RequestMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Body + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = labels(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            let call = Call {
                service,
                method,
                started,
                header_status: status_in(response.headers()),
                done: false,
            };
            Ok(response.map(|inner| MeteredBody { inner, call }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_the_served_methods_only() {
        assert_eq!(
            labels("/build.bazel.remote.execution.v2.Execution/Execute"),
            ("build.bazel.remote.execution.v2.Execution", "Execute")
        );
        assert_eq!(
            labels("/google.bytestream.ByteStream/Read"),
            ("google.bytestream.ByteStream", "Read")
        );
        for made_up in [
            "/build.bazel.remote.execution.v2.Execution/Exfiltrate",
            "/evil.Service/Execute",
            "/",
            "",
            "no-slash",
        ] {
            assert_eq!(labels(made_up), ("unknown", "unknown"), "{made_up}");
        }
    }

    #[test]
    fn status_codes_are_named() {
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("5"), "NOT_FOUND");
        assert_eq!(code_name("x"), "UNKNOWN");
    }
}
