//! `HUSK_TRACE=1`: how long each step of creating and starting a container took, on stderr.
//! Each line carries the step's time since this process began the traced operation and the
//! wall clock's milliseconds, so lines of `create`, the monitor and `start` can be lined up.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub struct Trace {
    who: &'static str,
    t0: Option<Instant>,
}

impl Trace {
    /// Starts timing for `who` (e.g. "monitor") when `HUSK_TRACE` is set.
    pub fn start(who: &'static str) -> Self {
        let t0 = std::env::var_os("HUSK_TRACE").map(|_| Instant::now());
        Self { who, t0 }
    }

    pub fn mark(&self, what: &str) {
        let Some(t0) = self.t0 else { return };
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() % 100_000);
        eprintln!(
            "husk {}: {what} at {} ms (wall {wall})",
            self.who,
            t0.elapsed().as_millis()
        );
    }
}
