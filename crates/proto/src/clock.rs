//! The only place that reads the clock. Everything else takes `now` as a [`Millis`].

use std::time::Instant;

/// Milliseconds since the owning [`Clock`] started. The core and the timer wheel count in these.
pub type Millis = u64;

/// A monotonic millisecond clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        Self { start: Instant::now() }
    }

    /// Milliseconds since this clock was created.
    #[allow(clippy::disallowed_methods)]
    pub fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }

    /// Nanoseconds since this clock was created (for latency measurement).
    #[allow(clippy::disallowed_methods)]
    pub fn nanos(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Wall-clock milliseconds since the Unix epoch (fleet token deadlines, which cross machines).
    #[allow(clippy::disallowed_methods)]
    pub fn unix_millis() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Wall-clock seconds since the Unix epoch (for logs and request IDs only).
    #[allow(clippy::disallowed_methods)]
    pub fn unix_secs() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
