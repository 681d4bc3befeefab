//! Backend health: a backend whose requests keep failing (connection refused, timeouts, 5xx) is marked
//! down and skipped, so a dead Harbor costs milliseconds instead of a timeout per request. A background
//! probe asks every backend `GET /v2/` every [`PROBE_INTERVAL`]: a refused connection marks it down at
//! once (so `/readyz` sees a stopped backend without waiting for traffic), a slow answer counts as a
//! failure, an answer brings it back.
//!
//! This is advice to the request path, never a verdict: when every backend of a route is down, they are
//! tried anyway.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// Consecutive failures that mark a backend down.
pub const FAILURES_TO_DOWN: u32 = 3;
/// Time between probes of every backend.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe that gets no answer within this time fails.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a `GET /v2/` probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Any HTTP answer below 500 (a 401 too: the registry is alive).
    Answered,
    /// Nothing listens: the connection was refused or could not be made.
    Refused,
    /// No answer within the probe timeout, or a 5xx.
    Slow,
}

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

    /// The result of a probe. Returns the new state if it changed (`Some(true)`: up again).
    /// A refused connection marks the backend down at once; a slow or 5xx answer counts as one
    /// failure, so a backend that is merely saturated by a burst of pulls is not taken out of service.
    pub fn probed(&self, probe: Probe) -> Option<bool> {
        match probe {
            Probe::Answered => {
                self.failures.store(0, Ordering::Relaxed);
                self.down.swap(false, Ordering::Relaxed).then_some(true)
            }
            Probe::Refused => (!self.down.swap(true, Ordering::Relaxed)).then_some(false),
            Probe::Slow => self.failure().then_some(false),
        }
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
        assert_eq!(h.probed(Probe::Answered), Some(true));
        assert!(!h.is_down());
        assert_eq!(h.probed(Probe::Answered), None);
        assert_eq!(h.probed(Probe::Slow), None, "one slow probe is not enough");
        assert_eq!(h.probed(Probe::Slow), None);
        assert_eq!(h.probed(Probe::Slow), Some(false), "the third in a row is");
        assert_eq!(h.probed(Probe::Answered), Some(true));
        assert_eq!(h.probed(Probe::Refused), Some(false), "a refused connection marks down at once");
        assert!(h.is_down());
    }
}
