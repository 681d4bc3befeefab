//! The accept loop: HTTP/1.1 and HTTP/2 (h2c) on one port through hyper-util's auto builder, a cap on
//! concurrent connections, header size and header-read time limits, an idle timeout for every
//! connection, and a graceful drain.
//!
//! The caller binds the listener (so tests bind 127.0.0.1:0) and says when to stop; `run` returns once
//! every connection has finished or the grace period has passed.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::app::App;
use crate::config::ServerConfig;
use crate::proxy;

#[derive(Debug, Clone)]
pub struct Limits {
    /// A client that has not sent its request headers within this time is disconnected, and a
    /// connection with no request in progress for this long (an idle HTTP/1.1 keep-alive connection,
    /// an HTTP/2 connection without open streams) is closed, so idle clients cannot hold every slot.
    pub header_read_timeout: Duration,
    /// Larger request headers get 431.
    pub max_header_bytes: usize,
    /// Connections beyond this wait in the kernel's accept queue (`[server] max_connections`).
    pub max_connections: usize,
    /// How long streams in flight may finish after a stop was asked for (`[server] shutdown_grace`).
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            grace: crate::config::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl Limits {
    /// The defaults with `[server] max_connections` and `shutdown_grace` applied.
    pub fn from_config(server: &ServerConfig) -> Limits {
        Limits::default().with_config(server)
    }

    /// `self`, with the `[server]` keys that are set taking precedence.
    pub fn with_config(mut self, server: &ServerConfig) -> Limits {
        if server.max_connections.is_some() {
            self.max_connections = server.max_connections();
        }
        if server.shutdown_grace.is_some() {
            self.grace = server.shutdown_grace();
        }
        self
    }
}

/// An HTTP/2 keep-alive PING (sent after the idle timeout without a frame from the client) that gets
/// no answer within this closes the connection: a peer that vanished while a stream was open, which
/// would otherwise hold the stream and its slot forever. Generous, because the PING queues behind the
/// data already in the socket's send buffer (up to a few MiB) that a slow but live client must read
/// first.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(60);

/// After an idle connection was asked to close (or a stop was asked for while it was idle), how long
/// it may take to go away before it is dropped: an HTTP/2 client may never acknowledge the GOAWAY.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Load `tls_cert` / `tls_key` (PEM) into a server configuration offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| TlsError(format!("{}: {e}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, &e))?;
    if certs.is_empty() {
        return Err(err(cert, &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, &e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

/// Serve `listener` until `shutdown` resolves, then drain. With `tls`, every connection is TLS.
/// `[server] max_connections` and `shutdown_grace` of the configuration `app` started with, when
/// set, take precedence over `limits` (neither changes on reload).
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let limits = limits.with_config(&app.snapshot().config.server);
    let idle = limits.header_read_timeout;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(idle)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    // Every connection task holds a clone of `alive`: once all are gone, `drained` yields None.
    let (alive, mut drained) = mpsc::channel::<()>(1);
    let (stop, stopped) = watch::channel(false);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tracing::debug!(max_connections = limits.max_connections, grace_s = limits.grace.as_secs_f64(), "server limits");
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (builder, app, tls, stopped, alive) =
            (builder.clone(), app.clone(), tls.clone(), stopped.clone(), alive.clone());
        tokio::spawn(async move {
            let activity = Arc::new(Activity::new());
            let stream = Watched { io: stream, activity: activity.clone() };
            let result = match tls {
                None => serve_io(&builder, stopped, app, stream, activity, idle).await,
                Some(acceptor) => match tokio::time::timeout(idle, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => serve_io(&builder, stopped, app, tls_stream, activity, idle).await,
                    Ok(Err(e)) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                    Err(_) => Err("TLS handshake timed out".into()),
                },
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
            drop(alive);
        });
    }
    drop(listener);
    drop(alive);
    stop.send_replace(true);
    tracing::info!(grace_s = limits.grace.as_secs_f64(), "stopped accepting; draining connections");
    tokio::select! {
        _ = drained.recv() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(limits.grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Requests in progress on one connection, since when it has had none, and whether bytes wait for
/// the client.
struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// The last write found the socket full: hyper holds bytes a slow client has not taken yet.
    /// (Whether bytes went out lately does not count: HTTP/2 keep-alive PINGs are writes too.)
    blocked: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity { open: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()), blocked: AtomicBool::new(false) }
    }

    /// Since when the connection has had no request in progress and nothing left to send; `None`
    /// while a request is in progress or bytes wait for the client. A response body is done once
    /// hyper has taken its last chunk, which may still be queued for a slow client: until the socket
    /// has taken it, the connection is not idle.
    fn quiet_since(&self) -> Option<Instant> {
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        if self.open.load(Ordering::SeqCst) != 0 || self.blocked.load(Ordering::Relaxed) {
            return None;
        }
        Some(since)
    }

    /// No request in progress, but the end of the last response still waits for the client.
    fn sending(&self) -> bool {
        self.open.load(Ordering::SeqCst) == 0 && self.blocked.load(Ordering::Relaxed)
    }

    /// Note how a write went.
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self.blocked.store(false, Ordering::Relaxed),
            Poll::Pending => self.blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
}

/// The connection's socket, noting in its [`Activity`] how each write went.
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.activity.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One request in progress: from the service call until its response body was sent or dropped.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn new(activity: &Arc<Activity>) -> InProgress {
        activity.open.fetch_add(1, Ordering::SeqCst);
        InProgress(activity.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in progress until hyper drops it.
struct Tracked<B> {
    inner: B,
    _request: InProgress,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve one connection until it ends, closing it once it has had no request in progress for `idle`
/// (never started one, an idle HTTP/1.1 keep-alive, an HTTP/2 connection without open streams): the
/// protocol sniffing of hyper-util waits without a timer for a client that sends nothing (or half an
/// HTTP/2 preface), and hyper's HTTP/2 server has no idle timeout, so such a connection would
/// otherwise hold a connection slot forever. When `stop` turns true the connection is shut down
/// gracefully: requests in progress finish, no new one starts.
async fn serve_io<I>(
    builder: &auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
    app: Arc<App>,
    io: I,
    activity: Arc<Activity>,
    idle: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let counter = activity.clone();
    let service = service_fn(move |req| {
        let request = InProgress::new(&counter);
        let app = app.clone();
        async move {
            let resp = proxy::handle(app, req).await;
            Ok::<_, Infallible>(resp.map(|inner| Tracked { inner, _request: request }))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
    tokio::pin!(conn);
    // Whether graceful_shutdown was asked, and when a connection asked to close is dropped if idle.
    let mut shut = false;
    let mut close_by: Option<Instant> = None;
    loop {
        if !shut && *stop.borrow() {
            shut = true;
            conn.as_mut().graceful_shutdown();
            close_by = Some(Instant::now() + CLOSE_WAIT);
        }
        let wake = close_by.unwrap_or_else(|| match activity.quiet_since() {
            Some(since) => since + idle,
            None => Instant::now() + idle,
        });
        tokio::select! {
            r = &mut conn => return r,
            r = stop.changed(), if !shut => {
                if r.is_err() {
                    // The server is gone; treat it as a stop.
                    shut = true;
                    conn.as_mut().graceful_shutdown();
                    close_by = Some(Instant::now() + CLOSE_WAIT);
                }
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let quiet = activity.quiet_since();
                match close_by {
                    Some(t) if now >= t => {
                        if let Some(since) = quiet {
                            // Asked to close, nothing in progress, nothing left to send.
                            if now >= since + CLOSE_WAIT {
                                return Err(format!("asked to close and quiet for {CLOSE_WAIT:?}; dropped").into());
                            }
                            close_by = Some(since + CLOSE_WAIT);
                        } else if activity.sending() {
                            // The end of a response still goes out to a slow client: let it (a stop
                            // is bounded by the grace period; a vanished HTTP/2 peer by its PINGs).
                            close_by = Some(now + CLOSE_WAIT);
                        } else {
                            // A request is still in progress: wait for it, then count again.
                            close_by = None;
                        }
                    }
                    Some(_) => {}
                    None => {
                        if quiet.is_some_and(|since| now >= since + idle) {
                            tracing::debug!(?idle, "closing an idle connection");
                            if !shut {
                                shut = true;
                                conn.as_mut().graceful_shutdown();
                            }
                            close_by = Some(now + CLOSE_WAIT);
                        }
                    }
                }
            }
        }
    }
}
