//! The `reencrypt` and `reencrypt-status` requests: starting (or resuming) an online
//! re-encryption under a new data key and following its progress. The work itself is
//! `server::reencrypt`'s.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::protocol::ProgressEvent;
use super::socket::{send, unknown_export, ControlState, PROGRESS_EVERY};
use super::status::reencrypt_info;
use crate::server::reencrypt::JobState;
use crate::volume::Volume;

pub(super) fn reencrypt_status(st: &ControlState, export: &str) -> Result<Value, String> {
    let e = st
        .shared
        .exports
        .get(export)
        .ok_or_else(|| unknown_export(st, export))?;
    let info = reencrypt_info(&e.volume, st.jobs.state(export).as_ref());
    Ok(serde_json::json!({
        "export": export,
        "in_progress": e.volume.reencrypt_status().is_some(),
        "reencrypt": info,
    }))
}

/// `reencrypt`: starts a re-encryption under a new data key (or resumes an interrupted
/// one) and, with `wait`, streams its progress until it finishes.
pub(super) async fn reencrypt(
    stream: &mut UnixStream,
    st: &Arc<ControlState>,
    export: &str,
    wait: bool,
) -> Result<Value, String> {
    let e = st
        .shared
        .exports
        .get(export)
        .ok_or_else(|| unknown_export(st, export))?;
    let volume = e.volume.clone();
    if volume.read_only() {
        return Err(read_only_refusal(export, &volume));
    }
    let mut rx = match st.jobs.follow(export) {
        Some(rx) => return Err(already_running(export, &rx)),
        None if volume.reencrypt_status().is_some() => {
            st.jobs
                .start(export, volume.clone(), st.shared.shutdown.clone())
        }
        None => {
            begin_under_new_key(st, export, &volume).await?;
            st.jobs
                .start(export, volume.clone(), st.shared.shutdown.clone())
        }
    };
    if !wait {
        let s = rx.borrow().clone();
        return Ok(serde_json::json!({
            "export": export,
            "started": true,
            "done": s.finished,
            "watermark": s.done,
            "size": s.total,
        }));
    }
    follow(stream, st, export, &mut rx).await
}

/// The refusal of a re-encryption of a read-only export.
fn read_only_refusal(export: &str, volume: &Volume) -> String {
    format!(
        "export {export:?} is served read-only; re-encryption rewrites every block: \
         serve it read-write to re-encrypt it{}",
        if volume.reencrypt_status().is_some() {
            " (a re-encryption is in progress: it resumes by itself then)"
        } else {
            ""
        }
    )
}

/// One re-encryption at a time: a second request is refused (not queued, not silently
/// merged into the running one, which uses a data key generated before this request).
fn already_running(export: &str, rx: &watch::Receiver<JobState>) -> String {
    let s = rx.borrow().clone();
    tracing::info!(
        export,
        "control: re-encryption request refused: one is already running"
    );
    let pct = if s.total == 0 {
        100.0
    } else {
        s.done as f64 * 100.0 / s.total as f64
    };
    format!(
        "export {export:?} is already being re-encrypted under a new data key \
         ({pct:.1}% done, {} of {} bytes); one re-encryption at a time: follow it with \
         `cryptvol reencrypt --status {export}`, and request another one after it \
         finishes",
        s.done, s.total
    )
}

/// Makes the new data key through the key hook and records the start of the
/// re-encryption in the volume.
async fn begin_under_new_key(
    st: &ControlState,
    export: &str,
    volume: &Arc<Volume>,
) -> Result<(), String> {
    let keys = st
        .hooks
        .keys
        .clone()
        .ok_or_else(|| "online re-encryption is not available in this daemon".to_string())?;
    let (dek, slots) = keys
        .new_data_key(volume)
        .await
        .map_err(|e| format!("cannot make the new data key for {export:?}: {e}"))?;
    let vol = volume.clone();
    let name = export.to_string();
    tokio::task::spawn_blocking(move || {
        // The volume layer refuses this while a snapshot is being taken (and a
        // snapshot while a re-encryption runs), atomically.
        vol.reencrypt_begin(dek, slots)
            .map_err(|e| format!("cannot start re-encrypting {name:?}: {e}"))
    })
    .await
    .map_err(|e| format!("re-encryption start task failed: {e}"))??;
    tracing::info!(export, "online re-encryption started under a new data key");
    Ok(())
}

/// Streams the progress of a re-encryption job until it finishes.
async fn follow(
    stream: &mut UnixStream,
    st: &ControlState,
    export: &str,
    rx: &mut watch::Receiver<JobState>,
) -> Result<Value, String> {
    let mut shutdown = st.shared.shutdown.clone();
    loop {
        let s = rx.borrow_and_update().clone();
        if s.finished {
            return Ok(serde_json::json!({ "export": export, "done": true, "size": s.total }));
        }
        if !s.running {
            return Err(format!(
                "the re-encryption of {export:?} stopped at {} of {} bytes (daemon shutting \
                 down); it resumes when the daemon starts again",
                s.done, s.total
            ));
        }
        let ev = ProgressEvent::new("reencrypt", export, s.done, s.total, s.last_error);
        let line = format!("{}\n", serde_json::to_string(&ev).unwrap_or_default());
        if !send(stream, &line).await {
            // The client left; the job goes on.
            return Err("client disconnected".into());
        }
        let stopping = tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return Err(format!("the re-encryption task of {export:?} ended unexpectedly"));
                }
                false
            }
            r = shutdown.wait_for(|s| *s) => r.is_ok(),
        };
        if stopping {
            // The worker stops between steps; report where it got to.
            let _ =
                tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| !s.running)).await;
            continue;
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    }
}
