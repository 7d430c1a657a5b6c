//! The in-process transport: requests handed to an API server running in the same process as
//! a plain function call on its router, the way k3s runs its components in one process.
//!
//! No socket, TLS or HTTP/2 framing, but the request is the same `http::Request` with the same
//! bearer token, so it goes through the server's authentication, authorization, admission and
//! request logging like any other. `apiclient` cannot depend on the server's crate (the node
//! agent uses `apiclient`, and the agent may not depend on the control plane), so the server
//! is reached through the [`LocalService`] trait object its crate implements.
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http_body_util::Full;

/// Error type of answer bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of an answer, whichever transport carried it.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A future answer of a [`LocalService`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = http::Response<ResponseBody>> + Send>>;

/// An API server callable in-process. The request's URI carries only path and query.
pub trait LocalService: Send + Sync + 'static {
    /// Handles one request; errors are answers (`Status` objects), as over the wire.
    fn call(&self, req: http::Request<Full<Bytes>>) -> ResponseFuture;
}

impl<F> LocalService for F
where
    F: Fn(http::Request<Full<Bytes>>) -> ResponseFuture + Send + Sync + 'static,
{
    fn call(&self, req: http::Request<Full<Bytes>>) -> ResponseFuture {
        self(req)
    }
}
