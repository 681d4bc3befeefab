//! The accept loop: HTTP/1.1 and HTTP/2 (h2c) on one port through hyper-util's auto builder, a cap on
//! concurrent connections, header size and header-read time limits, and a graceful drain.
//!
//! The caller binds the listener (so tests bind 127.0.0.1:0) and says when to stop; `run` returns once
//! every connection has finished or the grace period has passed.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::app::App;
use crate::proxy;

#[derive(Debug, Clone)]
pub struct Limits {
    /// A client that has not sent its request headers within this time is disconnected.
    pub header_read_timeout: Duration,
    /// Larger request headers get 431.
    pub max_header_bytes: usize,
    /// Connections beyond this wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long streams in flight may finish after a stop was asked for.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            grace: Duration::from_secs(30),
        }
    }
}

/// Serve `listener` until `shutdown` resolves, then drain.
pub async fn run(listener: TcpListener, app: Arc<App>, limits: Limits, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
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
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(proxy::handle(app, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(grace_s = limits.grace.as_secs(), "stopped accepting; draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(limits.grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}
