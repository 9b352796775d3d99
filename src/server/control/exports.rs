//! The live export requests: `export-add` (unlock through the daemon's hook, then serve),
//! `export-remove` (refused with clients unless forced) and `export-list`. The work is
//! [`crate::server::live`]'s; this module answers the control client.

use serde_json::Value;

use super::exports_protocol::{ExportAdd, ExportEntry, ExportList, ExportsRequest};
use super::socket::ControlState;
use crate::server::Export;

/// Answers one live export request.
pub(super) async fn handle(st: &ControlState, req: ExportsRequest) -> Result<Value, String> {
    match req {
        ExportsRequest::List => Ok(list(st)),
        ExportsRequest::Add(add) => export_add(st, &add).await,
        ExportsRequest::Remove { name, force } => {
            let removed = st
                .live
                .remove(&name, force)
                .await
                .map_err(|e| e.to_string())?;
            Ok(serde_json::json!({ "export": name, "disconnected": removed.disconnected }))
        }
    }
}

/// `export-add`: refuses a name already served before any key is unwrapped, then opens
/// the volume through the daemon's hook and serves it.
async fn export_add(st: &ControlState, add: &ExportAdd) -> Result<Value, String> {
    if st.live.contains(&add.name) {
        return Err(crate::server::LiveError::AlreadyServed(add.name.clone()).to_string());
    }
    let Some(opener) = &st.hooks.exports else {
        return Err("this daemon cannot add exports (no export opener configured)".into());
    };
    let export = opener.open(add).await.map_err(|e| e.to_string())?;
    let added = st.live.add(export).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({ "export": entry(&added) }))
}

fn list(st: &ControlState) -> Value {
    let reply = ExportList {
        exports: st.live.list().iter().map(|e| entry(e)).collect(),
    };
    serde_json::to_value(reply).unwrap_or(Value::Null)
}

fn entry(e: &Export) -> ExportEntry {
    ExportEntry {
        name: e.info.name.clone(),
        path: e.volume.path().to_string(),
        size: e.volume.size(),
        read_only: e.info.read_only,
        connections: e.connections(),
    }
}
