//! [`Checks`]: assertions collected and reported together, so one failing figure does not hide the
//! others (a report has many).

use std::fmt::Debug;

#[derive(Default)]
pub struct Checks {
    failures: Vec<String>,
}

impl Checks {
    pub fn eq<T: PartialEq + Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.failures.push(format!("{what}:\n    got:  {got:?}\n    want: {want:?}"));
        }
    }

    pub fn that(&mut self, what: &str, ok: bool, detail: impl Debug) {
        if !ok {
            self.failures.push(format!("{what}: {detail:?}"));
        }
    }

    /// Equal within 0.05 (shares are reported with one decimal).
    pub fn close(&mut self, what: &str, got: f64, want: f64) {
        if (got - want).abs() > 0.051 {
            self.failures.push(format!("{what}: got {got}, want {want}"));
        }
    }

    /// How many checks have failed so far.
    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    /// Panics listing every failed check (with `context`, e.g. regmux's log tail) if there is any.
    pub fn finish(self, context: impl FnOnce() -> String) {
        if !self.failures.is_empty() {
            panic!("{} check(s) failed:\n- {}\n\n{}", self.failures.len(), self.failures.join("\n- "), context());
        }
    }
}
