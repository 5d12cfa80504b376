//! Rate limiting of a repeated warning.

use std::time::Duration;

use tokio::time::Instant;

/// Lets a warning through at most once per interval and counts the ones held back,
/// so a flood of bad input cannot flood the log.
#[derive(Debug)]
pub struct WarnLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Returns `Some(n)` when the caller should log now, with `n` the number of
    /// occurrences held back since the last logged one; `None` to stay silent.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limiter_counts_suppressed_warnings() {
        let mut limiter = WarnLimiter::new(Duration::from_secs(10));

        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(limiter.check(), Some(2));
    }
}
