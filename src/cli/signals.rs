//! Signals for commands that run a while: waiting for SIGTERM/SIGINT, cancelling a
//! copy at the next block, dropping a future or stopping a loop at Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The daemon's signals, registered once at the very start of `serve`, before any volume
/// is unlocked or any socket bound. Registering later (in a task spawned once serving)
/// left windows in which SIGTERM, SIGINT or SIGHUP took the default action and killed the
/// process: during a slow unlock, and between the listener answering and the task
/// running. Signals that arrive early are queued and acted on.
#[derive(Debug)]
pub(super) struct DaemonSignals {
    term: Signal,
    int: Signal,
    hup: Option<Signal>,
}

impl DaemonSignals {
    /// Installs the handlers (must run inside the tokio runtime).
    pub(super) fn register() -> Result<DaemonSignals> {
        let term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        Ok(DaemonSignals {
            term,
            int,
            hup: Some(hup),
        })
    }

    /// Waits for SIGTERM or SIGINT (returns at once for one already received).
    pub(super) async fn stop_requested(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// The SIGHUP stream, for the reload task (once).
    pub(super) fn take_hangup(&mut self) -> Option<Signal> {
        self.hup.take()
    }

    /// Runs `start` unless SIGTERM/SIGINT comes first (`None`: stop before serving).
    pub(super) async fn unless_stopped<T>(
        &mut self,
        start: impl std::future::Future<Output = Result<T>>,
    ) -> Result<Option<T>> {
        tokio::select! {
            r = start => r.map(Some),
            () = self.stop_requested() => Ok(None),
        }
    }
}

/// Waits for SIGTERM or SIGINT (only Ctrl-C if those handlers cannot be installed).
pub(super) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Sets `cancel` on SIGINT/SIGTERM, so a long copy stops at the next block with its
/// progress saved.
pub(super) fn cancel_on_signal(what: &'static str) -> crate::migrate::Cancel {
    let cancel = crate::migrate::Cancel::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::warn!(
            "interrupted: stopping the {what} after the current block (again to quit at once)"
        );
        c.cancel();
        wait_for_signal().await;
        eprintln!("cryptvol: interrupted twice: quitting now");
        std::process::exit(130);
    });
    cancel
}

/// Runs `fut`, or stops at Ctrl-C (dropping it: partial work is cleaned up by its
/// destructors or left invisible and reused by the next run).
pub(super) async fn interruptible<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = fut => r,
        _ = tokio::signal::ctrl_c() => {
            anyhow::bail!("{what} interrupted; nothing half-made is visible (run it again to resume: chunks already stored are reused)")
        }
    }
}

/// A flag set at the first Ctrl-C, for a loop that checks it between steps. The
/// watching task ends when this is dropped.
pub(super) struct CtrlCFlag {
    flag: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CtrlCFlag {
    /// Starts watching for Ctrl-C.
    pub(super) fn watch() -> CtrlCFlag {
        let flag = Arc::new(AtomicBool::new(false));
        let set = flag.clone();
        let task = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                set.store(true, Ordering::SeqCst);
            }
        });
        CtrlCFlag { flag, task }
    }

    /// The flag, for a blocking thread.
    pub(super) fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }
}

impl Drop for CtrlCFlag {
    fn drop(&mut self) {
        self.task.abort();
    }
}
