//! systemd's service watchdog (`WatchdogSec=` in the unit): keep-alives (`WATCHDOG=1`)
//! sent from the daemon's own tokio runtime at half of `WATCHDOG_USEC`, so that a daemon
//! that stops answering is killed and restarted by systemd.
//!
//! A keep-alive is sent only when the daemon shows it still works, not merely because a
//! timer fired: the keep-alive loop is itself a task of the runtime that serves the
//! listeners (a runtime whose workers are all stuck never runs it), and before each
//! keep-alive it checks that a freshly spawned task is scheduled and that the blocking
//! pool (key backend calls, file I/O) runs a job, each within one interval. A probe that
//! does not answer in time costs that keep-alive; systemd acts once `WatchdogSec` passes
//! without one.

use std::ffi::OsStr;
use std::time::Duration;

use sd_notify::NotifyState;

use super::systemd;

/// The shortest keep-alive interval (a shorter one from a tiny `WATCHDOG_USEC` is raised).
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// How often to send keep-alives, from `WATCHDOG_USEC` and `WATCHDOG_PID`: half the
/// watchdog timeout, or `None` when no watchdog is set for process `pid` (unset, not a
/// positive number, or meant for another process). Pure, for testing.
pub fn keepalive_interval(
    watchdog_usec: Option<&OsStr>,
    watchdog_pid: Option<&OsStr>,
    pid: u32,
) -> Option<Duration> {
    if let Some(p) = watchdog_pid {
        let target: u32 = p.to_str()?.parse().ok()?;
        if target != pid {
            return None;
        }
    }
    let usec: u64 = watchdog_usec?.to_str()?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec / 2).max(MIN_INTERVAL))
}

/// The keep-alive interval this process was started with, if systemd asked for one.
pub fn from_env() -> Option<Duration> {
    keepalive_interval(
        std::env::var_os("WATCHDOG_USEC").as_deref(),
        std::env::var_os("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

/// Sends `WATCHDOG=1` every `interval` for as long as the runtime answers its probes.
/// Runs until the task is dropped (the daemon exits).
pub async fn keep_alive(interval: Duration) {
    tracing::info!(
        interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        "systemd watchdog: sending keep-alives"
    );
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match probe(interval).await {
            Ok(()) => {
                if failing {
                    tracing::info!("systemd watchdog: the daemon answers again");
                    failing = false;
                }
                send_keepalive();
            }
            Err(what) => {
                if !failing {
                    tracing::warn!("systemd watchdog: {what}; withholding keep-alives");
                    failing = true;
                }
            }
        }
    }
}

/// Checks that the runtime schedules a new task and the blocking pool runs a job, each
/// within `limit`.
async fn probe(limit: Duration) -> Result<(), &'static str> {
    let task = tokio::spawn(async {});
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(())) => {}
        _ => return Err("the async runtime did not run a probe task in time"),
    }
    let job = tokio::task::spawn_blocking(|| ());
    match tokio::time::timeout(limit, job).await {
        Ok(Ok(())) => Ok(()),
        _ => Err("the blocking thread pool did not run a probe job in time"),
    }
}

fn send_keepalive() {
    match systemd::notify(&NotifyState::Watchdog.to_string()) {
        Ok(_) => tracing::trace!("notified systemd: WATCHDOG=1"),
        Err(e) => tracing::warn!("cannot notify systemd (WATCHDOG=1): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn half_the_timeout_for_this_process_only() {
        assert_eq!(
            keepalive_interval(os("10000000"), None, 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            keepalive_interval(os("10000000"), os("7"), 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(keepalive_interval(os("10000000"), os("8"), 7), None);
        assert_eq!(keepalive_interval(None, os("7"), 7), None);
    }

    #[test]
    fn garbage_or_zero_means_no_watchdog() {
        assert_eq!(keepalive_interval(os("0"), None, 7), None);
        assert_eq!(keepalive_interval(os("-5"), None, 7), None);
        assert_eq!(keepalive_interval(os("5s"), None, 7), None);
        assert_eq!(keepalive_interval(os("10"), os("x"), 7), None);
        assert_eq!(keepalive_interval(os("1"), None, 7), Some(MIN_INTERVAL));
    }

    #[tokio::test]
    async fn probes_answer_on_a_healthy_runtime() {
        assert_eq!(probe(Duration::from_secs(30)).await, Ok(()));
    }
}
