//! Batched AES-256-XTS over whole sectors, tweak = sector number as a 128-bit
//! little-endian integer (dm-crypt `plain64`).

use super::{CryptoError, Dek};

/// An XTS engine keyed with one volume's DEK. Cheap to share between threads (`Sync`).
pub struct XtsEngine {
    _sector_size: usize,
}

impl XtsEngine {
    /// `sector_size` is the XTS data unit (512 or 4096).
    pub fn new(_dek: &Dek, _sector_size: usize) -> Result<XtsEngine, CryptoError> {
        todo!()
    }
    pub fn sector_size(&self) -> usize {
        todo!()
    }
    /// Encrypts `buf` in place; `buf` holds whole sectors, the first being `first_sector`.
    pub fn encrypt_sectors(&self, _buf: &mut [u8], _first_sector: u64) -> Result<(), CryptoError> {
        todo!()
    }
    /// Decrypts `buf` in place; `buf` holds whole sectors, the first being `first_sector`.
    pub fn decrypt_sectors(&self, _buf: &mut [u8], _first_sector: u64) -> Result<(), CryptoError> {
        todo!()
    }
}
