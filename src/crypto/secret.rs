//! Secret types. They zeroize on drop and deliberately implement neither
//! `Debug`, `Clone` nor `Serialize`.

use zeroize::{Zeroize, Zeroizing};

use super::locked::{Locked, LockedBytes};
use super::CryptoError;

/// Length of an AES-256-XTS data key: two 256-bit AES keys.
pub const DEK_LEN: usize = 64;

/// A volume data encryption key (512 bits for AES-256-XTS). The bytes live in their own
/// locked, non-dumpable page (see `crypto::locked`) and are wiped on drop.
#[allow(missing_debug_implementations)] // no Debug by design: holds key material
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

/// A variable-length secret (passphrases, master key material, derived keys). The bytes
/// live in their own locked, non-dumpable pages (see `crypto::locked`), wiped on drop;
/// only if no mapping can be made at all do they stay in a zeroizing heap buffer.
#[allow(missing_debug_implementations)] // no Debug by design: holds key material
pub struct SecretBytes {
    bytes: SecretStorage,
}

enum SecretStorage {
    Locked(LockedBytes),
    Heap(Zeroizing<Vec<u8>>),
}

impl SecretBytes {
    /// Moves `bytes` into locked pages; the vector given is wiped.
    pub fn new(bytes: Vec<u8>) -> SecretBytes {
        let mut bytes = Zeroizing::new(bytes);
        match LockedBytes::from_slice(&bytes) {
            Ok(locked) => {
                bytes.zeroize();
                SecretBytes {
                    bytes: SecretStorage::Locked(locked),
                }
            }
            Err(e) => {
                tracing::warn!("key material stays in ordinary memory: {e}");
                SecretBytes {
                    bytes: SecretStorage::Heap(bytes),
                }
            }
        }
    }
    pub fn expose(&self) -> &[u8] {
        match &self.bytes {
            SecretStorage::Locked(b) => b,
            SecretStorage::Heap(b) => b,
        }
    }
    /// Whether the bytes are locked in RAM (false when `mlock` was refused).
    pub fn is_memory_locked(&self) -> bool {
        matches!(&self.bytes, SecretStorage::Locked(b) if b.is_locked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14 A5: master keys, KEKs and passphrases (all `SecretBytes`) were ordinary
    /// heap memory: swappable and in core dumps. They now live in locked pages.
    #[test]
    fn secret_bytes_live_in_their_own_locked_pages() {
        let s = SecretBytes::new(b"master key material".to_vec());
        assert_eq!(s.expose(), b"master key material");
        assert!(matches!(s.bytes, SecretStorage::Locked(_)));
        // Locking itself depends on RLIMIT_MEMLOCK (root, as in CI, always may).
        if nix::unistd::geteuid().is_root() {
            assert!(s.is_memory_locked());
        }
        let page = s.expose().as_ptr() as usize;
        assert_eq!(page % 4096, 0, "not at the start of its own mapping");
    }
}
