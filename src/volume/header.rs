//! On-disk header format v1 (see docs/format.md for the byte layout).
//!
//! Two copies of 64 KiB each (primary at 0, secondary at 64 KiB). Each copy is a
//! 4096-byte little-endian binary header followed by a 60 KiB metadata area holding
//! compact canonical JSON (sorted keys), zero-padded. A SHA-256 checksum over the
//! whole copy detects accidental damage; a key check value (KCV) and a header MAC,
//! both keyed from the DEK, detect a wrong key and deliberate tampering.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::alloc::{self, MapLayout};
use super::{VolumeError, VolumeSpec, CIPHER, DEFAULT_DATA_OFFSET};
use crate::crypto::{CryptoError, Dek, DEK_LEN};
use crate::keys::{EncryptionContext, WrappedDek};

/// The format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of one header copy (binary header + metadata area).
pub const HEADER_COPY_SIZE: u64 = 64 * 1024;
/// Size of the binary part of a copy.
pub const BINARY_HEADER_SIZE: usize = 4096;
/// Size of the metadata area of a copy.
pub const METADATA_AREA_SIZE: usize = HEADER_COPY_SIZE as usize - BINARY_HEADER_SIZE;
/// Both copies: the smallest possible data offset would be this (the format requires 1 MiB).
pub const HEADER_AREA_SIZE: u64 = 2 * HEADER_COPY_SIZE;
/// Most keyslots a header may hold.
pub const MAX_KEYSLOTS: usize = 32;
/// Magic of the primary copy.
pub const MAGIC_PRIMARY: [u8; 8] = *b"CRYPTVOL";
/// Magic of the secondary copy (the primary's, reversed).
pub const MAGIC_SECONDARY: [u8; 8] = *b"LOVTPYRC";
/// Required features this version understands (none yet).
pub const KNOWN_REQUIRED_FEATURES: &[&str] = &[alloc::FEATURE, REENCRYPT_FEATURE];
/// The required feature of a volume with a re-encryption in progress.
pub const REENCRYPT_FEATURE: &str = "reencrypt";

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

const COPY_LEN: usize = HEADER_COPY_SIZE as usize;
const CSUM_ALG_SHA256: u8 = 1;
const KCV_INFO: &[u8] = b"cryptvol kcv";
const MAC_INFO: &[u8] = b"cryptvol header mac";
const MAC_DOMAIN: &[u8] = b"cryptvol header mac v1\0";

// Binary header field offsets (all integers little-endian).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_COPY_INDEX: usize = 12;
const OFF_CSUM_ALG: usize = 13;
const OFF_RESERVED1: usize = 14;
const OFF_COPY_SIZE: usize = 16;
const OFF_COPY_OFFSET: usize = 24;
const OFF_SEQUENCE: usize = 32;
const OFF_UUID: usize = 40;
const OFF_META_LEN: usize = 56;
const OFF_RESERVED2: usize = 60;
const OFF_SALT: usize = 64;
const OFF_CSUM: usize = 96;
const OFF_PADDING: usize = 128;

/// Health of one header copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum CopyStatus {
    /// Valid and current.
    Ok,
    /// Valid but older than the other copy (sequence number given).
    Stale(u64),
    /// Unreadable: the reason.
    Damaged(String),
}

/// Health of both copies.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderHealth {
    pub primary: CopyStatus,
    pub secondary: CopyStatus,
}

impl HeaderHealth {
    /// Both copies valid and current.
    pub fn is_healthy(&self) -> bool {
        self.primary == CopyStatus::Ok && self.secondary == CopyStatus::Ok
    }
}

/// The decoded header (the winning copy).
#[derive(Debug, Clone)]
pub struct Header {
    pub format_version: u32,
    pub sequence: u64,
    pub uuid: uuid::Uuid,
    pub size: u64,
    pub sector_size: u32,
    pub data_offset: u64,
    pub cipher: String,
    pub keyslots: Vec<WrappedDek>,
    /// Bytes per XTS tweak increment; format v1 requires it to equal `sector_size`
    /// (tweak = sector index from the start of the data area, dm-crypt plain64 with
    /// `iv_large_sectors`).
    pub iv_unit: u32,
    /// Features a reader must understand to use this volume (unknown ⇒ refuse).
    pub required_features: Vec<String>,
    /// Features a reader may ignore (kept verbatim, covered by the MAC).
    pub compatible_features: Vec<String>,
    /// Where the allocation map lives (thin volumes; required feature
    /// `allocation-map`). `None` for volumes made before it existed: everything
    /// is then treated as allocated.
    pub allocation_map: Option<MapLayout>,
    /// A re-encryption in progress (required feature `reencrypt`).
    pub reencrypt: Option<Reencryption>,
    /// HMAC-SHA256(HKDF(DEK, "cryptvol kcv"), uuid): tells a wrong key apart.
    pub key_check: [u8; 32],
    /// HMAC-SHA256(HKDF(DEK, "cryptvol header mac"), covered fields).
    pub header_mac: [u8; 32],
}

impl Header {
    /// Checks the key check value, then the header MAC, with an unwrapped DEK.
    pub fn verify_with_dek(&self, dek: &Dek, path: &Path) -> Result<(), VolumeError> {
        let p = || path.display().to_string();
        let kcv = keyed_mac(dek, KCV_INFO)?.chain_update(self.uuid.as_bytes());
        if kcv.verify_slice(&self.key_check).is_err() {
            return Err(VolumeError::KeyCheckFailed { path: p() });
        }
        let mac = keyed_mac(dek, MAC_INFO)?.chain_update(self.mac_input());
        if mac.verify_slice(&self.header_mac).is_err() {
            return Err(VolumeError::HeaderMacMismatch { path: p() });
        }
        Ok(())
    }

    /// Checks the new DEK of a re-encryption in progress against its key check value.
    pub fn verify_next_dek(&self, dek: &Dek, path: &Path) -> Result<(), VolumeError> {
        let Some(r) = &self.reencrypt else {
            return Err(VolumeError::Reencrypt {
                path: path.display().to_string(),
                detail: "no re-encryption is in progress".into(),
            });
        };
        let kcv = keyed_mac(dek, KCV_INFO)?.chain_update(self.uuid.as_bytes());
        if kcv.verify_slice(&r.key_check).is_err() {
            return Err(VolumeError::KeyCheckFailed {
                path: path.display().to_string(),
            });
        }
        Ok(())
    }

    /// The canonical byte string the header MAC covers (see docs/format.md §5).
    fn mac_input(&self) -> Vec<u8> {
        let mut m = MacInput(Vec::with_capacity(512));
        m.bytes(MAC_DOMAIN);
        m.u32(self.format_version);
        m.raw(self.uuid.as_bytes());
        m.u64(self.size);
        m.u32(self.sector_size);
        m.u64(self.data_offset);
        m.str(&self.cipher);
        m.u32(DEK_LEN as u32);
        m.u32(self.iv_unit);
        m.list(&self.required_features);
        m.list(&self.compatible_features);
        m.u32(self.keyslots.len() as u32);
        for slot in &self.keyslots {
            m.str(&slot.backend);
            m.str(&slot.key_id);
            m.bytes(&slot.blob);
            m.map(&slot.context.0);
            m.map(&slot.params);
        }
        if let Some(map) = &self.allocation_map {
            m.str(alloc::FEATURE);
            m.u32(map.chunk_size);
            m.u32(alloc::PAGE_SIZE as u32);
            m.u64(map.pages);
            m.u64(map.copy_offsets[0]);
            m.u64(map.copy_offsets[1]);
        }
        if let Some(r) = &self.reencrypt {
            m.str(REENCRYPT_FEATURE);
            m.u64(r.watermark);
            m.raw(&r.key_check);
            m.u32(r.keyslots.len() as u32);
            for slot in &r.keyslots {
                m.str(&slot.backend);
                m.str(&slot.key_id);
                m.bytes(&slot.blob);
                m.map(&slot.context.0);
                m.map(&slot.params);
            }
            match &r.hotzone {
                None => m.raw(&[0]),
                Some(z) => {
                    m.raw(&[1]);
                    m.u64(z.offset);
                    m.u64(z.len);
                    m.bytes(&z.hashes.concat());
                }
            }
        }
        m.0
    }

    /// Semantic checks every v1 header must pass (reading and writing alike).
    fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format version {} (expected {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.sector_size != 512 && self.sector_size != 4096 {
            return Err(format!(
                "sector size {} (must be 512 or 4096)",
                self.sector_size
            ));
        }
        if self.iv_unit != self.sector_size {
            return Err(format!(
                "IV unit {} differs from the sector size {} (format v1 requires them equal)",
                self.iv_unit, self.sector_size
            ));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(self.sector_size)) {
            return Err(format!(
                "volume size {} is not a positive multiple of the sector size {}",
                self.size, self.sector_size
            ));
        }
        if self.data_offset < DEFAULT_DATA_OFFSET || !self.data_offset.is_multiple_of(4096) {
            return Err(format!(
                "data offset {} (must be a multiple of 4096 and at least {DEFAULT_DATA_OFFSET})",
                self.data_offset
            ));
        }
        match self.data_offset.checked_add(self.size) {
            Some(end) if end <= i64::MAX as u64 => {}
            _ => return Err("data offset + size exceeds the largest possible file".into()),
        }
        if self.cipher != CIPHER {
            return Err(format!(
                "cipher {:?} (format v1 knows only {CIPHER:?})",
                self.cipher
            ));
        }
        if self.keyslots.is_empty() || self.keyslots.len() > MAX_KEYSLOTS {
            return Err(format!(
                "{} keyslots (must be 1 to {MAX_KEYSLOTS})",
                self.keyslots.len()
            ));
        }
        if self.keyslots.iter().any(|k| k.backend.is_empty()) {
            return Err("a keyslot has an empty backend name".into());
        }
        let announced = self.required_features.iter().any(|f| f == alloc::FEATURE);
        match &self.allocation_map {
            Some(map) if announced => {
                map.validate(self.size, self.sector_size, self.data_offset)?;
            }
            None if !announced => {}
            _ => {
                return Err(format!(
                    "the allocation map and the required feature {:?} must come together",
                    alloc::FEATURE
                ))
            }
        }
        let announced = self
            .required_features
            .iter()
            .any(|f| f == REENCRYPT_FEATURE);
        match &self.reencrypt {
            Some(r) if announced => self.validate_reencrypt(r)?,
            None if !announced => {}
            _ => {
                return Err(format!(
                    "the re-encryption state and the required feature {REENCRYPT_FEATURE:?} must come together"
                ))
            }
        }
        Ok(())
    }

    fn validate_reencrypt(&self, r: &Reencryption) -> Result<(), String> {
        let ss = u64::from(self.sector_size);
        if r.watermark > self.size || !r.watermark.is_multiple_of(ss) {
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
                && z.len > 0
                && z.len.is_multiple_of(ss)
                && z.offset.checked_add(z.len).is_some_and(|e| e <= self.size)
                && z.hashes.len() as u64 == z.len / ss;
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

    fn unknown_required_features(&self) -> Vec<String> {
        self.required_features
            .iter()
            .filter(|f| !KNOWN_REQUIRED_FEATURES.contains(&f.as_str()))
            .cloned()
            .collect()
    }
}

/// Length-prefixed canonical encoding for the MAC input.
struct MacInput(Vec<u8>);

impl MacInput {
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u32(&mut self, v: u32) {
        self.raw(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.raw(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn list(&mut self, l: &[String]) {
        self.u32(l.len() as u32);
        for s in l {
            self.str(s);
        }
    }
    fn map(&mut self, m: &BTreeMap<String, String>) {
        self.u32(m.len() as u32);
        for (k, v) in m {
            self.str(k);
            self.str(v);
        }
    }
}

/// HMAC-SHA256 keyed with HKDF-SHA256(ikm = DEK, salt = none, info) → 32 bytes.
fn keyed_mac(dek: &Dek, info: &[u8]) -> Result<Hmac<Sha256>, VolumeError> {
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, dek.expose())
        .expand(info, &mut key[..])
        .map_err(|_| CryptoError::BadKeyLength(key.len()))?;
    let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key[..])
        .map_err(|_| CryptoError::BadKeyLength(key.len()))?;
    Ok(mac)
}

fn tag32(mac: Hmac<Sha256>) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

pub(crate) fn compute_kcv(dek: &Dek, uuid: &uuid::Uuid) -> Result<[u8; 32], VolumeError> {
    Ok(tag32(
        keyed_mac(dek, KCV_INFO)?.chain_update(uuid.as_bytes()),
    ))
}

fn compute_mac(dek: &Dek, header: &Header) -> Result<[u8; 32], VolumeError> {
    Ok(tag32(
        keyed_mac(dek, MAC_INFO)?.chain_update(header.mac_input()),
    ))
}

// ---------------------------------------------------------------------------
// Metadata JSON (fields declared in sorted order: serde writes them in declaration
// order, which makes the compact output canonical).

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
struct ReencV1 {
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

fn slot_v1(k: &WrappedDek) -> SlotV1 {
    SlotV1 {
        backend: k.backend.clone(),
        blob: B64.encode(&k.blob),
        context: k.context.0.clone(),
        key_id: k.key_id.clone(),
        params: k.params.clone(),
    }
}

fn slots_from_v1(slots: Vec<SlotV1>, what: &str) -> Result<Vec<WrappedDek>, String> {
    let mut out = Vec::with_capacity(slots.len());
    for (i, s) in slots.into_iter().enumerate() {
        let blob = B64
            .decode(&s.blob)
            .map_err(|e| format!("{what} {i}: blob is not valid base64: {e}"))?;
        out.push(WrappedDek {
            backend: s.backend,
            key_id: s.key_id,
            blob,
            context: EncryptionContext(s.context),
            params: s.params,
        });
    }
    Ok(out)
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

#[derive(serde::Serialize, serde::Deserialize)]
struct SlotV1 {
    backend: String,
    blob: String,
    context: BTreeMap<String, String>,
    key_id: String,
    params: BTreeMap<String, String>,
}

fn encode_metadata(h: &Header) -> Result<Vec<u8>, String> {
    let meta = MetaV1 {
        allocation_map: h.allocation_map.map(|m| MapV1 {
            chunk_size: m.chunk_size,
            copy_offsets: m.copy_offsets,
            page_size: alloc::PAGE_SIZE as u32,
            pages: m.pages,
        }),
        compatible_features: h.compatible_features.clone(),
        header_mac: B64.encode(h.header_mac),
        key_check: B64.encode(h.key_check),
        keyslots: h.keyslots.iter().map(slot_v1).collect(),
        reencrypt: h.reencrypt.as_ref().map(|r| ReencV1 {
            hotzone: r.hotzone.as_ref().map(|z| HotzoneV1 {
                hashes: B64.encode(z.hashes.concat()),
                length: z.len,
                offset: z.offset,
            }),
            key_check: B64.encode(r.key_check),
            keyslots: r.keyslots.iter().map(slot_v1).collect(),
            watermark: r.watermark,
        }),
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

fn decode_b64_32(what: &str, s: &str) -> Result<[u8; 32], String> {
    let v = B64
        .decode(s)
        .map_err(|e| format!("{what} is not valid base64: {e}"))?;
    <[u8; 32]>::try_from(v.as_slice())
        .map_err(|_| format!("{what} is {} bytes, expected 32", v.len()))
}

/// Parses the metadata JSON of a copy whose binary header gave `version`,
/// `sequence` and `uuid`.
fn decode_metadata(json: &[u8], sequence: u64, uuid: uuid::Uuid) -> Result<Header, String> {
    let m: MetaV1 =
        serde_json::from_slice(json).map_err(|e| format!("metadata is not valid: {e}"))?;
    if m.volume.uuid != uuid {
        return Err(format!(
            "metadata UUID {} differs from the binary header's {uuid}",
            m.volume.uuid
        ));
    }
    if m.volume.key_bytes as usize != DEK_LEN {
        return Err(format!(
            "key size {} bytes (format v1 requires {DEK_LEN})",
            m.volume.key_bytes
        ));
    }
    let allocation_map = match &m.allocation_map {
        Some(map) if map.page_size as usize != alloc::PAGE_SIZE => {
            return Err(format!(
                "allocation map page size {} (this cryptvol knows {})",
                map.page_size,
                alloc::PAGE_SIZE
            ))
        }
        Some(map) => Some(MapLayout {
            chunk_size: map.chunk_size,
            pages: map.pages,
            copy_offsets: map.copy_offsets,
        }),
        None => None,
    };
    let keyslots = slots_from_v1(m.keyslots, "keyslot")?;
    let reencrypt = match m.reencrypt {
        None => None,
        Some(r) => {
            let hotzone = match r.hotzone {
                None => None,
                Some(z) => {
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
                    Some(Hotzone {
                        offset: z.offset,
                        len: z.length,
                        hashes,
                    })
                }
            };
            Some(Reencryption {
                watermark: r.watermark,
                keyslots: slots_from_v1(r.keyslots, "new keyslot")?,
                key_check: decode_b64_32("reencrypt.key_check", &r.key_check)?,
                hotzone,
            })
        }
    };
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

// ---------------------------------------------------------------------------
// Binary copies.

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn magic_for(index: usize) -> [u8; 8] {
    if index == 0 {
        MAGIC_PRIMARY
    } else {
        MAGIC_SECONDARY
    }
}

fn copy_checksum(copy: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&copy[..OFF_CSUM]);
    h.update([0u8; 32]);
    h.update(&copy[OFF_CSUM + 32..]);
    let mut out = [0u8; 32];
    out.copy_from_slice(&h.finalize());
    out
}

/// Serializes one copy (`index` 0 = primary, 1 = secondary) with a fresh salt.
fn encode_copy(h: &Header, index: usize) -> Result<Vec<u8>, String> {
    let json = encode_metadata(h)?;
    let mut c = vec![0u8; COPY_LEN];
    c[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&magic_for(index));
    c[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&h.format_version.to_le_bytes());
    c[OFF_COPY_INDEX] = index as u8;
    c[OFF_CSUM_ALG] = CSUM_ALG_SHA256;
    c[OFF_COPY_SIZE..OFF_COPY_SIZE + 8].copy_from_slice(&HEADER_COPY_SIZE.to_le_bytes());
    let copy_offset = index as u64 * HEADER_COPY_SIZE;
    c[OFF_COPY_OFFSET..OFF_COPY_OFFSET + 8].copy_from_slice(&copy_offset.to_le_bytes());
    c[OFF_SEQUENCE..OFF_SEQUENCE + 8].copy_from_slice(&h.sequence.to_le_bytes());
    c[OFF_UUID..OFF_UUID + 16].copy_from_slice(h.uuid.as_bytes());
    c[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&(json.len() as u32).to_le_bytes());
    getrandom::fill(&mut c[OFF_SALT..OFF_SALT + 32])
        .map_err(|e| format!("random number generator failed: {e}"))?;
    c[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + json.len()].copy_from_slice(&json);
    let sum = copy_checksum(&c);
    c[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
    Ok(c)
}

/// What one copy turned out to be.
#[derive(Debug)]
enum CopyRead {
    /// No magic of either copy at this place.
    NoMagic(String),
    /// Our magic, but unusable.
    Damaged(String),
    /// Our magic with a format version we do not know.
    UnknownVersion(u32),
    /// Checksum and structure valid.
    Good(Box<Header>),
}

/// Decodes one copy from `bytes` (which may be shorter than a copy when the file is).
fn decode_copy(bytes: &[u8], index: usize) -> CopyRead {
    let magic = bytes.get(OFF_MAGIC..OFF_MAGIC + 8);
    let other = magic_for(1 - index);
    match magic {
        Some(m) if m == magic_for(index) => {}
        Some(m) if m == other => {
            return CopyRead::Damaged(format!(
                "holds the {} copy's magic (misplaced copy)",
                if index == 0 { "secondary" } else { "primary" }
            ))
        }
        Some(_) => return CopyRead::NoMagic("no cryptvol header magic".into()),
        None => {
            return CopyRead::NoMagic(format!(
                "file ends before this copy ({} of {COPY_LEN} bytes present)",
                bytes.len()
            ))
        }
    }
    if bytes.len() < COPY_LEN {
        return CopyRead::Damaged(format!(
            "truncated: {} of {COPY_LEN} bytes present",
            bytes.len()
        ));
    }
    let c = &bytes[..COPY_LEN];
    let version = le_u32(c, OFF_VERSION);
    if version != FORMAT_VERSION {
        return CopyRead::UnknownVersion(version);
    }
    match decode_v1_copy(c, index) {
        Ok(h) => CopyRead::Good(Box::new(h)),
        Err(reason) => CopyRead::Damaged(reason),
    }
}

fn decode_v1_copy(c: &[u8], index: usize) -> Result<Header, String> {
    if c[OFF_CSUM_ALG] != CSUM_ALG_SHA256 {
        return Err(format!("unknown checksum algorithm {}", c[OFF_CSUM_ALG]));
    }
    if copy_checksum(c)[..] != c[OFF_CSUM..OFF_CSUM + 32] {
        return Err("checksum mismatch".into());
    }
    if usize::from(c[OFF_COPY_INDEX]) != index {
        return Err(format!(
            "copy index {} at the place of copy {index}",
            c[OFF_COPY_INDEX]
        ));
    }
    let copy_size = le_u64(c, OFF_COPY_SIZE);
    if copy_size != HEADER_COPY_SIZE {
        return Err(format!(
            "copy size {copy_size} (expected {HEADER_COPY_SIZE})"
        ));
    }
    let copy_offset = le_u64(c, OFF_COPY_OFFSET);
    if copy_offset != index as u64 * HEADER_COPY_SIZE {
        return Err(format!(
            "copy offset {copy_offset} does not match its place (misplaced copy)"
        ));
    }
    let reserved_zero = c[OFF_RESERVED1..OFF_RESERVED1 + 2].iter().all(|&b| b == 0)
        && c[OFF_RESERVED2..OFF_RESERVED2 + 4].iter().all(|&b| b == 0)
        && c[OFF_PADDING..BINARY_HEADER_SIZE].iter().all(|&b| b == 0);
    if !reserved_zero {
        return Err("reserved bytes of the binary header are not zero".into());
    }
    let meta_len = le_u32(c, OFF_META_LEN) as usize;
    if meta_len == 0 || meta_len > METADATA_AREA_SIZE {
        return Err(format!(
            "metadata length {meta_len} (must be 1 to {METADATA_AREA_SIZE})"
        ));
    }
    let area = &c[BINARY_HEADER_SIZE..];
    let (json, tail) = area.split_at(meta_len);
    if tail.iter().any(|&b| b != 0) {
        return Err("bytes after the metadata are not zero".into());
    }
    let mut uuid_bytes = [0u8; 16];
    uuid_bytes.copy_from_slice(&c[OFF_UUID..OFF_UUID + 16]);
    let uuid = uuid::Uuid::from_bytes(uuid_bytes);
    let h = decode_metadata(json, le_u64(c, OFF_SEQUENCE), uuid)?;
    // Unknown required features are reported by the caller (they change the meaning
    // of the fields, so semantic validation only applies without them).
    if h.unknown_required_features().is_empty() {
        h.validate()?;
    }
    Ok(h)
}

/// The result of reading both copies.
struct Copies {
    reads: [CopyRead; 2],
    file_len: u64,
}

impl Copies {
    fn good(&self, i: usize) -> Option<&Header> {
        match &self.reads[i] {
            CopyRead::Good(h) => Some(h),
            _ => None,
        }
    }

    /// Index of the winning copy: highest sequence among good copies (primary on a tie).
    fn winner(&self) -> Option<usize> {
        match (self.good(0), self.good(1)) {
            (Some(p), Some(s)) => Some(if s.sequence > p.sequence { 1 } else { 0 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        }
    }

    fn status(&self, i: usize, winner: &Header) -> CopyStatus {
        match &self.reads[i] {
            CopyRead::Good(h) if h.uuid != winner.uuid => CopyStatus::Damaged(format!(
                "belongs to another volume (UUID {}, the other copy has {})",
                h.uuid, winner.uuid
            )),
            CopyRead::Good(h) if h.sequence < winner.sequence => CopyStatus::Stale(h.sequence),
            CopyRead::Good(_) => CopyStatus::Ok,
            CopyRead::NoMagic(r) | CopyRead::Damaged(r) => CopyStatus::Damaged(r.clone()),
            CopyRead::UnknownVersion(v) => {
                CopyStatus::Damaged(format!("unknown format version {v}"))
            }
        }
    }

    fn reason(&self, i: usize) -> String {
        match &self.reads[i] {
            CopyRead::NoMagic(r) | CopyRead::Damaged(r) => r.clone(),
            CopyRead::UnknownVersion(v) => format!("unknown format version {v}"),
            CopyRead::Good(_) => "valid".into(),
        }
    }

    /// The winning header and the health of both copies, or why there is none.
    fn resolve(&self, path: &Path) -> Result<(Header, HeaderHealth), VolumeError> {
        let p = || path.display().to_string();
        for r in &self.reads {
            if let CopyRead::UnknownVersion(version) = r {
                return Err(VolumeError::UnsupportedVersion {
                    path: p(),
                    version: *version,
                    supported: FORMAT_VERSION.to_string(),
                });
            }
        }
        let Some(w) = self.winner() else {
            let no_magic = self.reads.iter().all(|r| matches!(r, CopyRead::NoMagic(_)));
            if no_magic {
                return Err(VolumeError::NotAVolume { path: p() });
            }
            if self.file_len < HEADER_AREA_SIZE {
                return Err(VolumeError::Truncated {
                    path: p(),
                    detail: format!(
                        "{} bytes, but the two header copies alone need {HEADER_AREA_SIZE}",
                        self.file_len
                    ),
                });
            }
            return Err(VolumeError::BothHeadersDamaged {
                path: p(),
                primary: self.reason(0),
                secondary: self.reason(1),
            });
        };
        let Some(winner) = self.good(w) else {
            return Err(VolumeError::NotAVolume { path: p() });
        };
        let unknown = winner.unknown_required_features();
        if !unknown.is_empty() {
            return Err(VolumeError::UnsupportedFeature {
                path: p(),
                features: unknown.join(", "),
            });
        }
        let health = HeaderHealth {
            primary: self.status(0, winner),
            secondary: self.status(1, winner),
        };
        Ok((winner.clone(), health))
    }
}

fn io_err(path: &Path, source: std::io::Error) -> VolumeError {
    match source.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => VolumeError::NoSpace(source),
        _ => VolumeError::Io {
            path: path.display().to_string(),
            source,
        },
    }
}

/// Reads up to `buf.len()` bytes at `offset`, stopping early only at end of file.
/// Returns the number of bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_copies(file: &File, path: &Path) -> Result<Copies, VolumeError> {
    let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let mut buf = vec![0u8; HEADER_AREA_SIZE as usize];
    let n = read_full_at(file, &mut buf, 0).map_err(|e| io_err(path, e))?;
    let buf = &buf[..n];
    let primary = decode_copy(buf, 0);
    let secondary = decode_copy(buf.get(COPY_LEN..).unwrap_or(&[]), 1);
    Ok(Copies {
        reads: [primary, secondary],
        file_len,
    })
}

/// Takes an flock, retrying on EINTR.
fn flock(file: File, arg: FlockArg) -> Result<Flock<File>, (File, Errno)> {
    let mut file = file;
    loop {
        match Flock::lock(file, arg) {
            Err((f, Errno::EINTR)) => file = f,
            other => return other,
        }
    }
}

/// Reads and validates both header copies without any key. The highest valid sequence wins.
pub fn read_header(path: &Path) -> Result<(Header, HeaderHealth), VolumeError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    // A shared lock keeps us from reading a copy while a writer is replacing it; a
    // filesystem without flock support is read unlocked.
    let copies = match flock(file, FlockArg::LockShared) {
        Ok(locked) => read_copies(&locked, path)?,
        Err((file, _)) => read_copies(&file, path)?,
    };
    copies.resolve(path)
}

/// Checks that a valid copy on disk (if any) belongs to `uuid`. Used by `Volume::open`.
pub(crate) fn check_file_uuid(
    file: &File,
    path: &Path,
    uuid: uuid::Uuid,
) -> Result<(), VolumeError> {
    let copies = read_copies(file, path)?;
    for h in [copies.good(0), copies.good(1)].into_iter().flatten() {
        if h.uuid != uuid {
            return Err(VolumeError::InvalidHeader {
                path: path.display().to_string(),
                detail: format!(
                    "the header given is for volume {uuid}, but this file holds volume {}",
                    h.uuid
                ),
            });
        }
    }
    Ok(())
}

/// Creates a new thin volume file (refusing to overwrite) with the given keyslots; the
/// key check value and MAC are computed from `dek`. The data area is left sparse and
/// the allocation map empty: the volume reads as zeros.
pub fn create(
    path: &Path,
    spec: &VolumeSpec,
    uuid: uuid::Uuid,
    keyslots: Vec<WrappedDek>,
    dek: &Dek,
) -> Result<Header, VolumeError> {
    create_with(path, spec, uuid, keyslots, dek, true)
}

/// [`create`], choosing whether the volume gets an allocation map. Without one
/// (`thin = false`) the volume has the original v1 layout that cryptvol versions
/// before the map can open, and its never-written blocks read as pseudo-random bytes.
pub fn create_with(
    path: &Path,
    spec: &VolumeSpec,
    uuid: uuid::Uuid,
    keyslots: Vec<WrappedDek>,
    dek: &Dek,
    thin: bool,
) -> Result<Header, VolumeError> {
    let p = || path.display().to_string();
    if spec.sector_size != 512 && spec.sector_size != 4096 {
        return Err(VolumeError::BadSectorSize(spec.sector_size));
    }
    if spec.size == 0 || !spec.size.is_multiple_of(u64::from(spec.sector_size)) {
        return Err(VolumeError::BadSize {
            size: spec.size,
            sector_size: spec.sector_size,
        });
    }
    let (layout, data_offset) = if thin {
        let (l, off) = MapLayout::for_size(spec.size);
        (Some(l), off)
    } else {
        (None, DEFAULT_DATA_OFFSET)
    };
    let mut header = Header {
        format_version: FORMAT_VERSION,
        sequence: 1,
        uuid,
        size: spec.size,
        sector_size: spec.sector_size,
        data_offset,
        cipher: CIPHER.to_string(),
        keyslots,
        iv_unit: spec.sector_size,
        required_features: layout
            .map(|_| alloc::FEATURE.to_string())
            .into_iter()
            .collect(),
        compatible_features: Vec::new(),
        allocation_map: layout,
        reencrypt: None,
        key_check: compute_kcv(dek, &uuid)?,
        header_mac: [0u8; 32],
    };
    header
        .validate()
        .map_err(|detail| VolumeError::InvalidHeader { path: p(), detail })?;
    header.header_mac = compute_mac(dek, &header)?;
    let copies = [encode_copy(&header, 0), encode_copy(&header, 1)];
    let [Ok(primary), Ok(secondary)] = copies else {
        let detail = copies.into_iter().find_map(Result::err).unwrap_or_default();
        return Err(VolumeError::InvalidHeader { path: p(), detail });
    };

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => VolumeError::AlreadyExists { path: p() },
            _ => io_err(path, e),
        })?;
    let result = (|| -> std::io::Result<()> {
        file.write_all_at(&primary, 0)?;
        file.write_all_at(&secondary, HEADER_COPY_SIZE)?;
        if let Some(layout) = &layout {
            alloc::write_initial(&file, layout, &uuid)?;
        }
        file.set_len(header.data_offset + header.size)?;
        file.sync_all()?;
        sync_parent_dir(path)
    })();
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_err(path, e));
    }
    Ok(header)
}

fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Which copy to write first: the one that is not the current valid winner, so that
/// a crash while writing it leaves the winner untouched, and a crash while writing the
/// second leaves the first one valid at the new sequence.
fn write_order(health: Option<&HeaderHealth>) -> [usize; 2] {
    match health {
        Some(h) if h.primary == CopyStatus::Ok && h.secondary != CopyStatus::Ok => [1, 0],
        _ => [0, 1],
    }
}

/// A header write, planned: the new header and the copies in the order to write them.
struct WritePlan {
    header: Header,
    writes: [(u64, Vec<u8>); 2],
}

fn plan_write(
    file: &File,
    path: &Path,
    header: &Header,
    dek: &Dek,
) -> Result<WritePlan, VolumeError> {
    let p = || path.display().to_string();
    let copies = read_copies(file, path)?;
    let on_disk = match copies.resolve(path) {
        Ok((h, health)) => Some((h, health)),
        // Both copies damaged: rewriting them from a header the DEK authenticates is
        // the repair. Everything else (not ours, truncated, newer format) is refused.
        Err(VolumeError::BothHeadersDamaged { .. }) => None,
        Err(e) => return Err(e),
    };
    if compute_kcv(dek, &header.uuid)? != header.key_check {
        return Err(VolumeError::KeyCheckFailed { path: p() });
    }
    let mut new = header.clone();
    new.validate()
        .map_err(|detail| VolumeError::InvalidHeader { path: p(), detail })?;
    let disk_seq = match &on_disk {
        Some((h, _)) if h.uuid != header.uuid => {
            return Err(VolumeError::InvalidHeader {
                path: p(),
                detail: format!(
                    "refusing to write the header of volume {} over volume {}",
                    header.uuid, h.uuid
                ),
            })
        }
        Some((h, _)) if h.sequence > header.sequence => {
            return Err(VolumeError::InvalidHeader {
                path: p(),
                detail: format!(
                    "the header on disk was updated since it was read (sequence {} > {}); read it again and retry",
                    h.sequence, header.sequence
                ),
            })
        }
        Some((h, _)) => h.sequence,
        None => 0,
    };
    new.sequence = header
        .sequence
        .max(disk_seq)
        .checked_add(1)
        .ok_or_else(|| VolumeError::InvalidHeader {
            path: p(),
            detail: "sequence number exhausted".into(),
        })?;
    new.header_mac = compute_mac(dek, &new)?;
    let order = write_order(on_disk.as_ref().map(|(_, h)| h));
    let mut writes = Vec::with_capacity(2);
    for index in order {
        let bytes = encode_copy(&new, index)
            .map_err(|detail| VolumeError::InvalidHeader { path: p(), detail })?;
        writes.push((index as u64 * HEADER_COPY_SIZE, bytes));
    }
    let [first, second]: [(u64, Vec<u8>); 2] =
        writes.try_into().map_err(|_| VolumeError::InvalidHeader {
            path: p(),
            detail: "internal: expected two header copies".into(),
        })?;
    Ok(WritePlan {
        header: new,
        writes: [first, second],
    })
}

/// Writes `header` (sequence bumped) crash-safely: primary, fsync, secondary, fsync.
/// Repairs a damaged copy as a side effect.
///
/// Under an exclusive flock: re-reads both copies, checks that `dek` matches the
/// header's key check value, that the file holds the same volume (or no valid header
/// at all) and that the header on disk is not newer than `header` (a concurrent update
/// would otherwise be lost), sets the sequence to one more than the highest, recomputes
/// the MAC, then writes the two copies one after the other with an fdatasync after each.
/// The copy that is not currently valid (damaged or stale) is written first; when both
/// are valid, the primary goes first. On success `header` holds the new sequence and MAC.
pub fn write_header(path: &Path, header: &mut Header, dek: &Dek) -> Result<(), VolumeError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let file = flock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err(path, std::io::Error::from_raw_os_error(errno as i32)))?;
    let plan = plan_write(&file, path, header, dek)?;
    for (i, (offset, bytes)) in plan.writes.iter().enumerate() {
        let step = if i == 0 {
            "header-copy-1"
        } else {
            "header-copy-2"
        };
        // Fault injection (tests only, see `super::crash_point`): a torn copy of which
        // only the first four 512-byte sectors (the new sequence and checksum, not the
        // new metadata) reached the disk.
        let torn = format!("{step}-torn");
        if super::crash_point_active(&torn) {
            let _ = file
                .write_all_at(&bytes[..2048], *offset)
                .and_then(|()| file.sync_data());
            super::crash_point(&torn);
        }
        file.write_all_at(bytes, *offset)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_err(path, e))?;
        super::crash_point(step);
    }
    *header = plan.header;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(crate) fn dummy_slot(uuid: &uuid::Uuid, tag: &str) -> WrappedDek {
        let mut params = BTreeMap::new();
        params.insert("tag".to_string(), tag.to_string());
        WrappedDek {
            backend: "local".into(),
            key_id: format!("key-{tag}"),
            blob: vec![0xA5; 60],
            context: EncryptionContext::for_volume(uuid),
            params,
        }
    }

    pub(crate) fn new_volume(dir: &Path, size: u64, sector_size: u32) -> (PathBuf, Header, Dek) {
        let path = dir.join("vol.img");
        let uuid = uuid::Uuid::new_v4();
        let dek = Dek::generate().expect("dek");
        let spec = VolumeSpec { size, sector_size };
        let h = create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek).expect("create");
        (path, h, dek)
    }

    /// A volume as cryptvol made them before the allocation map existed (no map, no
    /// feature): every block is treated as allocated.
    pub(crate) fn new_legacy_volume(
        dir: &Path,
        size: u64,
        sector_size: u32,
    ) -> (PathBuf, Header, Dek) {
        let (path, mut h, dek) = new_volume(dir, size, sector_size);
        h.allocation_map = None;
        h.required_features.clear();
        assert_eq!(
            h.data_offset, DEFAULT_DATA_OFFSET,
            "legacy layout needs the default offset"
        );
        write_header(&path, &mut h, &dek).expect("rewrite header without the map");
        (path, h, dek)
    }

    #[test]
    fn legacy_volume_without_map_still_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_legacy_volume(dir.path(), 1 << 20, 4096);
        let (back, _) = read_header(&path).expect("read");
        assert!(back.allocation_map.is_none() && back.required_features.is_empty());
        back.verify_with_dek(&dek, &path)
            .expect("MAC without map fields");
        assert_eq!(back.header_mac, h.header_mac);
    }

    #[test]
    fn map_and_feature_must_come_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        assert!(h.allocation_map.is_some());
        assert_eq!(h.required_features, vec!["allocation-map".to_string()]);
        let mut t = h.clone();
        t.required_features.clear();
        assert!(matches!(
            write_header(&path, &mut t, &dek),
            Err(VolumeError::InvalidHeader { .. })
        ));
        let mut t = h.clone();
        t.allocation_map = None;
        assert!(matches!(
            write_header(&path, &mut t, &dek),
            Err(VolumeError::InvalidHeader { .. })
        ));
        // Tampering with the map layout is caught by the MAC.
        let mut t = h.clone();
        if let Some(m) = t.allocation_map.as_mut() {
            m.copy_offsets.swap(0, 1);
        }
        assert!(matches!(
            t.verify_with_dek(&dek, &path),
            Err(VolumeError::HeaderMacMismatch { .. })
        ));
    }

    fn read_copy(path: &Path, index: usize) -> Vec<u8> {
        let f = File::open(path).expect("open");
        let mut b = vec![0u8; COPY_LEN];
        f.read_exact_at(&mut b, index as u64 * HEADER_COPY_SIZE)
            .expect("read");
        b
    }

    fn write_copy(path: &Path, index: usize, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        f.write_all_at(bytes, index as u64 * HEADER_COPY_SIZE)
            .expect("write");
    }

    fn corrupt(path: &Path, index: usize, at: usize) {
        let mut c = read_copy(path, index);
        c[at] ^= 0x40;
        write_copy(path, index, &c);
    }

    /// Simulates an attacker: edits a copy's metadata JSON, fixes the length and checksum.
    pub(crate) fn tamper_json(path: &Path, index: usize, f: &dyn Fn(&mut serde_json::Value)) {
        let mut c = read_copy(path, index);
        let len = le_u32(&c, OFF_META_LEN) as usize;
        let mut v: serde_json::Value =
            serde_json::from_slice(&c[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + len]).expect("json");
        f(&mut v);
        let json = serde_json::to_vec(&v).expect("json");
        c[BINARY_HEADER_SIZE..].fill(0);
        c[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + json.len()].copy_from_slice(&json);
        c[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&(json.len() as u32).to_le_bytes());
        let sum = copy_checksum(&c);
        c[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
        write_copy(path, index, &c);
    }

    /// Edits a copy's binary header and fixes the checksum.
    fn tamper_binary(path: &Path, index: usize, f: &dyn Fn(&mut [u8])) {
        let mut c = read_copy(path, index);
        f(&mut c);
        let sum = copy_checksum(&c);
        c[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
        write_copy(path, index, &c);
    }

    fn tamper_both(path: &Path, f: &dyn Fn(&mut serde_json::Value)) {
        tamper_json(path, 0, f);
        tamper_json(path, 1, f);
    }

    #[test]
    fn create_then_read_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, created, dek) = new_volume(dir.path(), 8 << 20, 4096);
        let (h, health) = read_header(&path).expect("read");
        assert!(health.is_healthy(), "{health:?}");
        assert_eq!(h.uuid, created.uuid);
        assert_eq!(h.size, 8 << 20);
        assert_eq!(h.sector_size, 4096);
        assert_eq!(h.iv_unit, 4096);
        assert_eq!(h.data_offset, DEFAULT_DATA_OFFSET);
        assert_eq!(h.cipher, CIPHER);
        assert_eq!(h.sequence, 1);
        assert_eq!(h.keyslots, created.keyslots);
        assert_eq!(h.key_check, created.key_check);
        assert_eq!(h.header_mac, created.header_mac);
        h.verify_with_dek(&dek, &path).expect("verify");
        let len = std::fs::metadata(&path).expect("meta").len();
        assert_eq!(len, DEFAULT_DATA_OFFSET + (8 << 20));
        // Distinct magics and salts: the two copies never hold identical bytes.
        let (a, b) = (read_copy(&path, 0), read_copy(&path, 1));
        assert_eq!(&a[..8], b"CRYPTVOL");
        assert_eq!(&b[..8], b"LOVTPYRC");
        assert_ne!(a[OFF_SALT..OFF_SALT + 32], b[OFF_SALT..OFF_SALT + 32]);
    }

    #[test]
    fn metadata_json_is_canonical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, _) = new_volume(dir.path(), 1 << 20, 512);
        let c = read_copy(&path, 0);
        let len = le_u32(&c, OFF_META_LEN) as usize;
        let text = &c[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + len];
        // serde_json::Value keeps objects in a BTreeMap: re-serializing sorts keys.
        let v: serde_json::Value = serde_json::from_slice(text).expect("json");
        assert_eq!(serde_json::to_vec(&v).expect("json"), text);
    }

    #[test]
    fn damaged_primary_falls_back_and_write_header_repairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, dek) = new_volume(dir.path(), 1 << 20, 4096);
        corrupt(&path, 0, BINARY_HEADER_SIZE + 10);
        let (mut h, health) = read_header(&path).expect("read");
        assert!(matches!(&health.primary, CopyStatus::Damaged(r) if r.contains("checksum")));
        assert_eq!(health.secondary, CopyStatus::Ok);
        h.verify_with_dek(&dek, &path).expect("verify");
        write_header(&path, &mut h, &dek).expect("write");
        assert_eq!(h.sequence, 2);
        let (h2, health2) = read_header(&path).expect("read");
        assert!(health2.is_healthy(), "{health2:?}");
        assert_eq!(h2.sequence, 2);
        h2.verify_with_dek(&dek, &path).expect("verify");
    }

    #[test]
    fn stale_copy_is_reported_and_newest_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        let old_secondary = read_copy(&path, 1);
        h.keyslots.push(dummy_slot(&h.uuid, "b"));
        write_header(&path, &mut h, &dek).expect("write");
        write_copy(&path, 1, &old_secondary);
        let (got, health) = read_header(&path).expect("read");
        assert_eq!(health.primary, CopyStatus::Ok);
        assert_eq!(health.secondary, CopyStatus::Stale(1));
        assert_eq!(got.sequence, 2);
        assert_eq!(got.keyslots.len(), 2);
    }

    #[test]
    fn write_order_writes_the_invalid_copy_first() {
        let ok = CopyStatus::Ok;
        let bad = CopyStatus::Damaged("x".into());
        let h = |p: &CopyStatus, s: &CopyStatus| HeaderHealth {
            primary: p.clone(),
            secondary: s.clone(),
        };
        assert_eq!(write_order(Some(&h(&ok, &ok))), [0, 1]);
        assert_eq!(write_order(Some(&h(&bad, &ok))), [0, 1]);
        assert_eq!(write_order(Some(&h(&ok, &bad))), [1, 0]);
        assert_eq!(write_order(Some(&h(&ok, &CopyStatus::Stale(3)))), [1, 0]);
        assert_eq!(write_order(Some(&h(&CopyStatus::Stale(3), &ok))), [0, 1]);
        assert_eq!(write_order(None), [0, 1]);
    }

    /// A crash after the first write (or a torn first write) leaves a valid header.
    #[test]
    fn crash_during_header_update_leaves_a_valid_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        corrupt(&path, 1, 300); // secondary damaged, primary is the only valid copy
        h.keyslots.push(dummy_slot(&h.uuid, "b"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let plan = plan_write(&file, &path, &h, &dek).expect("plan");
        assert_eq!(
            plan.writes[0].0, HEADER_COPY_SIZE,
            "damaged secondary goes first"
        );
        // Torn first write: the binary header and the start of the metadata land.
        let (off, bytes) = &plan.writes[0];
        file.write_all_at(&bytes[..BINARY_HEADER_SIZE + 10], *off)
            .expect("write");
        let (got, _) = read_header(&path).expect("old header still readable");
        assert_eq!(got.sequence, 1);
        // Complete first write, crash before the second.
        file.write_all_at(bytes, *off).expect("write");
        let (got, health) = read_header(&path).expect("new header readable");
        assert_eq!(got.sequence, 2);
        assert_eq!(got.keyslots.len(), 2);
        assert_eq!(health.primary, CopyStatus::Stale(1));
        got.verify_with_dek(&dek, &path).expect("verify");
    }

    #[test]
    fn stale_in_memory_header_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        let mut first = h.clone();
        let mut second = h;
        first.keyslots.push(dummy_slot(&first.uuid, "b"));
        write_header(&path, &mut first, &dek).expect("write");
        second.keyslots.push(dummy_slot(&second.uuid, "c"));
        match write_header(&path, &mut second, &dek) {
            Err(VolumeError::InvalidHeader { detail, .. }) => {
                assert!(detail.contains("read it again"), "{detail}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let (now, _) = read_header(&path).expect("read");
        assert_eq!(now.keyslots[1].params["tag"], "b");
    }

    #[test]
    fn both_copies_damaged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        corrupt(&path, 0, 5000);
        corrupt(&path, 1, 20);
        match read_header(&path) {
            Err(VolumeError::BothHeadersDamaged {
                primary, secondary, ..
            }) => {
                assert!(primary.contains("checksum"), "{primary}");
                assert!(secondary.contains("checksum"), "{secondary}");
            }
            other => panic!("expected BothHeadersDamaged, got {other:?}"),
        }
        // A header the DEK authenticates (e.g. from a backup) restores both copies.
        write_header(&path, &mut h, &dek).expect("restore");
        let (_, health) = read_header(&path).expect("read");
        assert!(health.is_healthy());
    }

    #[test]
    fn not_a_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").expect("write");
        let zeros = dir.path().join("zeros");
        std::fs::write(&zeros, vec![0u8; 2 << 20]).expect("write");
        let random = dir.path().join("random");
        let mut r = vec![0u8; 300_000];
        getrandom::fill(&mut r).expect("rng");
        std::fs::write(&random, &r).expect("write");
        let short = dir.path().join("short");
        std::fs::write(&short, b"hello").expect("write");
        for p in [&empty, &zeros, &random, &short] {
            assert!(
                matches!(read_header(p), Err(VolumeError::NotAVolume { .. })),
                "{}",
                p.display()
            );
        }
        // Writing a header onto a file that is not a volume is refused too.
        let (_, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        assert!(matches!(
            write_header(&zeros, &mut h, &dek),
            Err(VolumeError::NotAVolume { .. })
        ));
    }

    #[test]
    fn truncated_header_area() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_len(1000).expect("truncate");
        assert!(matches!(
            read_header(&path),
            Err(VolumeError::Truncated { .. })
        ));
    }

    #[test]
    fn missing_file_is_io_error_with_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        match read_header(&dir.path().join("nope")) {
            Err(VolumeError::Io { path, source }) => {
                assert!(path.ends_with("nope"));
                assert_eq!(source.kind(), ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn unknown_version_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
        for i in 0..2 {
            tamper_binary(&path, i, &|c| {
                c[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&2u32.to_le_bytes())
            });
        }
        match read_header(&path) {
            Err(VolumeError::UnsupportedVersion {
                version, supported, ..
            }) => {
                assert_eq!(version, 2);
                assert_eq!(supported, "1");
            }
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
        // Only one copy of a newer version is refused as well (never roll back).
        let (path2, _, _) = new_volume(&dir.path().join("x").tap_mkdir(), 1 << 20, 4096);
        tamper_binary(&path2, 0, &|c| {
            c[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&7u32.to_le_bytes())
        });
        assert!(matches!(
            read_header(&path2),
            Err(VolumeError::UnsupportedVersion { version: 7, .. })
        ));
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> PathBuf;
    }
    impl TapMkdir for PathBuf {
        fn tap_mkdir(self) -> PathBuf {
            std::fs::create_dir_all(&self).expect("mkdir");
            self
        }
    }

    #[test]
    fn unknown_required_feature_refused_compatible_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, dek) = new_volume(dir.path(), 1 << 20, 4096);
        tamper_both(&path, &|v| {
            v["compatible_features"] = serde_json::json!(["shiny"])
        });
        let (h, _) = read_header(&path).expect("compatible feature is fine to read");
        assert_eq!(h.compatible_features, vec!["shiny".to_string()]);
        // ...but it is covered by the MAC.
        assert!(matches!(
            h.verify_with_dek(&dek, &path),
            Err(VolumeError::HeaderMacMismatch { .. })
        ));
        tamper_both(&path, &|v| {
            v["required_features"] = serde_json::json!(["frobnicate", "zap"])
        });
        match read_header(&path) {
            Err(VolumeError::UnsupportedFeature { features, .. }) => {
                assert_eq!(features, "frobnicate, zap")
            }
            other => panic!("expected UnsupportedFeature, got {other:?}"),
        }
    }

    #[test]
    fn create_validates_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dek = Dek::generate().expect("dek");
        let uuid = uuid::Uuid::new_v4();
        let path = dir.path().join("v");
        let bad = [
            (
                VolumeSpec {
                    size: 4096 * 3 + 512,
                    sector_size: 4096,
                },
                "size",
            ),
            (
                VolumeSpec {
                    size: 0,
                    sector_size: 4096,
                },
                "size",
            ),
            (
                VolumeSpec {
                    size: 1 << 20,
                    sector_size: 1024,
                },
                "sector",
            ),
        ];
        for (spec, what) in bad {
            let r = create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek);
            match (what, r) {
                ("size", Err(VolumeError::BadSize { .. })) => {}
                ("sector", Err(VolumeError::BadSectorSize(1024))) => {}
                (_, other) => panic!("{what}: unexpected {other:?}"),
            }
            assert!(!path.exists(), "nothing is left behind");
        }
        let spec = VolumeSpec {
            size: 1 << 20,
            sector_size: 512,
        };
        assert!(matches!(
            create(&path, &spec, uuid, vec![], &dek),
            Err(VolumeError::InvalidHeader { .. })
        ));
        assert!(!path.exists());
        let too_many: Vec<_> = (0..MAX_KEYSLOTS + 1)
            .map(|i| dummy_slot(&uuid, &i.to_string()))
            .collect();
        assert!(create(&path, &spec, uuid, too_many, &dek).is_err());
        assert!(!path.exists());
        let mut huge = dummy_slot(&uuid, "h");
        huge.blob = vec![1; METADATA_AREA_SIZE];
        match create(&path, &spec, uuid, vec![huge], &dek) {
            Err(VolumeError::InvalidHeader { detail, .. }) => {
                assert!(detail.contains("metadata area"), "{detail}")
            }
            other => panic!("expected InvalidHeader, got {other:?}"),
        }
        assert!(!path.exists());
        // 512-byte sectors are accepted.
        create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek).expect("512");
    }

    #[test]
    fn create_refuses_existing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("precious");
        std::fs::write(&path, b"do not touch").expect("write");
        let dek = Dek::generate().expect("dek");
        let uuid = uuid::Uuid::new_v4();
        let spec = VolumeSpec {
            size: 1 << 20,
            sector_size: 4096,
        };
        assert!(matches!(
            create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek),
            Err(VolumeError::AlreadyExists { .. })
        ));
        assert_eq!(std::fs::read(&path).expect("read"), b"do not touch");
    }

    #[test]
    fn wrong_dek_fails_key_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut h, _) = new_volume(dir.path(), 1 << 20, 4096);
        let other = Dek::generate().expect("dek");
        assert!(matches!(
            h.verify_with_dek(&other, &path),
            Err(VolumeError::KeyCheckFailed { .. })
        ));
        assert!(matches!(
            write_header(&path, &mut h, &other),
            Err(VolumeError::KeyCheckFailed { .. })
        ));
        assert_eq!(
            read_header(&path).expect("read").0.sequence,
            1,
            "nothing written"
        );
    }

    #[test]
    fn mac_detects_tampering() {
        type Edit = fn(&mut serde_json::Value);
        let edits: [(&str, Edit); 7] = [
            ("size", |v| v["volume"]["size"] = serde_json::json!(2 << 20)),
            ("sector size", |v| {
                v["volume"]["sector_size"] = serde_json::json!(512);
                v["volume"]["iv_unit"] = serde_json::json!(512);
            }),
            ("data offset", |v| {
                v["volume"]["data_offset"] = serde_json::json!(2 << 20)
            }),
            ("keyslot removed", |v| {
                if let Some(a) = v["keyslots"].as_array_mut() {
                    a.pop();
                }
            }),
            ("keyslot backend", |v| {
                v["keyslots"][0]["backend"] = serde_json::json!("evil")
            }),
            ("keyslot context", |v| {
                v["keyslots"][0]["context"]["cryptvol:volume-uuid"] = serde_json::json!("x")
            }),
            ("keyslot params", |v| {
                v["keyslots"][1]["params"]["tag"] = serde_json::json!("c")
            }),
        ];
        for (what, edit) in edits {
            let dir = tempfile::tempdir().expect("tempdir");
            let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
            h.keyslots.push(dummy_slot(&h.uuid, "b"));
            write_header(&path, &mut h, &dek).expect("write");
            tamper_both(&path, &edit);
            let (t, health) = read_header(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(health.is_healthy(), "{what}: checksums were fixed");
            assert!(
                matches!(
                    t.verify_with_dek(&dek, &path),
                    Err(VolumeError::HeaderMacMismatch { .. })
                ),
                "{what}: tampering not detected"
            );
        }
    }

    /// The KCV and MAC follow docs/format.md §4 exactly (built here independently).
    #[test]
    fn kcv_and_mac_follow_the_documented_construction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, h, dek) = new_volume(dir.path(), 1 << 20, 512);
        let derive = |info: &[u8]| {
            let mut k = [0u8; 32];
            Hkdf::<Sha256>::new(None, dek.expose())
                .expand(info, &mut k)
                .expect("hkdf");
            k
        };
        let hmac = |key: &[u8], msg: &[u8]| {
            let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("hmac");
            m.update(msg);
            tag32(m)
        };
        assert_eq!(
            hmac(&derive(b"cryptvol kcv"), h.uuid.as_bytes()),
            h.key_check
        );

        let lp = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        let mut m = Vec::new();
        lp(&mut m, b"cryptvol header mac v1\0");
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(h.uuid.as_bytes());
        m.extend_from_slice(&(1u64 << 20).to_le_bytes());
        m.extend_from_slice(&512u32.to_le_bytes());
        m.extend_from_slice(&(1u64 << 20).to_le_bytes());
        lp(&mut m, b"aes-xts-plain64");
        m.extend_from_slice(&64u32.to_le_bytes());
        m.extend_from_slice(&512u32.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes()); // required_features: one
        lp(&mut m, b"allocation-map");
        m.extend_from_slice(&0u32.to_le_bytes()); // compatible_features
        m.extend_from_slice(&1u32.to_le_bytes()); // one keyslot
        let slot = &h.keyslots[0];
        lp(&mut m, slot.backend.as_bytes());
        lp(&mut m, slot.key_id.as_bytes());
        lp(&mut m, &slot.blob);
        m.extend_from_slice(&1u32.to_le_bytes());
        lp(&mut m, b"cryptvol:volume-uuid");
        lp(&mut m, h.uuid.to_string().as_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        lp(&mut m, b"tag");
        lp(&mut m, b"a");
        // The allocation map layout (present with the allocation-map feature).
        lp(&mut m, b"allocation-map");
        m.extend_from_slice(&65536u32.to_le_bytes()); // chunk size
        m.extend_from_slice(&4096u32.to_le_bytes()); // page size
        m.extend_from_slice(&1u64.to_le_bytes()); // pages per copy
        m.extend_from_slice(&131072u64.to_le_bytes()); // copy 0
        m.extend_from_slice(&(131072u64 + 4096).to_le_bytes()); // copy 1
        assert_eq!(h.mac_input(), m);
        assert_eq!(hmac(&derive(b"cryptvol header mac"), &m), h.header_mac);
    }

    #[test]
    fn uuid_swap_is_a_key_check_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        let mut t = h.clone();
        t.uuid = uuid::Uuid::new_v4();
        assert!(matches!(
            t.verify_with_dek(&dek, &path),
            Err(VolumeError::KeyCheckFailed { .. })
        ));
    }

    #[test]
    fn semantically_invalid_copy_is_damaged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
        tamper_json(&path, 0, &|v| {
            v["volume"]["cipher"] = serde_json::json!("aes-cbc-plain")
        });
        let (h, health) = read_header(&path).expect("secondary wins");
        assert_eq!(h.cipher, CIPHER);
        assert!(matches!(&health.primary, CopyStatus::Damaged(r) if r.contains("cipher")));
        tamper_json(&path, 1, &|v| {
            v["volume"]["iv_unit"] = serde_json::json!(512)
        });
        match read_header(&path) {
            Err(VolumeError::BothHeadersDamaged { secondary, .. }) => {
                assert!(secondary.contains("IV unit"))
            }
            other => panic!("expected BothHeadersDamaged, got {other:?}"),
        }
    }

    #[test]
    fn hostile_lengths_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
        tamper_binary(&path, 0, &|c| {
            c[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes())
        });
        tamper_binary(&path, 1, &|c| {
            c[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&0u32.to_le_bytes())
        });
        match read_header(&path) {
            Err(VolumeError::BothHeadersDamaged {
                primary, secondary, ..
            }) => {
                assert!(primary.contains("metadata length"), "{primary}");
                assert!(secondary.contains("metadata length"), "{secondary}");
            }
            other => panic!("expected BothHeadersDamaged, got {other:?}"),
        }
    }

    #[test]
    fn swapped_copies_are_misplaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
        let (a, b) = (read_copy(&path, 0), read_copy(&path, 1));
        write_copy(&path, 0, &b);
        write_copy(&path, 1, &a);
        match read_header(&path) {
            Err(VolumeError::BothHeadersDamaged { primary, .. }) => {
                assert!(primary.contains("misplaced"))
            }
            other => panic!("expected BothHeadersDamaged, got {other:?}"),
        }
    }

    #[test]
    fn header_of_another_volume_is_not_written_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path_a, _, _) = new_volume(&dir.path().join("a").tap_mkdir(), 1 << 20, 4096);
        let (_, mut hb, dek_b) = new_volume(&dir.path().join("b").tap_mkdir(), 1 << 20, 4096);
        assert!(matches!(
            write_header(&path_a, &mut hb, &dek_b),
            Err(VolumeError::InvalidHeader { .. })
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Random bytes over a valid copy never panic the decoder.
        #[test]
        fn decode_copy_never_panics(garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                                    at in 0usize..COPY_LEN, keep_magic in proptest::prelude::any::<bool>()) {
            let mut c = vec![0u8; COPY_LEN];
            if keep_magic {
                c[..8].copy_from_slice(&MAGIC_PRIMARY);
                c[OFF_VERSION] = 1;
            }
            let end = (at + garbage.len()).min(COPY_LEN);
            c[at..end].copy_from_slice(&garbage[..end - at]);
            let _ = decode_copy(&c, 0);
            let _ = decode_copy(&c[..at], 0);
        }
    }
}
