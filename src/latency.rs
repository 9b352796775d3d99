//! A lock-free latency histogram: fixed bucket bounds, one atomic counter per bucket, so
//! that recording an observation on a hot path is a few relaxed atomic additions (no lock,
//! no allocation). Used by the NBD request metrics (`server/metrics/`) and the key backend
//! statistics (`keys/stats.rs`); read at scrape time as Prometheus buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (the last bucket, `+Inf`, is implicit):
/// 50 µs (a cached 4 KiB read) to 10 s (a slow key backend).
pub const BOUNDS_MICROS: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// Buckets including `+Inf`.
const BUCKETS: usize = BOUNDS_MICROS.len() + 1;

/// Observations of durations, counted per bucket.
#[derive(Debug)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative): `buckets[i]` counts durations in
    /// `(BOUNDS_MICROS[i-1], BOUNDS_MICROS[i]]`, the last one those above every bound.
    buckets: [AtomicU64; BUCKETS],
    /// Sum of every observation, in nanoseconds.
    sum_nanos: AtomicU64,
}

/// What a histogram held at one moment, in the form the Prometheus encoder takes.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
    /// Observations per bucket (not cumulative, as `prometheus-client`'s encoder takes
    /// them: it cumulates), by upper bound in seconds, the last bound `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram (usable in a `static`).
    pub const fn new() -> LatencyHistogram {
        LatencyHistogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let index = BOUNDS_MICROS.partition_point(|&bound| bound < micros);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counts now. Observations recorded while this runs may be partly included
    /// (each counter is read once; the count is the sum of the buckets read).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut count = 0u64;
        let mut buckets = Vec::with_capacity(BUCKETS);
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            count = count.saturating_add(n);
            let bound = BOUNDS_MICROS
                .get(i)
                .map(|&us| us as f64 / 1e6)
                .unwrap_or(f64::INFINITY);
            buckets.push((bound, n));
        }
        HistogramSnapshot {
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_they_do_not_exceed() {
        let h = LatencyHistogram::new();
        h.observe(Duration::from_micros(50)); // le 50 µs
        h.observe(Duration::from_micros(51)); // le 100 µs
        h.observe(Duration::from_millis(3)); // le 5 ms
        h.observe(Duration::from_secs(60)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), BOUNDS_MICROS.len() + 1);
        assert_eq!(s.buckets[0], (50e-6, 1));
        assert_eq!(s.buckets[1], (100e-6, 1));
        assert_eq!(s.buckets[5].1, 0, "2.5 ms bound: the 3 ms one is above it");
        assert_eq!(s.buckets[6], (5e-3, 1));
        assert_eq!(s.buckets[BOUNDS_MICROS.len() - 1].1, 0);
        let last = s.buckets[BOUNDS_MICROS.len()];
        assert!(last.0.is_infinite());
        assert_eq!(last.1, 1);
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        let expected = 50e-6 + 51e-6 + 3e-3 + 60.0;
        assert!((s.sum_seconds - expected).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn an_empty_histogram_reports_zero_everywhere() {
        let s = LatencyHistogram::new().snapshot();
        assert_eq!(s.count, 0);
        assert_eq!(s.sum_seconds, 0.0);
        assert!(s.buckets.iter().all(|&(_, n)| n == 0));
    }
}
