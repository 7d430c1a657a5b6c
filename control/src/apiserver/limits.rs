//! The request body limit as a tower layer: bodies over [`MAX_BODY_BYTES`] (3 MiB, as
//! kube-apiserver's) are refused with a 413 `Status`, at once when `Content-Length` says so,
//! else when a reader reaches the limit (the body is wrapped in a length-limited one), so no
//! handler can read past it.

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header;

use super::status::ApiError;

/// Largest request body accepted.
pub(crate) const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// The 413 answer.
pub(crate) fn too_large() -> ApiError {
    ApiError::new(
        413,
        "RequestEntityTooLarge",
        format!("the request body is larger than the limit of {MAX_BODY_BYTES} bytes"),
    )
}

/// Tower layer body.
pub(crate) async fn body_limit(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return too_large().into_response();
    }
    let (parts, body) = req.into_parts();
    let limited = Body::new(http_body_util::Limited::new(body, MAX_BODY_BYTES));
    next.run(Request::from_parts(parts, limited)).await
}

/// Reads a whole (limited) request body: 413 past the limit, 400 if the client broke off.
pub(crate) async fn read_all(body: Body) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        ApiError::bad_request(format!("the request body could not be read: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use tower::ServiceExt as _;

    fn app() -> Router {
        Router::new()
            .fallback(|req: Request| async move {
                match read_all(req.into_body()).await {
                    Ok(b) => b.len().to_string().into_response(),
                    Err(e) => e.into_response(),
                }
            })
            .layer(axum::middleware::from_fn(body_limit))
    }

    async fn send(body: Body, content_length: Option<usize>) -> (u16, String) {
        let mut req = http::Request::post("/api/v1/namespaces/a/configmaps");
        if let Some(n) = content_length {
            req = req.header(header::CONTENT_LENGTH, n);
        }
        let resp = app()
            .oneshot(req.body(body).expect("request"))
            .await
            .expect("infallible");
        let code = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn bodies_over_the_limit_get_413_declared_or_streamed() {
        let (code, body) = send(Body::from(vec![b'x'; 10]), Some(10)).await;
        assert_eq!((code, body.as_str()), (200, "10"));
        let (code, body) = send(Body::from("{}"), Some(MAX_BODY_BYTES + 1)).await;
        assert_eq!(code, 413, "{body}");
        assert!(body.contains("RequestEntityTooLarge"), "{body}");
        // No Content-Length (chunked): cut off when the reader reaches the limit.
        let chunks = futures::stream::iter(
            (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1024 * 1024]))),
        );
        let (code, body) = send(Body::from_stream(chunks), None).await;
        assert_eq!(code, 413, "{body}");
        let chunks = futures::stream::iter(
            (0..3).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1024 * 1024]))),
        );
        let (code, body) = send(Body::from_stream(chunks), None).await;
        assert_eq!((code, body.as_str()), (200, "3145728"));
    }
}
