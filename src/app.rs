//! The running service's shared state: the current configuration snapshot (routes and backends, swapped
//! whole on reload so a request in flight keeps the snapshot it started with) and the caches that
//! outlive a reload (where each digest was found, manifests by digest, backends caught serving bad bytes).
//!
//! The caches are bounded; they only ever make a request cheaper, never change its answer.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;

use crate::backend::{health, Backend, BuildError};
use crate::clientauth::{Htpasswd, HtpasswdError};
use crate::config::Config;
use crate::ledger::Recorder;
use crate::metrics::Metrics;
use crate::registry::Digest;
use crate::route::{Route, Router};

/// A backend left out of a request, and why.
pub type Skipped = (Arc<str>, &'static str);

/// One consistent view of the configuration.
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub backends: HashMap<String, Arc<Backend>>,
    /// Client credentials, when `[server] htpasswd` is set.
    pub htpasswd: Option<Htpasswd>,
}

/// A validated configuration that still cannot be put to work (a secret file unreadable, say).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Backend(#[from] BuildError),
    #[error(transparent)]
    Htpasswd(#[from] HtpasswdError),
}

impl Snapshot {
    pub fn new(config: Config, metrics: &Arc<Metrics>) -> Result<Snapshot, SnapshotError> {
        let router = Router::new(&config);
        let htpasswd = config.server.htpasswd.as_deref().map(Htpasswd::load).transpose()?;
        let mut backends = HashMap::new();
        for (name, b) in &config.backends {
            backends.insert(name.clone(), Arc::new(Backend::new(name, b, metrics.clone())?));
        }
        Ok(Snapshot { config, router, backends, htpasswd })
    }

    /// The route's backends in the order to try them: the one that last served `digest` first, then
    /// the configured order. Left out, and named in the second list with the reason: backends that
    /// served bad bytes for `digest`, and backends marked down (unless every one is down: then they are
    /// tried anyway, a probe may simply not have run yet).
    pub fn candidates(&self, app: &App, route: &Route, digest: Option<&Digest>) -> (Vec<Arc<Backend>>, Vec<Skipped>) {
        let mut out: Vec<Arc<Backend>> = Vec::with_capacity(route.backends.len());
        let mut skipped = Vec::new();
        let hint = digest.and_then(|d| app.locations.get(d)).filter(|h| route.backends.iter().any(|b| **b == **h));
        for name in hint.iter().map(|h| &**h).chain(route.backends.iter().map(String::as_str)) {
            let Some(b) = self.backends.get(name) else { continue };
            if out.iter().any(|o| o.name == b.name) {
                continue;
            }
            if digest.is_some_and(|d| app.bad.contains_key(&(b.name.clone(), d.clone()))) {
                skipped.push((b.name.clone(), "served bad bytes for this digest, skipped"));
                continue;
            }
            out.push(b.clone());
        }
        if out.iter().any(|b| !b.health.is_down()) {
            skipped.extend(out.iter().filter(|b| b.health.is_down()).map(|b| (b.name.clone(), "down, skipped")));
            out.retain(|b| !b.health.is_down());
        }
        (out, skipped)
    }
}

#[derive(Clone)]
pub struct CachedManifest {
    /// The backend it came from (credited in the ledger and metrics when served from the cache).
    pub origin: Arc<str>,
    /// The repository it was served for: a hit in another repository would credit the target with
    /// a manifest it was never asked for there.
    pub repo: crate::registry::RepoName,
    pub content_type: HeaderValue,
    pub bytes: Bytes,
}

pub struct App {
    snapshot: RwLock<Arc<Snapshot>>,
    /// digest → name of the backend that last served it.
    pub locations: moka::sync::Cache<Digest, Arc<str>>,
    /// Manifests by digest: immutable, small, and asked for again by every client of an image.
    pub manifests: moka::sync::Cache<Digest, CachedManifest>,
    /// (backend, digest) pairs whose bytes did not hash to the digest: not asked again for a while.
    pub bad: moka::sync::Cache<(Arc<str>, Digest), ()>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub warmer: Arc<crate::warm::Warmer>,
}

/// Memory the manifest cache may use.
const MANIFEST_CACHE_BYTES: u64 = 16 << 20;

impl App {
    pub fn new(config: Config, recorder: Recorder) -> Result<App, SnapshotError> {
        let metrics = Arc::new(Metrics::new());
        let locations =
            moka::sync::Cache::builder().max_capacity(100_000).time_to_live(config.server.location_ttl()).build();
        Ok(App {
            locations,
            snapshot: RwLock::new(Arc::new(Snapshot::new(config, &metrics)?)),
            metrics,
            recorder,
            warmer: Arc::default(),
            manifests: moka::sync::Cache::builder()
                .max_capacity(MANIFEST_CACHE_BYTES)
                .weigher(|_, m: &CachedManifest| m.bytes.len().try_into().unwrap_or(u32::MAX))
                .build(),
            bad: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(3600)).build(),
        })
    }

    /// Probe every backend forever, every [`health::PROBE_INTERVAL`].
    pub async fn health_loop(self: Arc<App>) {
        loop {
            tokio::time::sleep(health::PROBE_INTERVAL).await;
            let snap = self.snapshot();
            let probes = snap.backends.values().map(|b| async move {
                let answered = b.probe().await;
                match b.health.probed(answered) {
                    Some(true) => tracing::info!(backend = %b.name, "backend answers again: marked up"),
                    Some(false) => tracing::warn!(backend = %b.name, "backend does not answer GET /v2/: marked down"),
                    None => {}
                }
            });
            futures_util::future::join_all(probes).await;
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Apply a new, already validated configuration to requests that start from now on.
    pub fn reload(&self, config: Config) -> Result<(), SnapshotError> {
        let snap = Arc::new(Snapshot::new(config, &self.metrics)?);
        match self.snapshot.write() {
            Ok(mut s) => *s = snap,
            Err(poisoned) => *poisoned.into_inner() = snap,
        }
        Ok(())
    }
}
