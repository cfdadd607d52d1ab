//! Log lines a guest can provoke at will, at most one every few seconds.

use std::time::{Duration, Instant};

/// Logs a kind of event at most once per interval, counting the rest.
pub struct Throttle {
    last: Option<Instant>,
    quiet: u64,
}

impl Throttle {
    const INTERVAL: Duration = Duration::from_secs(5);

    pub fn new() -> Throttle {
        Throttle {
            last: None,
            quiet: 0,
        }
    }

    /// How many were not logged since the last one, when this one may be.
    pub fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + Throttle::INTERVAL) {
            self.quiet += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}
