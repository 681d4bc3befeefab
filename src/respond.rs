//! Building responses: the one place that turns an [`OciError`] into a status and JSON envelope, and
//! that copies the allow-listed headers of a backend answer (`DESIGN.md`, "Request path", step 5).
//!
//! Nothing else sets a status code for an error, and no backend header outside the allow-list reaches
//! a client (in particular no `WWW-Authenticate`, `Set-Cookie` or hop-by-hop header).

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Response, StatusCode};

use crate::body::ProxyBody;
use crate::registry::{ErrorCode, OciError, API_VERSION, API_VERSION_HEADER};

/// Backend response headers passed to the client.
pub const PASSED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "docker-content-digest",
    "etag",
    "content-range",
    "accept-ranges",
    // Referrers API (distribution-spec "Listing Referrers").
    "oci-filters-applied",
];

/// A response with the API version header; the body is dropped for HEAD.
pub fn response(method: &Method, status: StatusCode, headers: HeaderMap, body: ProxyBody) -> Response<ProxyBody> {
    let body = if method == Method::HEAD { ProxyBody::empty() } else { body };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r.headers_mut().insert(HeaderName::from_static(API_VERSION_HEADER), HeaderValue::from_static(API_VERSION));
    r
}

/// The OCI error envelope with its status. HEAD gets the status and headers only.
pub fn error(method: &Method, err: &OciError) -> Response<ProxyBody> {
    let body = err.body();
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if method != Method::HEAD {
        h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    if err.status() == http::StatusCode::METHOD_NOT_ALLOWED {
        // RFC 9110 §15.5.6: a 405 names the methods regmux serves.
        h.insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response(method, err.status(), h, ProxyBody::full(body))
}

/// 401 with a Basic challenge: the client must log in (`[server] htpasswd`).
pub fn unauthorized(method: &Method) -> Response<ProxyBody> {
    let mut r = error(method, &OciError::new(ErrorCode::Unauthorized));
    r.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"regmux\""));
    r
}

/// A JSON document with status 200.
pub fn json(method: &Method, body: String, mut headers: HeaderMap) -> Response<ProxyBody> {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    response(method, StatusCode::OK, headers, ProxyBody::full(body))
}

/// The allow-listed headers of a backend answer.
pub fn passed_headers(from: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(PASSED_HEADERS.len());
    for name in PASSED_HEADERS {
        for v in from.get_all(*name) {
            h.append(HeaderName::from_static(name), v.clone());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_headers_pass() {
        let mut from = HeaderMap::new();
        from.insert("content-type", HeaderValue::from_static("application/octet-stream"));
        from.insert("www-authenticate", HeaderValue::from_static("Bearer realm=x"));
        from.insert("set-cookie", HeaderValue::from_static("a=b"));
        from.insert("connection", HeaderValue::from_static("close"));
        from.insert("docker-content-digest", HeaderValue::from_static("sha256:x"));
        let h = passed_headers(&from);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("content-type") && h.contains_key("docker-content-digest"));
    }

    #[test]
    fn head_errors_have_no_body() {
        let r = error(&Method::HEAD, &OciError::new(ErrorCode::BlobUnknown));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(http_body::Body::is_end_stream(r.body()));
        assert_eq!(r.headers()[API_VERSION_HEADER], API_VERSION);
        let r = error(&Method::GET, &OciError::new(ErrorCode::BlobUnknown));
        assert!(!http_body::Body::is_end_stream(r.body()));
    }
}
