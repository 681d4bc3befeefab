//! Backend health: a backend whose requests keep failing (connection refused, timeouts, 5xx) is marked
//! down and skipped, so a dead Harbor costs milliseconds instead of a timeout per request. While down, a
//! background probe asks `GET /v2/` and brings it back as soon as it answers.
//!
//! This is advice to the request path, never a verdict: when every backend of a route is down, they are
//! tried anyway.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// Consecutive failures that mark a backend down.
pub const FAILURES_TO_DOWN: u32 = 3;
/// Time between probes of a down backend.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Health {
    failures: AtomicU32,
    down: AtomicBool,
}

impl Health {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// An answer came (found or missing): the backend works.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed. Returns true when this failure marked the backend down (the caller then starts
    /// the probe).
    pub fn failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        n >= FAILURES_TO_DOWN && !self.down.swap(true, Ordering::Relaxed)
    }

    /// The probe got an answer: up again.
    pub fn recovered(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.down.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_down_after_consecutive_failures_only() {
        let h = Health::default();
        assert!(!h.failure());
        assert!(!h.failure());
        h.success();
        assert!(!h.failure());
        assert!(!h.failure());
        assert!(h.failure(), "third consecutive failure marks down");
        assert!(h.is_down());
        assert!(!h.failure(), "already down: no second probe");
        h.recovered();
        assert!(!h.is_down());
    }
}
