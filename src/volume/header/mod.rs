//! On-disk header format v1 (see docs/format.md for the byte layout).
//!
//! Two copies of 64 KiB each (primary at 0, secondary at 64 KiB). Each copy is a
//! 4096-byte little-endian binary header followed by a 60 KiB metadata area holding
//! compact canonical JSON (sorted keys), zero-padded. A SHA-256 checksum over the
//! whole copy detects accidental damage; a key check value (KCV) and a header MAC,
//! both keyed from the DEK, detect a wrong key and deliberate tampering.
//!
//! This module owns the [`Header`] type and the format's constants; its parts are:
//! - `copy`: one 64 KiB copy, binary layout, checksum, encode/decode;
//! - `metadata`: the metadata JSON of a copy; `slots`: its keyslot records;
//! - `reencrypt`: the state of a re-encryption in progress and its hotzone;
//! - `validate`: the semantic checks every v1 header passes;
//! - `mac`: the key check value and the header MAC;
//! - `recovery`: reading both copies, picking the winner, their health;
//! - `create`: a new volume file; `write`: the crash-safe header update.

use std::path::Path;

use super::alloc::{self, MapLayout};
use super::{VolumeError, VolumeSpec, CIPHER, DEFAULT_DATA_OFFSET};
use crate::keys::WrappedDek;

mod copy;
mod create;
#[doc(hidden)]
pub(crate) mod fuzz_hooks;
mod mac;
mod metadata;
mod recovery;
mod reencrypt;
mod slots;
mod validate;
mod write;

pub use create::{create, create_with};
pub(crate) use mac::compute_kcv;
pub(crate) use metadata::fits_metadata;
pub(crate) use recovery::check_engine_uuid;
pub(crate) use recovery::check_file_uuid;
pub use recovery::{read_header, CopyStatus, HeaderHealth};
pub use reencrypt::{Hotzone, Reencryption};
pub use write::write_header;

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
    fn unknown_required_features(&self) -> Vec<String> {
        self.required_features
            .iter()
            .filter(|f| !KNOWN_REQUIRED_FEATURES.contains(&f.as_str()))
            .cloned()
            .collect()
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

#[cfg(test)]
pub(crate) mod tests;
