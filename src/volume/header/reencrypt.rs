//! The state of a re-encryption in progress (docs/format.md §7b): the watermark, the
//! new key's keyslots and key check value, and the hotzone of an interrupted step;
//! its semantic checks and its record in the metadata JSON.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::metadata::decode_b64_32;
use super::slots::{slot_v1, slots_from_v1, SlotV1};
use super::{Header, MAX_KEYSLOTS};
use crate::crypto::SectorSize;
use crate::keys::WrappedDek;
use crate::volume::geometry;

/// A re-encryption in progress (docs/format.md §7b): sectors below `watermark` are
/// under the new DEK, the others under the old one (the DEK of `Header::keyslots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reencryption {
    /// Bytes of the data area already under the new key.
    pub watermark: u64,
    /// The new DEK, wrapped (bound to this volume's encryption context).
    pub keyslots: Vec<WrappedDek>,
    /// Key check value of the new DEK.
    pub key_check: [u8; 32],
    /// The zone being converted, if a step was interrupted.
    pub hotzone: Option<Hotzone>,
}

/// The zone a re-encryption step is converting: `[offset, offset + len)` with the
/// truncated SHA-256 of each sector's *new* ciphertext (all zeros: sector not converted,
/// its chunk being unallocated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hotzone {
    pub offset: u64,
    pub len: u64,
    pub hashes: Vec<[u8; 16]>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ReencV1 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hotzone: Option<HotzoneV1>,
    key_check: String,
    keyslots: Vec<SlotV1>,
    watermark: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct HotzoneV1 {
    /// base64 of the concatenated 16-byte hashes.
    hashes: String,
    length: u64,
    offset: u64,
}

impl Reencryption {
    /// The metadata JSON record.
    pub(super) fn to_v1(&self) -> ReencV1 {
        ReencV1 {
            hotzone: self.hotzone.as_ref().map(|z| HotzoneV1 {
                hashes: B64.encode(z.hashes.concat()),
                length: z.len,
                offset: z.offset,
            }),
            key_check: B64.encode(self.key_check),
            keyslots: self.keyslots.iter().map(slot_v1).collect(),
            watermark: self.watermark,
        }
    }

    /// Decodes the metadata JSON record (structure only; see `Header::validate_reencrypt`).
    pub(super) fn from_v1(r: ReencV1) -> Result<Reencryption, String> {
        let hotzone = r.hotzone.map(Hotzone::from_v1).transpose()?;
        Ok(Reencryption {
            watermark: r.watermark,
            keyslots: slots_from_v1(r.keyslots, "new keyslot")?,
            key_check: decode_b64_32("reencrypt.key_check", &r.key_check)?,
            hotzone,
        })
    }
}

impl Hotzone {
    fn from_v1(z: HotzoneV1) -> Result<Hotzone, String> {
        let raw = B64
            .decode(&z.hashes)
            .map_err(|e| format!("re-encryption hotzone hashes: {e}"))?;
        if raw.len() % 16 != 0 {
            return Err("re-encryption hotzone hashes are not 16-byte values".into());
        }
        let hashes = raw
            .chunks_exact(16)
            .map(|c| {
                let mut a = [0u8; 16];
                a.copy_from_slice(c);
                a
            })
            .collect();
        Ok(Hotzone {
            offset: z.offset,
            len: z.length,
            hashes,
        })
    }
}

impl Header {
    /// Semantic checks of the re-encryption state against the volume geometry
    /// (the sector size is already known to be legal).
    pub(super) fn validate_reencrypt(
        &self,
        r: &Reencryption,
        sector: SectorSize,
    ) -> Result<(), String> {
        if r.watermark > self.size || !geometry::is_sector_aligned(r.watermark, sector) {
            return Err(format!(
                "re-encryption watermark {} (must be a multiple of the sector size, at most the size)",
                r.watermark
            ));
        }
        if r.keyslots.is_empty() || r.keyslots.len() > MAX_KEYSLOTS {
            return Err(format!(
                "{} new keyslots (must be 1 to {MAX_KEYSLOTS})",
                r.keyslots.len()
            ));
        }
        if r.keyslots.iter().any(|k| k.backend.is_empty()) {
            return Err("a new keyslot has an empty backend name".into());
        }
        if let Some(z) = &r.hotzone {
            let ok = z.offset == r.watermark
                && geometry::is_sector_range_within(z.offset, z.len, self.size, sector)
                && z.hashes.len() as u64 == z.len / sector.as_u64();
            if !ok {
                return Err(format!(
                    "re-encryption hotzone [{}, +{}) with {} hashes does not fit the watermark {} and the geometry",
                    z.offset,
                    z.len,
                    z.hashes.len(),
                    r.watermark
                ));
            }
        }
        Ok(())
    }
}
