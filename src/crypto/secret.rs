//! Secret types. They zeroize on drop and deliberately implement neither
//! `Debug`, `Clone` nor `Serialize`.

use zeroize::{Zeroize, Zeroizing};

use super::locked::Locked;
use super::CryptoError;

/// Length of an AES-256-XTS data key: two 256-bit AES keys.
pub const DEK_LEN: usize = 64;

/// A volume data encryption key (512 bits for AES-256-XTS). The bytes live in their own
/// locked, non-dumpable page (see `crypto::locked`) and are wiped on drop.
pub struct Dek {
    bytes: Locked<Zeroizing<[u8; DEK_LEN]>>,
}

impl Dek {
    /// Builds a DEK from raw bytes; refuses a wrong length or equal XTS halves.
    pub fn from_slice(bytes: &[u8]) -> Result<Dek, CryptoError> {
        if bytes.len() != DEK_LEN {
            return Err(CryptoError::BadKeyLength(bytes.len()));
        }
        let mut boxed = Locked::try_new_with(|| Ok(Zeroizing::new([0u8; DEK_LEN])))?;
        boxed.copy_from_slice(bytes);
        if boxed[..32] == boxed[32..] {
            return Err(CryptoError::EqualXtsHalves);
        }
        Ok(Dek { bytes: boxed })
    }

    /// A fresh random DEK from the OS RNG (retries until the halves differ).
    pub fn generate() -> Result<Dek, CryptoError> {
        loop {
            let mut raw = Zeroizing::new([0u8; DEK_LEN]);
            getrandom::fill(&mut raw[..]).map_err(|e| CryptoError::Rng(e.to_string()))?;
            match Dek::from_slice(&raw[..]) {
                Err(CryptoError::EqualXtsHalves) => continue,
                other => return other,
            }
        }
    }

    /// The raw key bytes. Callers must not copy them into non-zeroizing storage.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.bytes
    }

    /// Whether the key's page is locked in RAM (false when `mlock` was refused).
    pub fn is_memory_locked(&self) -> bool {
        self.bytes.is_locked()
    }
}

/// A variable-length secret (passphrases, master key material, derived keys).
pub struct SecretBytes {
    bytes: Vec<u8>,
}

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> SecretBytes {
        SecretBytes { bytes }
    }
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}
