//! Signals for commands that run a while: waiting for SIGTERM/SIGINT, cancelling a
//! copy at the next block, dropping a future or stopping a loop at Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;

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
