//! AES-256-XTS over whole sectors, tweak = sector number as a 128-bit
//! little-endian integer (dm-crypt `plain64`).
//!
//! Interim implementation over the `xts-mode` crate (correct, slow); the batched
//! engine replaces it.

use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use super::{CryptoError, Dek};

/// An XTS engine keyed with one volume's DEK. Cheap to share between threads (`Sync`).
pub struct XtsEngine {
    xts: Xts128<Aes256>,
    sector_size: usize,
}

impl XtsEngine {
    /// `sector_size` is the XTS data unit (512 or 4096).
    pub fn new(dek: &Dek, sector_size: usize) -> Result<XtsEngine, CryptoError> {
        if sector_size != 512 && sector_size != 4096 {
            return Err(CryptoError::BadSectorSize(sector_size));
        }
        let k = dek.expose();
        let c1 = Aes256::new_from_slice(&k[..32]).map_err(|_| CryptoError::BadKeyLength(32))?;
        let c2 = Aes256::new_from_slice(&k[32..]).map_err(|_| CryptoError::BadKeyLength(32))?;
        Ok(XtsEngine {
            xts: Xts128::new(c1, c2),
            sector_size,
        })
    }
    pub fn sector_size(&self) -> usize {
        self.sector_size
    }
    fn check(&self, buf: &[u8]) -> Result<(), CryptoError> {
        if buf.len() % self.sector_size != 0 {
            return Err(CryptoError::Unaligned {
                len: buf.len(),
                sector_size: self.sector_size,
            });
        }
        Ok(())
    }
    /// Encrypts `buf` in place; `buf` holds whole sectors, the first being `first_sector`.
    pub fn encrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), CryptoError> {
        self.check(buf)?;
        self.xts.encrypt_area(
            buf,
            self.sector_size,
            first_sector as u128,
            get_tweak_default,
        );
        Ok(())
    }
    /// Decrypts `buf` in place; `buf` holds whole sectors, the first being `first_sector`.
    pub fn decrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), CryptoError> {
        self.check(buf)?;
        self.xts.decrypt_area(
            buf,
            self.sector_size,
            first_sector as u128,
            get_tweak_default,
        );
        Ok(())
    }
}
