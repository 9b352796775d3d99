//! On-disk header format v1 (see docs/format.md).

use std::path::Path;

use super::{VolumeError, VolumeSpec};
use crate::crypto::Dek;
use crate::keys::WrappedDek;

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
    // plus whatever the format needs (key check value, MAC, ...)
}

impl Header {
    /// Checks the key check value, then the header MAC, with an unwrapped DEK.
    pub fn verify_with_dek(&self, _dek: &Dek, _path: &Path) -> Result<(), VolumeError> {
        todo!()
    }
}

/// Reads and validates both header copies without any key. The highest valid sequence wins.
pub fn read_header(_path: &Path) -> Result<(Header, HeaderHealth), VolumeError> {
    todo!()
}

/// Creates a new volume file (refusing to overwrite) with the given keyslots; the
/// key check value and MAC are computed from `dek`. The data area is left sparse.
pub fn create(
    _path: &Path,
    _spec: &VolumeSpec,
    _uuid: uuid::Uuid,
    _keyslots: Vec<WrappedDek>,
    _dek: &Dek,
) -> Result<Header, VolumeError> {
    todo!()
}

/// Writes `header` (sequence bumped) crash-safely: primary, fsync, secondary, fsync.
/// Repairs a damaged copy as a side effect.
pub fn write_header(_path: &Path, _header: &mut Header, _dek: &Dek) -> Result<(), VolumeError> {
    todo!()
}
