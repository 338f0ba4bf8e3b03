//! The tower layer in front of every service: authenticates each call
//! ([`Auth::check`]) before tonic decodes it, and hands the caller's
//! [`Principal`] to the services in the request's extensions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{Auth, Presented, Principal};

#[derive(Clone)]
pub struct AuthLayer {
    auth: Auth,
}

impl AuthLayer {
    pub fn new(auth: Auth) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Auth,
}

/// The subject of the client certificate the connection presented, if any
/// (only a server with --tls-client-ca asks for one, and rustls has
/// verified it against that CA).
fn peer_subject<B>(req: &http::Request<B>) -> Option<String> {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    Some(cert.subject().to_string())
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let checked = {
            let presented = Presented {
                headers: req.headers(),
                // `grpc://KEY@host:port`: Bazel 2.1 sends it in :authority
                // (and ignores --remote_header), as BuildBuddy users write it.
                userinfo: req
                    .uri()
                    .authority()
                    .and_then(|a| a.as_str().rsplit_once('@'))
                    .map(|(user, _)| user),
                subject: peer_subject(&req),
            };
            self.auth.check(req.uri().path(), &presented)
        };
        match checked {
            Ok(principal) => {
                req.extensions_mut().insert::<Arc<Principal>>(principal);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                let response = status.into_http::<R>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
