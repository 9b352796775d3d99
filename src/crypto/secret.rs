//! Secret types. They zeroize on drop and deliberately implement neither
//! `Debug`, `Clone` nor `Serialize`.

use super::CryptoError;

/// Length of an AES-256-XTS data key: two 256-bit AES keys.
pub const DEK_LEN: usize = 64;

/// A volume data encryption key (512 bits for AES-256-XTS).
pub struct Dek {
    // filled in by the crypto layer
    _bytes: Box<[u8; DEK_LEN]>,
}

impl Dek {
    /// Builds a DEK from raw bytes; refuses a wrong length or equal XTS halves.
    pub fn from_slice(_bytes: &[u8]) -> Result<Dek, CryptoError> {
        todo!()
    }
    /// A fresh random DEK from the OS RNG (retries until the halves differ).
    pub fn generate() -> Result<Dek, CryptoError> {
        todo!()
    }
    /// The raw key bytes. Callers must not copy them into non-zeroizing storage.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        todo!()
    }
}

/// A variable-length secret (passphrases, master key material, derived keys).
pub struct SecretBytes {
    _bytes: Vec<u8>,
}

impl SecretBytes {
    pub fn new(_bytes: Vec<u8>) -> SecretBytes {
        todo!()
    }
    pub fn expose(&self) -> &[u8] {
        todo!()
    }
}
