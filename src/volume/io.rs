//! Encrypted I/O over the backing file: any byte range, sector-aligned or not,
//! with read-modify-write under per-range locks. Synchronous and thread-safe:
//! the server calls it from blocking worker threads.

use std::path::Path;

use super::{Header, VolumeError};
use crate::crypto::Dek;

/// How a volume is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Punch holes on discard (leaks which blocks are unused).
    pub discard: bool,
}

/// An open, unlocked volume.
pub struct Volume {
    _p: (),
}

impl Volume {
    /// Opens the data area of `path` whose header is `header`, verifying the key check
    /// value and header MAC with `dek`. Takes ownership of the DEK (wiped on drop).
    pub fn open(
        _path: &Path,
        _header: &Header,
        _dek: Dek,
        _opts: OpenOptions,
    ) -> Result<Volume, VolumeError> {
        todo!()
    }
    pub fn size(&self) -> u64 {
        todo!()
    }
    pub fn sector_size(&self) -> u32 {
        todo!()
    }
    pub fn read_only(&self) -> bool {
        todo!()
    }
    pub fn uuid(&self) -> uuid::Uuid {
        todo!()
    }
    /// Reads and decrypts `buf.len()` bytes at `offset` (any alignment).
    pub fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<(), VolumeError> {
        todo!()
    }
    /// Encrypts and writes `buf` at `offset` (any alignment; partial sectors by
    /// read-modify-write). With `fua`, returns only once the data is durable.
    pub fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> Result<(), VolumeError> {
        todo!()
    }
    /// Like `write_at`, but encrypts the caller's buffer in place (clobbering it).
    pub fn write_at_mut(
        &self,
        _buf: &mut [u8],
        _offset: u64,
        _fua: bool,
    ) -> Result<(), VolumeError> {
        todo!()
    }
    /// Writes encrypted zeros over the range (reads back as zeros).
    pub fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), VolumeError> {
        todo!()
    }
    /// A discard hint: punches whole-sector holes when opened with `discard`, else nothing.
    pub fn discard(&self, _offset: u64, _len: u64) -> Result<(), VolumeError> {
        todo!()
    }
    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> Result<(), VolumeError> {
        todo!()
    }
}
