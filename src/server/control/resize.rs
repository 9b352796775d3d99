//! The `resize` request: grow a served export online ([`Volume::grow_online`]) and
//! record it in the key audit log like an offline `cryptvol resize`.
//!
//! What clients see: connections that start afterwards are offered the new size (the
//! catalog reads the volume's size at each handshake). NBD has no way to announce a new
//! size, so connections already in transmission keep the size of their handshake; the
//! server accepts their requests up to the export's current size, so a client told the
//! new size another way uses them for the grown space (a kernel device: `cryptvol attach
//! --refresh-size`, which keeps its connections); others reconnect to see it.

use std::sync::Arc;

use serde_json::Value;

use super::resize_protocol::{ResizeReply, ResizeRequest};
use super::socket::{unknown_export, ControlState};
use crate::keys::AuditWriter;
use crate::volume::{Growth, Volume};

/// Answers one `resize` request.
pub(super) async fn resize(st: &ControlState, req: ResizeRequest) -> Result<Value, String> {
    let e = st
        .shared
        .exports
        .get(&req.export)
        .ok_or_else(|| unknown_export(st, &req.export))?;
    if e.volume.read_only() {
        return Err(format!(
            "export {:?} is served read-only; serve it read-write to grow it",
            req.export
        ));
    }
    // Opened first: a grow that cannot be audited is refused (as offline).
    let audit = match &st.shared.config.audit_log {
        Some(log) => Some(log.open().map_err(|e| e.to_string())?),
        None => None,
    };
    let volume = e.volume.clone();
    let to = req.to;
    let old = volume.size();
    let grown = tokio::task::spawn_blocking(move || volume.grow_online(&|s| to.resolve(s)))
        .await
        .map_err(|e| format!("the grow task failed: {e}"))?;
    let detail = match &grown {
        Ok(g) => format!(
            "path={} size={}->{} online=true",
            e.volume.path(),
            g.old_size,
            g.new_size
        ),
        Err(_) => format!("path={} size={} online=true", e.volume.path(), old),
    };
    let audited = record(audit.as_ref(), &e.volume, &detail, grown.as_ref().err());
    let g = grown.map_err(|e| e.to_string())?;
    audited?;
    log_growth(&req.export, &e.volume, &g, e.connections());
    let reply = ResizeReply {
        export: req.export,
        old_size: g.old_size,
        new_size: g.new_size,
        map_relocated: g.map_relocated,
        connections: e.connections(),
    };
    serde_json::to_value(reply).map_err(|e| e.to_string())
}

fn record(
    audit: Option<&AuditWriter>,
    volume: &Arc<Volume>,
    detail: &str,
    error: Option<&crate::volume::VolumeError>,
) -> Result<(), String> {
    let Some(audit) = audit else {
        return Ok(());
    };
    audit
        .write_resize(&volume.uuid(), detail, error.map(ToString::to_string))
        .map_err(|e| {
            tracing::error!("cannot audit a grow: {e}");
            format!("the volume was grown, but its audit record could not be written: {e}")
        })
}

fn log_growth(export: &str, volume: &Volume, g: &Growth, connections: usize) {
    tracing::info!(
        export,
        path = volume.path(),
        old_size = g.old_size,
        new_size = g.new_size,
        map_relocated = g.map_relocated,
        "grown online; new connections see the new size, the {connections} open connection(s) keep the size of their handshake (served up to the new size)"
    );
}
