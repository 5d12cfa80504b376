//! Debouncing of wake-ups: a burst of notifications becomes one batch.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

/// How long to wait after a wake-up before draining the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    /// Drain once no wake-up has arrived for this long.
    pub quiet: Duration,
    /// Drain at the latest this long after the first wake-up, even if wake-ups keep
    /// arriving.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        }
    }
}

/// The reason a debounce window ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// No wake-up arrived for the quiet window.
    Quiet,
    /// Wake-ups kept arriving until the maximum delay.
    MaxDelay,
    /// The sender went away: the listener's connection was lost.
    Closed,
}

impl Debounce {
    /// Waits, after a first wake-up that the caller already received, until `wakes`
    /// stays quiet for [`Debounce::quiet`] or [`Debounce::max_delay`] has passed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only receives from the channel, and a wake-up it took is not
    /// needed once the caller drains the queue anyway.
    pub async fn settle(&self, wakes: &mut mpsc::Receiver<()>) -> Settled {
        let started = Instant::now();
        let deadline = started + self.max_delay;
        let mut quiet_until = started + self.quiet;

        loop {
            let until = quiet_until.min(deadline);
            tokio::select! {
                biased;
                wake = wakes.recv() => match wake {
                    Some(()) => quiet_until = Instant::now() + self.quiet,
                    None => return Settled::Closed,
                },
                () = sleep_until(until) => {
                    return if until == deadline && quiet_until > deadline {
                        Settled::MaxDelay
                    } else {
                        Settled::Quiet
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_wakes(every: Duration, count: usize) -> mpsc::Receiver<()> {
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            for _ in 0..count {
                tokio::time::sleep(every).await;
                if sender.send(()).await.is_err() {
                    return;
                }
            }
            // Keep the channel open so the debounce ends on time, not on close.
            std::future::pending::<()>().await;
        });
        receiver
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_window_ends_after_last_wake() {
        let debounce = Debounce::default();
        let mut wakes = spawn_wakes(Duration::from_millis(10), 3);
        let started = Instant::now();

        let settled = debounce.settle(&mut wakes).await;

        assert_eq!(settled, Settled::Quiet);
        assert_eq!(started.elapsed(), Duration::from_millis(30 + 50));
    }

    #[tokio::test(start_paused = true)]
    async fn single_wake_waits_one_quiet_window() {
        let debounce = Debounce::default();
        let mut wakes = spawn_wakes(Duration::from_millis(10), 0);
        let started = Instant::now();

        let settled = debounce.settle(&mut wakes).await;

        assert_eq!(settled, Settled::Quiet);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn steady_wakes_end_at_max_delay() {
        let debounce = Debounce::default();
        let mut wakes = spawn_wakes(Duration::from_millis(20), 1_000);
        let started = Instant::now();

        let settled = debounce.settle(&mut wakes).await;

        assert_eq!(settled, Settled::MaxDelay);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_channel_ends_at_once() {
        let debounce = Debounce::default();
        let (sender, mut wakes) = mpsc::channel::<()>(1);
        drop(sender);
        let started = Instant::now();

        let settled = debounce.settle(&mut wakes).await;

        assert_eq!(settled, Settled::Closed);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
