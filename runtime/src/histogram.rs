//! Durations kept as a histogram on plain atomics, so recording one never locks or allocates on
//! a hot path; the ops endpoint reads a snapshot when scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (µs) of the duration histograms' buckets: the gateway promises answers within
/// a millisecond, so the buckets are dense around it.
pub const DURATION_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 750, 1_000, 1_500, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// A histogram of durations on plain atomics: recording never locks or allocates.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// One counter per bound in [`DURATION_BUCKETS_US`], then one for everything above.
    buckets: [AtomicU64; DURATION_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl DurationHistogram {
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = DURATION_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count, cumulative counts by upper bound in seconds, the last +Inf).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                total += b.load(Ordering::Relaxed);
                let bound = DURATION_BUCKETS_US
                    .get(i)
                    .map_or(f64::INFINITY, |us| *us as f64 / 1e6);
                (bound, total)
            })
            .collect();
        (
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed),
            buckets,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_the_first_bucket_that_holds_them() {
        let h = DurationHistogram::default();
        for us in [50, 100, 900, 2_000_000] {
            h.record(Duration::from_micros(us));
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 2.00105).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.0001, 2));
        assert_eq!(buckets[4], (0.001, 3));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 4)));
    }
}
