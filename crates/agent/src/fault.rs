//! Fault injection for crash tests: `CONVOY_FAULT=<point>` makes the agent SIGKILL itself
//! when it reaches that point — a real kill -9 at an exact step. Unset in production.
//!
//! Points: `after_record` (command journaled, not yet acked), `before_switch`,
//! `after_switch`, `before_result` (every step done, result not yet written),
//! `after_result` (result written, not yet published), `revert_unjournaled` (a revert whose
//! journal entry could not be saved — a full disk — dies once `current` is switched back,
//! before the previous release is restarted).

use nix::sys::signal::{Signal, raise};

#[derive(Clone, Debug, Default)]
pub struct Faults {
    point: Option<String>,
}

impl Faults {
    pub fn from_env() -> Self {
        Self {
            point: std::env::var("CONVOY_FAULT").ok().filter(|p| !p.is_empty()),
        }
    }

    /// Whether `point` is the configured one (for a fault that is more than a kill).
    pub fn is(&self, point: &str) -> bool {
        self.point.as_deref() == Some(point)
    }

    /// Dies here if this is the configured point.
    pub fn hit(&self, point: &str) {
        if self.point.as_deref() == Some(point) {
            tracing::error!(point, "CONVOY_FAULT: killing myself");
            let _ = raise(Signal::SIGKILL);
        }
    }
}
