//! The HTTP client under every request regmux sends a backend: hyper's pooled client over
//! rustls, configured directly so that its memory per connection is bounded.
//!
//! reqwest's client (used for tokens and health probes) lets hyper's HTTP/1 read buffer grow to
//! 400 KiB per connection whenever the backend is faster than the client reading from regmux; with
//! hundreds of concurrent pulls that buffer was most of regmux's memory. Here it is capped at
//! [`READ_BUFFER`], except for the first [`WIDE_STREAMS`] GETs in flight, which get the wide buffer
//! that a fast stream needs to be cheap. Responses are handed on as `reqwest::Response` (same headers, a streamed body), so
//! nothing above this module changes. Redirects are followed here, dropping the credential when the
//! redirect leaves the backend's origin (object storage must never see it); a body that stays idle for
//! the backend's `timeout` ends with an error, as a cut body does.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::auth::Secret;
use super::FetchError;
use crate::config::Redirects;

/// The most a backend connection's HTTP/1 read buffer may hold. Measured with bench/run.sh (256
/// concurrent pulls of a 64 MiB blob, half of them slow): peak RSS 233 MiB with hyper's default of
/// 400 KiB, 52 MiB with 64 KiB. Small buffers cost CPU on a fast stream, though (2.1 instead of 1.6 s
/// per GiB verified: six times as many chunks, each a wake-up of the client connection's task and of
/// the peers on both sockets), so the first [`WIDE_STREAMS`] GETs in flight use [`WIDE_READ_BUFFER`].
pub const READ_BUFFER: usize = 64 * 1024;
/// The read buffer of the wide pool: hyper's default.
pub const WIDE_READ_BUFFER: usize = 400 * 1024;
/// GETs in flight, process-wide, that may use the wide pool: this bounds the memory the wide buffers
/// take (about 1 MiB each, buffer and chunks in flight) however many pulls run.
pub const WIDE_STREAMS: usize = 8;
static WIDE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(WIDE_STREAMS);
/// Redirect hops followed before giving up (reqwest's limit, which regmux used before).
pub const MAX_REDIRECTS: usize = 5;
const USER_AGENT: &str = concat!("regmux/", env!("CARGO_PKG_VERSION"));

type Inner = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone, Debug)]
pub struct Transport {
    client: Inner,
    /// The same, with [`WIDE_READ_BUFFER`]; used while a [`WIDE`] permit is free.
    wide: Inner,
    redirects: Redirects,
    /// How long until response headers (each hop), and how long a body may stay idle.
    timeout: Duration,
}

impl Transport {
    pub fn new(
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        timeout: Duration,
        redirects: Redirects,
    ) -> Transport {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let build = |buffer: usize, idle: usize| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(idle)
                .http1_max_buf_size(buffer)
                // HTTP/2 (TLS backends that offer it): the window follows the link's bandwidth-delay
                // product instead of hyper's fixed 2 MiB per stream, so a slow client does not let a
                // fast backend park megabytes here.
                .http2_adaptive_window(true)
                .timer(TokioTimer::new())
                .build(https.clone())
        };
        Transport { client: build(READ_BUFFER, 64), wide: build(WIDE_READ_BUFFER, WIDE_STREAMS), redirects, timeout }
    }

    /// Send a request, following redirects as configured. `authorization` is sent to the backend's
    /// origin only.
    pub async fn send(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        authorization: Option<&Secret>,
        body: Option<Bytes>,
    ) -> Result<reqwest::Response, FetchError> {
        let mut url = reqwest::Url::parse(url).map_err(|_| FetchError::BadLocation)?;
        let origin = url.origin();
        let (mut method, mut body) = (method.clone(), body);
        // Held by the response body until it is dropped.
        let wide = if method == Method::GET { WIDE.try_acquire().ok() } else { None };
        let client = if wide.is_some() { &self.wide } else { &self.client };
        let mut hops = 0;
        loop {
            let credential = authorization.filter(|_| url.origin() == origin);
            let request = self.request(&method, url.as_str(), headers, credential, body.clone())?;
            let resp = match tokio::time::timeout(self.timeout, client.request(request)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(FetchError::Transport(e)),
                Err(_) => return Err(FetchError::Timeout(self.timeout)),
            };
            let status = resp.status();
            let location = resp.headers().get(http::header::LOCATION).and_then(|v| v.to_str().ok());
            let next = match (self.redirects, status.is_redirection(), location) {
                (Redirects::Follow, true, Some(l)) => url.join(l).map_err(|_| FetchError::BadLocation)?,
                _ => return Ok(self.to_response(resp, wide)),
            };
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(FetchError::TooManyRedirects(MAX_REDIRECTS));
            }
            if matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND | StatusCode::SEE_OTHER)
                && method != Method::HEAD
            {
                method = Method::GET;
                body = None;
            }
            url = next;
        }
    }

    fn request(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        authorization: Option<&Secret>,
        body: Option<Bytes>,
    ) -> Result<http::Request<Full<Bytes>>, FetchError> {
        let mut req = http::Request::builder().method(method.clone()).uri(url);
        let h = req.headers_mut().expect("a fresh builder has headers");
        for (k, v) in headers {
            h.append(k, v.clone());
        }
        h.insert(http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT));
        if let Some(a) = authorization {
            let mut v = http::HeaderValue::from_str(&a.0).map_err(|_| FetchError::Unauthorized)?;
            v.set_sensitive(true);
            h.insert(http::header::AUTHORIZATION, v);
        }
        req.body(Full::new(body.unwrap_or_default())).map_err(|_| FetchError::BadLocation)
    }

    fn to_response(
        &self,
        resp: http::Response<hyper::body::Incoming>,
        wide: Option<tokio::sync::SemaphorePermit<'static>>,
    ) -> reqwest::Response {
        let (parts, body) = resp.into_parts();
        let body = reqwest::Body::wrap(IdleTimeout { _permit: wide, ..IdleTimeout::new(body, self.timeout) });
        reqwest::Response::from(http::Response::from_parts(parts, body))
    }
}

/// A body that fails when no frame arrives for `idle` (a backend that stops sending mid-body).
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// A wide-pool permit, given back when the body is dropped.
    _permit: Option<tokio::sync::SemaphorePermit<'static>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> IdleTimeout<B> {
        IdleTimeout { inner, idle, deadline: Box::pin(tokio::time::sleep(idle)), _permit: None }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for {0:?}")]
pub struct Idle(Duration);

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.deadline.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Idle(this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
