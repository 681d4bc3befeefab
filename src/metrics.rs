//! Prometheus metrics (`/metrics` on the admin listener), named in Prometheus style with the
//! `regmux_` prefix. Counters are updated where things happen, except the ones that mirror a count kept
//! elsewhere (ledger drops, warms), which catch up with it when scraped; gauges that mirror state
//! (backend up, ledger queue) are set when scraped. prometheus-client appends `_total` to counters.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub backend: String,
    pub kind: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackend {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub route: String,
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarmLabels {
    pub result: &'static str,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub bytes: Family<RouteBackend, Counter>,
    pub backend_seconds: Family<BackendLabel, Histogram>,
    pub fallbacks: Family<FallbackLabels, Counter>,
    pub digest_mismatches: Family<BackendLabel, Counter>,
    pub backend_up: Family<BackendLabel, Gauge>,
    pub ledger_queue: Gauge,
    pub ledger_dropped: Counter,
    pub ledger_writable: Gauge,
    pub warms: Family<WarmLabels, Counter>,
    pub in_flight: Gauge,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            requests: Family::default(),
            bytes: Family::default(),
            backend_seconds: Family::new_with_constructor(latency_histogram),
            fallbacks: Family::default(),
            digest_mismatches: Family::default(),
            backend_up: Family::default(),
            ledger_queue: Gauge::default(),
            ledger_dropped: Counter::default(),
            ledger_writable: Gauge::default(),
            warms: Family::default(),
            in_flight: Gauge::default(),
            registry: Registry::with_prefix("regmux"),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "Client requests by route, serving backend, kind, method and status",
            m.requests.clone(),
        );
        r.register("bytes", "Body bytes sent to clients by route and serving backend", m.bytes.clone());
        r.register_with_unit(
            "backend_response",
            "Time until a backend's response headers",
            prometheus_client::registry::Unit::Seconds,
            m.backend_seconds.clone(),
        );
        r.register(
            "fallbacks",
            "Requests the route's target did not serve and another backend did",
            m.fallbacks.clone(),
        );
        r.register(
            "digest_mismatches",
            "Blobs or manifests whose bytes did not match their digest",
            m.digest_mismatches.clone(),
        );
        r.register("backend_up", "1 when the backend is in use, 0 when marked down", m.backend_up.clone());
        r.register("ledger_queue_depth", "Ledger events waiting for the writer", m.ledger_queue.clone());
        r.register("ledger_dropped", "Ledger events dropped because the queue was full", m.ledger_dropped.clone());
        r.register(
            "ledger_writable",
            "1 when the ledger's last write succeeded, 0 while the writer retries",
            m.ledger_writable.clone(),
        );
        r.register(
            "warms",
            "Background warms by result (warmed, failed, dropped: queue full, claimed_elsewhere: another replica)",
            m.warms.clone(),
        );
        r.register("streams_in_flight", "Responses whose body is still being sent", m.in_flight.clone());
        m
    }

    pub fn observe_backend(&self, backend: &str, elapsed: Duration) {
        self.backend_seconds
            .get_or_create(&BackendLabel { backend: backend.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
