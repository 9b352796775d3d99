//! The cipher side of a volume: its XTS engines and the re-encryption watermark that
//! decides which engine a sector is under. Sector-granular and in place: the volume's
//! I/O paths call [`Volume::encrypt`] / [`Volume::decrypt`] on whole sectors.

use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use super::{Volume, VolumeError};
use crate::crypto::XtsEngine;

/// The engines: `cur` for sectors at or above `wm`, `next` below it (re-encryption).
pub(super) struct Keys {
    pub cur: XtsEngine,
    pub next: Option<XtsEngine>,
    /// Watermark in sectors.
    pub wm: u64,
}

impl Keys {
    /// En- or decrypts whole sectors in place, each with the key it is under.
    fn apply(
        &self,
        buf: &mut [u8],
        first: u64,
        ss: usize,
        encrypt: bool,
    ) -> Result<(), VolumeError> {
        let run = |e: &XtsEngine, b: &mut [u8], f: u64| {
            if encrypt {
                e.encrypt_sectors(b, f)
            } else {
                e.decrypt_sectors(b, f)
            }
        };
        match &self.next {
            Some(next) if first < self.wm => {
                let below = ((self.wm - first) as usize)
                    .saturating_mul(ss)
                    .min(buf.len());
                let (lo, hi) = buf.split_at_mut(below);
                run(next, lo, first)?;
                if !hi.is_empty() {
                    run(&self.cur, hi, self.wm)?;
                }
                Ok(())
            }
            _ => Ok(run(&self.cur, buf, first)?),
        }
    }
}

/// The engines behind their lock: read-locked by every I/O, write-locked by the
/// re-encryption steps that move the watermark or swap the engines.
pub(super) struct Cipher {
    keys: RwLock<Keys>,
}

impl Cipher {
    /// `cur` for everything at or above the watermark `wm` (sectors), `next` below it.
    pub(super) fn new(cur: XtsEngine, next: Option<XtsEngine>, wm: u64) -> Self {
        Self {
            keys: RwLock::new(Keys { cur, next, wm }),
        }
    }
}

impl Volume {
    /// The engines and watermark, read-locked.
    pub(super) fn keys_read(&self) -> RwLockReadGuard<'_, Keys> {
        self.cipher
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Encrypts whole sectors in place with the key each sector is under.
    pub(super) fn encrypt(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.keys_read()
            .apply(buf, first, self.geo.sector_size as usize, true)
    }

    /// Decrypts whole sectors in place with the key each sector is under.
    pub(super) fn decrypt(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.keys_read()
            .apply(buf, first, self.geo.sector_size as usize, false)
    }

    /// Runs `f` with the engines locked for writing (re-encryption steps move the
    /// watermark and swap engines through this).
    pub(super) fn with_keys_mut<R>(&self, f: impl FnOnce(&mut Keys) -> R) -> R {
        let mut k = self
            .cipher
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut k)
    }
}
