//! One 64 KiB header copy: the 4096-byte little-endian binary header (magic,
//! version, copy index and place, sequence, UUID, metadata length, salt, SHA-256
//! checksum) followed by the zero-padded metadata area; encoding a copy and decoding
//! one into a [`Header`] or the reason it is unusable.

use sha2::{Digest, Sha256};

use super::metadata::{decode_metadata, encode_metadata};
use super::{
    Header, BINARY_HEADER_SIZE, FORMAT_VERSION, HEADER_COPY_SIZE, MAGIC_PRIMARY, MAGIC_SECONDARY,
    METADATA_AREA_SIZE,
};

pub(super) const COPY_LEN: usize = HEADER_COPY_SIZE as usize;
const CSUM_ALG_SHA256: u8 = 1;

// Binary header field offsets (all integers little-endian).
pub(super) const OFF_MAGIC: usize = 0;
pub(super) const OFF_VERSION: usize = 8;
pub(super) const OFF_COPY_INDEX: usize = 12;
pub(super) const OFF_CSUM_ALG: usize = 13;
pub(super) const OFF_RESERVED1: usize = 14;
pub(super) const OFF_COPY_SIZE: usize = 16;
pub(super) const OFF_COPY_OFFSET: usize = 24;
pub(super) const OFF_SEQUENCE: usize = 32;
pub(super) const OFF_UUID: usize = 40;
pub(super) const OFF_META_LEN: usize = 56;
pub(super) const OFF_RESERVED2: usize = 60;
pub(super) const OFF_SALT: usize = 64;
pub(super) const OFF_CSUM: usize = 96;
pub(super) const OFF_PADDING: usize = 128;

pub(super) fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub(super) fn le_u64(b: &[u8], off: usize) -> u64 {
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

pub(super) fn copy_checksum(copy: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&copy[..OFF_CSUM]);
    h.update([0u8; 32]);
    h.update(&copy[OFF_CSUM + 32..]);
    let mut out = [0u8; 32];
    out.copy_from_slice(&h.finalize());
    out
}

/// Serializes one copy (`index` 0 = primary, 1 = secondary) with a fresh salt.
pub(super) fn encode_copy(h: &Header, index: usize) -> Result<Vec<u8>, String> {
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
pub(super) enum CopyRead {
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
pub(super) fn decode_copy(bytes: &[u8], index: usize) -> CopyRead {
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
