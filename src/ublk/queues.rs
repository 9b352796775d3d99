//! Queue-thread failures and the start wait (pure: no kernel needed).
//!
//! A device starts only once every queue thread is ready: libublk's `start_dev` waits
//! until each queue thread has registered its buffers, and the kernel's `START_DEV` (or
//! `END_USER_RECOVERY`) until each queue has fetched its tags. A queue thread that fails
//! or panics before that (its io_uring or buffer set-up refused, a panic in the queue
//! closure) never reports, and both waits would last forever: the daemon hung at start-up
//! with nothing in its log. [`QueueFailures`] is the shared record a failing queue thread
//! fills in; recording a failure ends the start wait ([`wait_start`]) at once with an
//! error that names the queue and the cause.

use std::sync::{mpsc, Mutex, PoisonError};
use std::time::Duration;

use super::UblkError;

/// What the start wait receives: the device id and whether it was recovered, or why the
/// device did not start.
pub(crate) type StartReport = Result<(u32, bool), UblkError>;

/// At most this many failures are kept (a device has at most 16 queues; each fails once).
const MAX_RECORDED: usize = 64;

/// The failures of one device's queue threads, shared by the queue threads and the start.
#[derive(Debug)]
pub struct QueueFailures {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// (queue id, cause), in the order they happened.
    failures: Vec<(u16, String)>,
    /// Where the start waits; a failure is sent there (ignored once the start is over).
    start: mpsc::Sender<StartReport>,
}

impl QueueFailures {
    /// A record whose failures end the start wait that receives from `start`.
    pub(crate) fn new(start: mpsc::Sender<StartReport>) -> QueueFailures {
        QueueFailures {
            inner: Mutex::new(Inner {
                failures: Vec::new(),
                start,
            }),
        }
    }

    /// Records that queue `queue` failed with `cause`, and ends the start wait (if it is
    /// still waiting) with [`UblkError::QueueFailed`].
    pub fn fail(&self, queue: u16, cause: &str) {
        tracing::error!(
            queue,
            "ublk queue thread failed: {cause} (its requests are not served; the device does \
             not start, or, if it had started, stop the daemon and start it again to recover it)"
        );
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.failures.len() < MAX_RECORDED {
            inner.failures.push((queue, cause.to_string()));
        }
        // The start may be over (its receiver dropped): then the log line is the report.
        let _ = inner.start.send(Err(UblkError::QueueFailed {
            queue,
            cause: cause.to_string(),
        }));
    }

    /// The first failure, if any queue failed.
    pub fn first(&self) -> Option<UblkError> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .failures
            .first()
            .map(|(queue, cause)| UblkError::QueueFailed {
                queue: *queue,
                cause: cause.clone(),
            })
    }

    /// How many failures were recorded.
    pub fn count(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures
            .len()
    }
}

/// Runs the body of queue thread `queue`; an error it returns or a panic is recorded in
/// `failures` (which ends a start still waiting). Returns whether the body ended normally.
pub fn guard_queue(
    queue: u16,
    failures: &QueueFailures,
    body: impl FnOnce() -> Result<(), String>,
) -> bool {
    let cause = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => e,
        Err(p) => format!("panicked: {}", panic_text(p.as_ref())),
    };
    failures.fail(queue, &cause);
    false
}

/// Waits for the start's report: the device id once it is live, the first failure of the
/// target thread or of a queue thread, or [`UblkError::StartTimeout`] after `timeout`.
pub(crate) fn wait_start(
    reports: &mpsc::Receiver<StartReport>,
    timeout: Duration,
) -> Result<(u32, bool), UblkError> {
    match reports.recv_timeout(timeout) {
        Ok(report) => report,
        Err(e) => Err(UblkError::StartTimeout {
            secs: timeout.as_secs(),
            detail: e.to_string(),
        }),
    }
}

/// The test hook `CRYPTVOL_TEST_UBLK_FAIL_QUEUE=QID` (or `QID:panic`): queue `QID` fails
/// (or panics) at set-up, so the kernel VM test can show that a failed queue ends the
/// start with an error on the real driver. Unset in production.
pub const FAIL_QUEUE_ENV: &str = "CRYPTVOL_TEST_UBLK_FAIL_QUEUE";

/// What the test hook asks a queue to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFailure {
    /// Return a set-up error.
    Error,
    /// Panic in the queue closure.
    Panic,
}

/// Whether the hook's value `spec` targets queue `qid`, and how. Malformed values target
/// no queue.
pub fn injected_failure(spec: Option<&str>, qid: u16) -> Option<InjectedFailure> {
    let spec = spec?;
    let (id, how) = match spec.split_once(':') {
        Some((id, "panic")) => (id, InjectedFailure::Panic),
        Some(_) => return None,
        None => (spec, InjectedFailure::Error),
    };
    (id.parse::<u16>().ok()? == qid).then_some(how)
}

/// A panic's message.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    /// Far longer than any test here should wait: reaching it means the wait hung.
    const HUNG: Duration = Duration::from_secs(120);

    #[test]
    fn a_failing_queue_ends_the_start_wait_with_its_error() {
        let (tx, rx) = mpsc::channel();
        let failures = Arc::new(QueueFailures::new(tx));
        // Queue 0 is ready and serving (it reports nothing); queue 1 fails in its set-up.
        let f = failures.clone();
        let queue1 = std::thread::spawn(move || {
            guard_queue(1, &f, || Err("io_uring set-up failed: ENOMEM".to_string()))
        });
        let t0 = Instant::now();
        let e = wait_start(&rx, HUNG).unwrap_err();
        assert!(
            t0.elapsed() < HUNG / 2,
            "the start waited {:?}",
            t0.elapsed()
        );
        assert!(!queue1.join().unwrap());
        let text = e.to_string();
        assert!(
            matches!(e, UblkError::QueueFailed { queue: 1, .. }),
            "{text}"
        );
        assert!(
            text.contains("queue 1") && text.contains("ENOMEM"),
            "{text}"
        );
        assert_eq!(failures.count(), 1);
    }

    #[test]
    fn a_panicking_queue_ends_the_start_wait_with_the_panic_message() {
        let (tx, rx) = mpsc::channel();
        let failures = Arc::new(QueueFailures::new(tx));
        let f = failures.clone();
        let queue = std::thread::spawn(move || {
            guard_queue(3, &f, || -> Result<(), String> {
                panic!("tag 7 beyond the queue depth")
            })
        });
        let e = wait_start(&rx, HUNG).unwrap_err();
        assert!(
            !queue.join().unwrap(),
            "the panic was caught in the queue thread"
        );
        let text = e.to_string();
        assert!(text.contains("queue 3"), "{text}");
        assert!(
            text.contains("panicked: tag 7 beyond the queue depth"),
            "{text}"
        );
        assert!(matches!(
            failures.first(),
            Some(UblkError::QueueFailed { queue: 3, .. })
        ));
    }

    #[test]
    fn a_started_device_is_reported_and_healthy_queues_record_nothing() {
        let (tx, rx) = mpsc::channel();
        let failures = QueueFailures::new(tx.clone());
        assert!(guard_queue(0, &failures, || Ok(())));
        tx.send(Ok((4, true))).unwrap();
        assert_eq!(wait_start(&rx, HUNG).unwrap(), (4, true));
        assert_eq!(failures.count(), 0);
        assert!(failures.first().is_none());
    }

    #[test]
    fn a_failure_after_the_start_is_recorded_without_a_waiter() {
        let (tx, rx) = mpsc::channel();
        let failures = QueueFailures::new(tx);
        drop(rx);
        assert!(!guard_queue(2, &failures, || Err("ring gone".into())));
        assert!(failures.first().unwrap().to_string().contains("ring gone"));
    }

    #[test]
    fn the_test_hook_targets_one_queue() {
        assert_eq!(injected_failure(None, 1), None);
        assert_eq!(injected_failure(Some("1"), 1), Some(InjectedFailure::Error));
        assert_eq!(injected_failure(Some("1"), 0), None);
        assert_eq!(
            injected_failure(Some("0:panic"), 0),
            Some(InjectedFailure::Panic)
        );
        assert_eq!(injected_failure(Some("0:other"), 0), None);
        assert_eq!(injected_failure(Some("x"), 0), None);
        assert_eq!(injected_failure(Some("99999"), 0), None);
    }

    #[test]
    fn no_report_at_all_is_a_timeout_not_a_hang() {
        let (_tx, rx) = mpsc::channel();
        let e = wait_start(&rx, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, UblkError::StartTimeout { .. }), "{e}");
    }
}
