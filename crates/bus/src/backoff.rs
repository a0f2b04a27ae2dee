//! Exponential backoff with jitter, so a fleet of daemons does not reconnect in lockstep
//! after a broker restart.

use std::time::Duration;

/// Delays of 100 ms, 200 ms, 400 ms … capped at `max`, each with up to 25 % jitter.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(100),
            max,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = base.mul_f64(fastrand::f64() * 0.25);
        (base + jitter).min(self.max)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(125));
        assert!(delays[1] >= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert_eq!(delays[7], Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
