//! The one schedule every reconnect and retry loop waits by: exponential from a first delay to a
//! ceiling, with jitter, so gateways, settlers and gates that lost Redis or a gateway at the same
//! moment do not all come back at the same moment.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;

/// Delays between attempts; it never runs out, and starts again from the first delay after a
/// success.
#[derive(Debug)]
pub struct Backoff {
    schedule: ExponentialBuilder,
    delays: ExponentialBackoff,
    ceiling: Duration,
}

impl Backoff {
    /// The first delay is `first` plus up to `first` of jitter; each next one doubles, up to
    /// `ceiling` (plus its jitter).
    pub fn new(first: Duration, ceiling: Duration) -> Backoff {
        let schedule = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(ceiling)
            .with_jitter()
            .without_max_times();
        Backoff {
            delays: schedule.build(),
            schedule,
            ceiling,
        }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // Without a maximum number of attempts the schedule never ends; the ceiling is the
        // answer should it ever.
        self.delays.next().unwrap_or(self.ceiling)
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.delays = self.schedule.build();
    }

    /// Waits the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_ceiling_with_jitter_and_start_over_after_a_reset() {
        let (first, ceiling) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut backoff = Backoff::new(first, ceiling);
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= first && delays[0] <= 2 * first, "{delays:?}");
        assert!(delays[3] >= 8 * first, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= 2 * ceiling), "{delays:?}");
        assert!(delays[11] >= ceiling, "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= 2 * first);
    }

    #[test]
    fn two_schedules_do_not_wait_in_step() {
        let (mut a, mut b) = (
            Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
        );
        let same = (0..8).filter(|_| a.next_delay() == b.next_delay()).count();
        assert!(same < 8);
    }
}
