//! The `status` request: every export with its volume's state and any re-encryption.

use serde_json::Value;

use super::protocol::{ExportStatus, ReencryptInfo, StatusReply};
use super::socket::ControlState;
use crate::server::reencrypt::JobState;
use crate::volume::Volume;

pub(super) fn reencrypt_info(volume: &Volume, job: Option<&JobState>) -> Option<ReencryptInfo> {
    let status = volume.reencrypt_status();
    match (status, job) {
        (Some(s), j) => Some(ReencryptInfo {
            watermark: s.watermark,
            size: s.size,
            running: j.is_some_and(|j| j.running),
            finished: false,
            last_error: j.and_then(|j| j.last_error.clone()),
        }),
        (None, Some(j)) if j.finished => Some(ReencryptInfo {
            watermark: j.total,
            size: j.total,
            running: false,
            finished: true,
            last_error: None,
        }),
        (None, _) => None,
    }
}

pub(super) fn status_body(st: &ControlState) -> Value {
    let exports = st
        .shared
        .exports
        .iter()
        .map(|e| {
            let v = &e.volume;
            let job = st.jobs.state(&e.info.name);
            ExportStatus {
                name: e.info.name.clone(),
                path: v.path().to_string(),
                uuid: v.uuid().to_string(),
                size: v.size(),
                sector_size: v.sector_size(),
                read_only: v.read_only(),
                connections: e.connections(),
                allocated_bytes: v.allocated_bytes(),
                thin: v.is_thin(),
                reencrypt: reencrypt_info(v, job.as_ref()),
            }
        })
        .collect();
    let reply = StatusReply {
        pid: std::process::id(),
        connections: st
            .shared
            .open_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        exports,
    };
    serde_json::to_value(reply).unwrap_or(Value::Null)
}
