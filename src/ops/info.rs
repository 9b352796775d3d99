//! What `cryptvol info` shows about a volume, read from its header and allocation map
//! without any key: geometry, keyslots (never key material), the health of both header
//! copies and of the map, and a re-encryption in progress.

use std::path::Path;

use crate::keys::WrappedDek;
use crate::volume::{self, CopyStatus, MapHealth, MapSummary};

use super::OpsError;

/// What `cryptvol info` shows. Never key material.
#[derive(Debug, serde::Serialize)]
pub struct VolumeInfo {
    pub path: String,
    pub format_version: u32,
    pub uuid: String,
    pub size: u64,
    pub sector_size: u32,
    pub data_offset: u64,
    pub cipher: String,
    pub sequence: u64,
    pub keyslots: Vec<KeyslotInfo>,
    pub header: HeaderHealthInfo,
    /// The allocation map (thin volumes); `null` for volumes made before it existed
    /// (everything allocated). Read from the file: on a served volume it reflects the
    /// last flush.
    pub allocation: Option<AllocationInfo>,
    /// A re-encryption under a new data key in progress (`null` when none): as recorded
    /// in the header (on a served volume, as of the last step).
    pub reencrypt: Option<ReencryptionInfo>,
}

/// `cryptvol info`: the header's record of a re-encryption in progress.
#[derive(Debug, serde::Serialize)]
pub struct ReencryptionInfo {
    /// Bytes of the data area already under the new data key.
    pub watermark: u64,
    /// Size of the data area.
    pub size: u64,
    /// Wrapped copies of the new data key (they replace the keyslots at the end).
    pub new_keyslots: Vec<KeyslotInfo>,
    /// The zone of a step interrupted by a crash (finished when the volume is next
    /// opened for writing), or `null`.
    pub hotzone: Option<HotzoneInfo>,
}

/// The zone of an interrupted re-encryption step.
#[derive(Debug, serde::Serialize)]
pub struct HotzoneInfo {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct AllocationInfo {
    pub chunk_size: u32,
    pub chunks: u64,
    pub allocated_chunks: u64,
    pub allocated_bytes: u64,
    /// "ok", or what is wrong with the map.
    pub map: String,
    pub map_healthy: bool,
    pub map_pages: u64,
    pub map_pages_one_copy_bad: u64,
    pub map_pages_damaged: Vec<u64>,
}

#[derive(Debug, serde::Serialize)]
pub struct KeyslotInfo {
    pub slot: usize,
    pub backend: String,
    pub key_id: String,
    pub encryption_context: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, serde::Serialize)]
pub struct HeaderHealthInfo {
    pub primary: String,
    pub secondary: String,
    pub healthy: bool,
}

/// How `cryptvol info` describes one header copy.
fn copy_status(c: &CopyStatus) -> String {
    match c {
        CopyStatus::Ok => "ok".to_string(),
        CopyStatus::Stale(seq) => format!("stale (sequence {seq})"),
        CopyStatus::Damaged(reason) => format!("damaged: {reason}"),
    }
}

/// Describes a volume from its header and allocation map (no key needed).
pub fn info(path: &Path) -> Result<VolumeInfo, OpsError> {
    let (h, health) = volume::read_header(path)?;
    let allocation = volume::map_summary(path, &h)?.map(allocation_info);
    let reencrypt = h.reencrypt.as_ref().map(|r| ReencryptionInfo {
        watermark: r.watermark,
        size: h.size,
        new_keyslots: keyslot_infos(&r.keyslots),
        hotzone: r.hotzone.as_ref().map(|z| HotzoneInfo {
            offset: z.offset,
            length: z.len,
        }),
    });
    Ok(VolumeInfo {
        allocation,
        reencrypt,
        path: path.display().to_string(),
        format_version: h.format_version,
        uuid: h.uuid.to_string(),
        size: h.size,
        sector_size: h.sector_size,
        data_offset: h.data_offset,
        cipher: h.cipher.clone(),
        sequence: h.sequence,
        keyslots: keyslot_infos(&h.keyslots),
        header: HeaderHealthInfo {
            primary: copy_status(&health.primary),
            secondary: copy_status(&health.secondary),
            healthy: health.primary == CopyStatus::Ok && health.secondary == CopyStatus::Ok,
        },
    })
}

/// The keyslots as `cryptvol info` lists them (backend, key id, context; no key material).
fn keyslot_infos(slots: &[WrappedDek]) -> Vec<KeyslotInfo> {
    slots
        .iter()
        .enumerate()
        .map(|(slot, k)| KeyslotInfo {
            slot,
            backend: k.backend.clone(),
            key_id: k.key_id.clone(),
            encryption_context: k.context.0.clone(),
        })
        .collect()
}

/// The allocation map's summary as `cryptvol info` shows it.
fn allocation_info(m: MapSummary) -> AllocationInfo {
    AllocationInfo {
        chunk_size: m.chunk_size,
        chunks: m.chunks,
        allocated_chunks: m.allocated_chunks,
        allocated_bytes: m.allocated_bytes,
        map: map_status(&m.health),
        map_healthy: m.health.is_healthy(),
        map_pages: m.health.pages,
        map_pages_one_copy_bad: m.health.pages_one_copy_bad,
        map_pages_damaged: m.health.pages_damaged,
    }
}

/// "ok", or what is wrong with the allocation map and what happens to it.
fn map_status(health: &MapHealth) -> String {
    if health.is_healthy() {
        "ok".to_string()
    } else if !health.pages_damaged.is_empty() {
        format!(
            "{} of {} pages damaged in both copies (treated as allocated; rewritten when the volume is next opened for writing)",
            health.pages_damaged.len(),
            health.pages
        )
    } else {
        format!(
            "{} of {} pages have one damaged copy (the other is used; repaired when the volume is next opened for writing)",
            health.pages_one_copy_bad, health.pages
        )
    }
}
