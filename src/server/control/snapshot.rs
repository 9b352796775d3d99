//! The `snapshot` request: a snapshot view of the export handed to the snapshot hook,
//! with progress lines while it runs.

use std::sync::Arc;

use serde_json::Value;
use tokio::net::UnixStream;

use super::hooks::{HookError, SnapshotJob};
use super::protocol::{ProgressEvent, SNAPSHOT_CHUNK_SIZE};
use super::socket::{send, unknown_export, ControlState, PROGRESS_EVERY};
use crate::progress::Progress;

pub(super) async fn snapshot(
    stream: &mut UnixStream,
    st: &Arc<ControlState>,
    export: String,
    store: String,
    description: String,
    parent: Option<String>,
) -> Result<Value, String> {
    let e = st
        .shared
        .exports
        .get(&export)
        .ok_or_else(|| unknown_export(st, &export))?;
    let taker = st.hooks.snapshots.clone().ok_or_else(|| {
        "snapshots through the daemon are not available in this daemon (no snapshot store \
         support)"
            .to_string()
    })?;
    let volume = e.volume.clone();
    let vol = volume.clone();
    let view = tokio::task::spawn_blocking(move || vol.snapshot_view(SNAPSHOT_CHUNK_SIZE))
        .await
        .map_err(|e| format!("snapshot view task failed: {e}"))?
        .map_err(|e| format!("cannot start a snapshot of {export:?}: {e}"))?;
    tracing::info!(export = %export, store = %store, "snapshot started");
    let total = volume.size();
    let progress = Progress::hidden(total);
    let job = SnapshotJob {
        export: export.clone(),
        volume,
        view,
        store,
        description,
        parent,
    };
    let metrics = e.metrics.clone();
    metrics.snapshot_progress(0, total);
    metrics.snapshot_running(true);
    let work = taker.take(job, &progress);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut client_gone = false;
    let mut shutdown = st.shared.shutdown.clone();
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            // Shutdown does not wait for a snapshot (it may take hours to a remote
            // store): it is abandoned, its view dropped (the changed-chunk bits go back
            // to the tracking); no manifest was written, so it does not exist.
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => {
                break Err(HookError::from(
                    "the daemon is shutting down; the snapshot was abandoned (take it again: \
                     chunks already uploaded are not uploaded twice)",
                ));
            }
            _ = tick.tick() => {
                metrics.snapshot_progress(progress.done(), total);
                if !client_gone {
                    let ev = ProgressEvent::new("snapshot", &export, progress.done(), total, None);
                    let line = format!("{}\n", serde_json::to_string(&ev).unwrap_or_default());
                    // A client that leaves does not stop the snapshot.
                    client_gone = !send(stream, &line).await;
                }
            }
        }
    };
    metrics.snapshot_progress(progress.done(), total);
    metrics.snapshot_running(false);
    match result {
        Ok(v) => {
            tracing::info!(export = %export, "snapshot completed");
            Ok(serde_json::json!({ "export": export, "snapshot": v }))
        }
        Err(e) => {
            tracing::error!(export = %export, "snapshot failed: {e}");
            Err(format!("snapshot of {export:?} failed: {e}"))
        }
    }
}
