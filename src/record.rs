//! The "record" stage of a request (`DESIGN.md`, step 6): what the request did, gathered while it runs
//! ([`Ctx`]), then, when its body is finished or dropped, one structured log event, the metrics, and a
//! ledger event. Nothing here blocks: the ledger only queues.

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Response};

use crate::app::App;
use crate::backend::Backend;
use crate::body::{Finished, ProxyBody};
use crate::ledger::{now_unix, Event, Outcome};
use crate::metrics::{FallbackLabels, RequestLabels, RouteBackend};

/// What one request did.
pub struct Ctx {
    started: Instant,
    pub method: Method,
    pub route: String,
    /// How the route was chosen (`ns`, `prefix`, `host`, `default`).
    pub via: &'static str,
    /// The route's migration target.
    pub target: String,
    /// The target backend, and whether the route warms it in the background.
    pub target_backend: Option<Arc<Backend>>,
    pub warm: bool,
    pub repo: String,
    pub kind: &'static str,
    pub reference: String,
    pub digest: Option<String>,
    /// The backend whose bytes were served ("union" for merged listings).
    pub served_by: String,
    pub from_cache: bool,
    pub attempts: Vec<String>,
    /// The target failed (as opposed to not having it).
    target_failed: bool,
    /// The target answered that it does not have it.
    target_missing: bool,
    /// Some backend failed (so "not found" cannot be concluded).
    pub any_failed: bool,
}

impl Ctx {
    pub fn new(method: Method) -> Ctx {
        Ctx {
            started: Instant::now(),
            method,
            route: String::new(),
            via: "",
            target: String::new(),
            target_backend: None,
            warm: false,
            repo: String::new(),
            kind: "",
            reference: String::new(),
            digest: None,
            served_by: String::new(),
            from_cache: false,
            attempts: Vec::new(),
            target_failed: false,
            target_missing: false,
            any_failed: false,
        }
    }

    /// A backend did not have it.
    pub fn missing(&mut self, backend: &Backend, what: impl std::fmt::Display) {
        self.attempts.push(format!("{}: {what}", backend.name));
        if *backend.name == *self.target {
            self.target_missing = true;
        }
    }

    /// A backend failed to answer.
    pub fn failed(&mut self, backend: &Backend, what: impl std::fmt::Display) {
        self.attempts.push(format!("{}: {what}", backend.name));
        self.any_failed = true;
        if *backend.name == *self.target {
            self.target_failed = true;
        }
    }

    /// Backends left out (down, or known to serve bad bytes): they count as failed.
    pub fn skipped(&mut self, skipped: &[crate::app::Skipped]) {
        for (n, why) in skipped {
            self.attempts.push(format!("{n}: {why}"));
            self.any_failed = true;
            if **n == *self.target {
                self.target_failed = true;
            }
        }
    }

    pub fn served(&mut self, backend: &str) {
        self.served_by = backend.to_owned();
    }

    /// Why the target did not serve, or `None` if it did (or this request is not about content).
    fn miss(&self) -> Option<Outcome> {
        if self.served_by == self.target {
            None
        } else if self.target_failed {
            Some(Outcome::Error)
        } else if self.served_by.is_empty() {
            Some(Outcome::Absent)
        } else {
            Some(Outcome::Fallback)
        }
    }

    /// Attach the record stage to the response: it runs when the body is done.
    pub fn finish(self, app: &App, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        let (metrics, recorder, warmer) = (app.metrics.clone(), app.recorder.clone(), app.warmer.clone());
        metrics.in_flight.inc();
        let (parts, body) = resp.into_parts();
        let locations = app.locations.clone();
        let body = body.on_finish(Box::new(move |finished| {
            let Finished { bytes, complete, mismatch, backend_error } = finished;
            let mut ctx = self;
            if backend_error && !ctx.served_by.is_empty() {
                // The backend cut its body: the next request for this digest must not go straight back.
                if let Some(d) = ctx.digest.as_ref().and_then(|d| d.parse::<crate::registry::Digest>().ok()) {
                    if locations.get(&d).is_some_and(|b| *b == *ctx.served_by) {
                        locations.invalidate(&d);
                    }
                }
            }
            if mismatch {
                // The backend's bytes were wrong: it did not serve this request, it failed.
                if ctx.served_by == ctx.target {
                    ctx.target_failed = true;
                }
                ctx.attempts.push(format!("{}: bytes did not match the digest", ctx.served_by));
                ctx.served_by.clear();
            }
            metrics.in_flight.dec();
            tracing::info!(
                method = %ctx.method,
                route = %ctx.route,
                via = ctx.via,
                repository = %ctx.repo,
                kind = ctx.kind,
                reference = %ctx.reference,
                served_by = %ctx.served_by,
                cache = ctx.from_cache,
                attempts = %ctx.attempts.join("; "),
                status,
                bytes,
                complete,
                duration_ms = ctx.started.elapsed().as_micros() as f64 / 1000.0,
                "request"
            );
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    route: ctx.route.clone(),
                    backend: ctx.served_by.clone(),
                    kind: ctx.kind.to_owned(),
                    method: ctx.method.to_string(),
                    status,
                })
                .inc();
            if bytes > 0 {
                metrics
                    .bytes
                    .get_or_create(&RouteBackend { route: ctx.route.clone(), backend: ctx.served_by.clone() })
                    .inc_by(bytes);
            }
            let content = matches!(ctx.kind, "manifest" | "blob");
            let asked = !ctx.served_by.is_empty() || !ctx.attempts.is_empty();
            if ctx.route.is_empty() || !content || !asked {
                return;
            }
            let miss = ctx.miss();
            // The target did not serve and another backend did: it lacked it (`fallback`) or failed
            // (`error`) alike.
            if !ctx.served_by.is_empty() && ctx.served_by != ctx.target {
                metrics
                    .fallbacks
                    .get_or_create(&FallbackLabels {
                        route: ctx.route.clone(),
                        from: ctx.target.clone(),
                        to: ctx.served_by.clone(),
                    })
                    .inc();
            }
            if ctx.warm && miss == Some(Outcome::Fallback) {
                if let (Some(target), Some(digest), Ok(repo)) =
                    (ctx.target_backend.clone(), ctx.digest.as_ref().and_then(|d| d.parse().ok()), ctx.repo.parse())
                {
                    warmer.submit(crate::warm::Job { target, route: ctx.route.clone(), repo, digest, kind: ctx.kind });
                }
            }
            // Traffic counts what backends served; an error body is nobody's traffic.
            let served_bytes = if ctx.served_by.is_empty() { 0 } else { bytes };
            let target_asked = ctx.target_missing || ctx.target_failed;
            recorder.record(Event {
                at: now_unix(),
                route: ctx.route,
                repository: ctx.repo,
                reference: ctx.reference,
                kind: ctx.kind,
                digest: ctx.digest,
                served_by: (!ctx.served_by.is_empty()).then_some(ctx.served_by),
                bytes: served_bytes,
                miss,
                target_asked,
                warmed: false,
            });
        }));
        Response::from_parts(parts, body)
    }
}
