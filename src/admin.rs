//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process answers),
//! `/readyz` (configuration loaded, ledger writable, every route has a backend in use) and `/ui`.
//!
//! It is a separate port (default 127.0.0.1:9100) so that the registry port exposes nothing but the
//! registry API.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::app::App;
use crate::metrics::BackendLabel;

/// Serve the admin endpoints until the process ends.
pub async fn run(listener: TcpListener, app: Arc<App>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

async fn handle<B>(app: &App, req: Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            refresh_gauges(app);
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", app.metrics.encode())
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let r = readiness(app);
            let status = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            reply(status, "application/json", serde_json::to_string(&r).unwrap_or_default())
        }
        "/ui" | "/ui/" => reply(StatusCode::OK, "text/html; charset=utf-8", crate::ui::PAGE),
        "/ui/data.json" => match crate::ui::data(app).await {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{e}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn refresh_gauges(app: &App) {
    let snap = app.snapshot();
    for (name, b) in &snap.backends {
        app.metrics
            .backend_up
            .get_or_create(&BackendLabel { backend: name.clone() })
            .set(i64::from(!b.health.is_down()));
    }
    let stats = &app.recorder.stats;
    app.metrics.ledger_queue.set(stats.depth() as i64);
    catch_up(&app.metrics.ledger_dropped, stats.dropped.load(Ordering::Relaxed));
    app.metrics.ledger_writable.set(i64::from(!stats.failing.load(Ordering::Relaxed)));
    let w = &app.warmer.stats;
    for (result, n) in [
        ("warmed", &w.warmed),
        ("failed", &w.failed),
        ("dropped", &w.dropped),
        ("claimed_elsewhere", &w.claimed_elsewhere),
    ] {
        catch_up(&app.metrics.warms.get_or_create(&crate::metrics::WarmLabels { result }), n.load(Ordering::Relaxed));
    }
}

/// Bring a counter that mirrors a count kept elsewhere up to it. `fetch_max`: two scrapes racing
/// never make the counter go back.
fn catch_up(counter: &prometheus_client::metrics::counter::Counter, n: u64) {
    counter.inner().fetch_max(n, Ordering::Relaxed);
}

#[derive(serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub config: &'static str,
    pub ledger: String,
    pub routes: Vec<RouteReadiness>,
}

#[derive(serde::Serialize)]
pub struct RouteReadiness {
    pub route: String,
    pub ready: bool,
    pub backends_up: Vec<String>,
    pub backends_down: Vec<String>,
}

pub fn readiness(app: &App) -> Readiness {
    let snap = app.snapshot();
    let stats = &app.recorder.stats;
    let failing = stats.failing.load(Ordering::Relaxed) && stats.depth() > 0;
    // A replica whose own SQLite file cannot be written is not ready (another replica can record);
    // a shared database that is down affects every replica alike, so they all keep serving while
    // their records wait in the queue.
    let (ledger, ledger_ready) = match &app.recorder.ledger {
        None => ("disabled".to_owned(), true),
        Some(_) if !failing => ("ok".to_owned(), true),
        Some(l) if l.is_shared() => (format!("unavailable: {} events queued, retrying", stats.depth()), true),
        Some(_) => ("write errors".to_owned(), false),
    };
    let mut routes = Vec::new();
    for r in snap.router.routes() {
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for b in &r.backends {
            match snap.backends.get(b) {
                Some(be) if !be.health.is_down() => up.push(b.clone()),
                _ => down.push(b.clone()),
            }
        }
        routes.push(RouteReadiness {
            route: r.name.clone(),
            ready: !up.is_empty(),
            backends_up: up,
            backends_down: down,
        });
    }
    let ready = ledger_ready && routes.iter().all(|r| r.ready);
    Readiness { ready, config: "loaded", ledger, routes }
}
