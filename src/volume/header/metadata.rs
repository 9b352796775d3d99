//! The metadata JSON of a header copy: compact, canonical (fields declared in sorted
//! order: serde writes them in declaration order, which makes the compact output
//! canonical), at most [`METADATA_AREA_SIZE`] bytes.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::alloc::{self, MapLayout};
use super::reencrypt::{ReencV1, Reencryption};
use super::slots::{slot_v1, slots_from_v1, SlotV1};
use super::{Header, FORMAT_VERSION, METADATA_AREA_SIZE};
use crate::crypto::DEK_LEN;

#[derive(serde::Serialize, serde::Deserialize)]
struct MetaV1 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allocation_map: Option<MapV1>,
    compatible_features: Vec<String>,
    header_mac: String,
    key_check: String,
    keyslots: Vec<SlotV1>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reencrypt: Option<ReencV1>,
    required_features: Vec<String>,
    volume: VolumeV1,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MapV1 {
    chunk_size: u32,
    copy_offsets: [u64; 2],
    page_size: u32,
    pages: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct VolumeV1 {
    cipher: String,
    data_offset: u64,
    iv_unit: u32,
    key_bytes: u32,
    sector_size: u32,
    size: u64,
    uuid: uuid::Uuid,
}

impl MapV1 {
    fn from_layout(m: MapLayout) -> MapV1 {
        MapV1 {
            chunk_size: m.chunk_size,
            copy_offsets: m.copy_offsets,
            page_size: alloc::PAGE_SIZE as u32,
            pages: m.pages,
        }
    }

    fn into_layout(self) -> Result<MapLayout, String> {
        if self.page_size as usize != alloc::PAGE_SIZE {
            return Err(format!(
                "allocation map page size {} (this cryptvol knows {})",
                self.page_size,
                alloc::PAGE_SIZE
            ));
        }
        Ok(MapLayout {
            chunk_size: self.chunk_size,
            pages: self.pages,
            copy_offsets: self.copy_offsets,
        })
    }
}

pub(super) fn encode_metadata(h: &Header) -> Result<Vec<u8>, String> {
    let meta = MetaV1 {
        allocation_map: h.allocation_map.map(MapV1::from_layout),
        compatible_features: h.compatible_features.clone(),
        header_mac: B64.encode(h.header_mac),
        key_check: B64.encode(h.key_check),
        keyslots: h.keyslots.iter().map(slot_v1).collect(),
        reencrypt: h.reencrypt.as_ref().map(Reencryption::to_v1),
        required_features: h.required_features.clone(),
        volume: VolumeV1 {
            cipher: h.cipher.clone(),
            data_offset: h.data_offset,
            iv_unit: h.iv_unit,
            key_bytes: DEK_LEN as u32,
            sector_size: h.sector_size,
            size: h.size,
            uuid: h.uuid,
        },
    };
    let json = serde_json::to_vec(&meta).map_err(|e| format!("cannot encode metadata: {e}"))?;
    if json.len() > METADATA_AREA_SIZE {
        return Err(format!(
            "metadata is {} bytes, more than the {METADATA_AREA_SIZE}-byte metadata area; remove keyslots",
            json.len()
        ));
    }
    Ok(json)
}

/// Whether the header's metadata fits in the metadata area.
pub(crate) fn fits_metadata(h: &Header) -> Result<(), String> {
    encode_metadata(h).map(|_| ())
}

pub(super) fn decode_b64_32(what: &str, s: &str) -> Result<[u8; 32], String> {
    let v = B64
        .decode(s)
        .map_err(|e| format!("{what} is not valid base64: {e}"))?;
    <[u8; 32]>::try_from(v.as_slice())
        .map_err(|_| format!("{what} is {} bytes, expected 32", v.len()))
}

/// Parses the metadata JSON of a copy whose binary header gave `version`,
/// `sequence` and `uuid`.
pub(super) fn decode_metadata(
    json: &[u8],
    sequence: u64,
    uuid: uuid::Uuid,
) -> Result<Header, String> {
    let m: MetaV1 =
        serde_json::from_slice(json).map_err(|e| format!("metadata is not valid: {e}"))?;
    check_volume_record(&m.volume, uuid)?;
    let allocation_map = m.allocation_map.map(MapV1::into_layout).transpose()?;
    let keyslots = slots_from_v1(m.keyslots, "keyslot")?;
    let reencrypt = m.reencrypt.map(Reencryption::from_v1).transpose()?;
    Ok(Header {
        format_version: FORMAT_VERSION,
        sequence,
        uuid,
        size: m.volume.size,
        sector_size: m.volume.sector_size,
        data_offset: m.volume.data_offset,
        cipher: m.volume.cipher,
        keyslots,
        iv_unit: m.volume.iv_unit,
        required_features: m.required_features,
        compatible_features: m.compatible_features,
        allocation_map,
        reencrypt,
        key_check: decode_b64_32("key_check", &m.key_check)?,
        header_mac: decode_b64_32("header_mac", &m.header_mac)?,
    })
}

/// The volume record must name the binary header's UUID and the v1 key size.
fn check_volume_record(v: &VolumeV1, uuid: uuid::Uuid) -> Result<(), String> {
    if v.uuid != uuid {
        return Err(format!(
            "metadata UUID {} differs from the binary header's {uuid}",
            v.uuid
        ));
    }
    if v.key_bytes as usize != DEK_LEN {
        return Err(format!(
            "key size {} bytes (format v1 requires {DEK_LEN})",
            v.key_bytes
        ));
    }
    Ok(())
}
