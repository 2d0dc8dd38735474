//! Jittered exponential backoff for reconnect loops. Each delay is a uniform pick between half and
//! all of the capped exponential step, so many agents restarting together do not stampede.

use rand::Rng;
use std::time::Duration;

/// First reconnect delay ceiling.
pub const INITIAL: Duration = Duration::from_millis(100);
/// Largest reconnect delay ceiling.
pub const MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(INITIAL, MAX)
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The ceiling for the current attempt, without jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay to wait before the next attempt; each call grows the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }

    /// Call after a success so the next failure starts small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut last_ceiling = Duration::ZERO;
        for _ in 0..10 {
            let ceiling = b.ceiling();
            assert!(ceiling >= last_ceiling);
            let d = b.next_delay();
            assert!(d <= ceiling && d >= ceiling / 2, "{d:?} vs {ceiling:?}");
            last_ceiling = ceiling;
        }
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
