//! Calls, failures and latency of every key backend in this process, for the daemon's
//! metrics (`serve --metrics`). Process-wide on purpose: a [`KeyService`] is built
//! wherever keys are needed (start-up unlocks, re-encryption, snapshots), and all of them
//! count here without being handed a registry. Recording is lock-free (atomics only).
//!
//! [`KeyService`]: super::KeyService

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::keyref::{AWS_KMS, EXEC, LOCAL, PASSPHRASE};
use crate::latency::{HistogramSnapshot, LatencyHistogram};

/// The backends counted, in the order [`snapshot`] reports them.
pub const BACKENDS: [&str; 4] = [LOCAL, PASSPHRASE, EXEC, AWS_KMS];

/// One backend's counters.
#[derive(Debug)]
struct BackendStats {
    calls: AtomicU64,
    failures: AtomicU64,
    latency: LatencyHistogram,
}

impl BackendStats {
    const fn new() -> BackendStats {
        BackendStats {
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: LatencyHistogram::new(),
        }
    }
}

static STATS: [BackendStats; BACKENDS.len()] = [const { BackendStats::new() }; BACKENDS.len()];

/// What one backend's counters held at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSnapshot {
    pub backend: &'static str,
    pub calls: u64,
    pub failures: u64,
    pub latency: HistogramSnapshot,
}

/// Counts one call to `backend` (a name of [`BACKENDS`]; others are not counted) that
/// took `elapsed` and failed unless `ok`.
pub fn record(backend: &str, elapsed: Duration, ok: bool) {
    let Some(i) = BACKENDS.iter().position(|b| *b == backend) else {
        return;
    };
    let s = &STATS[i];
    s.calls.fetch_add(1, Ordering::Relaxed);
    if !ok {
        s.failures.fetch_add(1, Ordering::Relaxed);
    }
    s.latency.observe(elapsed);
}

/// Every backend's counters now (all of [`BACKENDS`], called or not).
pub fn snapshot() -> Vec<BackendSnapshot> {
    BACKENDS
        .iter()
        .zip(STATS.iter())
        .map(|(backend, s)| BackendSnapshot {
            backend,
            calls: s.calls.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            latency: s.latency.snapshot(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(backend: &str) -> BackendSnapshot {
        snapshot()
            .into_iter()
            .find(|s| s.backend == backend)
            .unwrap()
    }

    // The counters are process-wide and other tests use keys: compare differences.
    #[test]
    fn calls_and_failures_are_counted_per_backend() {
        let before = of(EXEC);
        record(EXEC, Duration::from_millis(2), true);
        record(EXEC, Duration::from_millis(3), false);
        record("no-such-backend", Duration::from_millis(3), false);
        let after = of(EXEC);
        assert!(after.calls >= before.calls + 2);
        assert!(after.failures > before.failures);
        assert!(after.latency.count >= before.latency.count + 2);
        assert!(after.latency.sum_seconds >= before.latency.sum_seconds + 0.005 - 1e-9);
        assert_eq!(snapshot().len(), BACKENDS.len());
    }
}
