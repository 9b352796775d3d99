//! Cryptographic primitives: the AES-256-XTS sector engine and secret types.
//! No I/O happens here.

pub mod canonical;
mod locked;
mod secret;
mod sector;
mod xts;

pub use locked::harden_process;
pub(crate) use locked::LockedBytes;
pub use secret::{Dek, SecretBytes, DEK_LEN};
pub use sector::{ParseSectorSizeError, SectorSize};
pub use xts::XtsEngine;

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("data key must be {DEK_LEN} bytes, got {0}")]
    BadKeyLength(usize),
    #[error("the two halves of the XTS data key are equal; such a key is refused (IEEE 1619)")]
    EqualXtsHalves,
    #[error("buffer length {len} is not a multiple of the sector size {sector_size}")]
    Unaligned { len: usize, sector_size: usize },
    #[error("unsupported sector size {0} (must be 512 or 4096)")]
    BadSectorSize(usize),
    #[error("random number generator failed: {0}")]
    Rng(String),
    #[error("could not allocate memory for key material: {0}")]
    Memory(String),
    #[error("a field of {len} bytes or elements does not fit the {bits}-bit prefix of its canonical encoding")]
    CanonicalFieldTooLong { len: usize, bits: u32 },
}
