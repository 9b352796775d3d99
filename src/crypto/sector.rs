//! The sector size of a volume: the XTS data unit and the logical block size the
//! volume exports. Format v1 knows exactly two, 512 and 4096 bytes; a [`SectorSize`]
//! holds one of them, so code that has one never checks it again. It is validated
//! once, where a number or a string becomes one ([`TryFrom`], [`FromStr`]).
//!
//! Pure values: no I/O, no keys.

use std::fmt;
use std::str::FromStr;

use super::CryptoError;

/// A legal sector size: 512 or 4096 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SectorSize(u32);

impl SectorSize {
    /// 512-byte sectors.
    pub const S512: SectorSize = SectorSize(512);
    /// 4096-byte sectors (the default).
    pub const S4096: SectorSize = SectorSize(4096);

    /// The size in bytes, as the on-disk formats store it.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The size in bytes, for buffer arithmetic.
    pub const fn bytes(self) -> usize {
        self.0 as usize
    }

    /// The size in bytes, for file and volume offsets.
    pub const fn as_u64(self) -> u64 {
        self.0 as u64
    }

    /// Whether `n` is one of the legal sizes.
    pub const fn is_legal(n: u64) -> bool {
        n == 512 || n == 4096
    }
}

impl TryFrom<u32> for SectorSize {
    type Error = CryptoError;

    fn try_from(n: u32) -> Result<Self, CryptoError> {
        if Self::is_legal(u64::from(n)) {
            Ok(SectorSize(n))
        } else {
            Err(CryptoError::BadSectorSize(
                usize::try_from(n).unwrap_or(usize::MAX),
            ))
        }
    }
}

impl TryFrom<usize> for SectorSize {
    type Error = CryptoError;

    fn try_from(n: usize) -> Result<Self, CryptoError> {
        match u32::try_from(n) {
            Ok(v) if Self::is_legal(u64::from(v)) => Ok(SectorSize(v)),
            _ => Err(CryptoError::BadSectorSize(n)),
        }
    }
}

impl From<SectorSize> for u32 {
    fn from(s: SectorSize) -> u32 {
        s.get()
    }
}

impl From<SectorSize> for u64 {
    fn from(s: SectorSize) -> u64 {
        s.as_u64()
    }
}

/// A command-line sector size that is neither `512` nor `4096`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sector size must be 4096 or 512, not {0}")]
pub struct ParseSectorSizeError(String);

impl FromStr for SectorSize {
    type Err = ParseSectorSizeError;

    /// Exactly `512` or `4096` (no sign, no leading zeros, no unit), as the CLI takes it.
    fn from_str(s: &str) -> Result<Self, ParseSectorSizeError> {
        match s {
            "4096" => Ok(SectorSize::S4096),
            "512" => Ok(SectorSize::S512),
            _ => Err(ParseSectorSizeError(s.to_string())),
        }
    }
}

impl fmt::Display for SectorSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl serde::Serialize for SectorSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SectorSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = <u32 as serde::Deserialize>::deserialize(d)?;
        SectorSize::try_from(n).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_512_and_4096_are_sector_sizes() {
        for n in [512u32, 4096] {
            let s = SectorSize::try_from(n).expect("legal");
            assert_eq!(s.get(), n);
            assert_eq!(s.bytes(), n as usize);
            assert_eq!(s.as_u64(), u64::from(n));
            assert_eq!(SectorSize::try_from(n as usize).expect("legal"), s);
        }
        for n in [0u32, 1, 16, 511, 513, 520, 1024, 2048, 4095, 8192, u32::MAX] {
            assert!(
                matches!(SectorSize::try_from(n), Err(CryptoError::BadSectorSize(s)) if s == n as usize),
                "{n} accepted"
            );
        }
        assert!(matches!(
            SectorSize::try_from(usize::MAX),
            Err(CryptoError::BadSectorSize(usize::MAX))
        ));
        assert!(SectorSize::try_from((1usize << 32) + 512).is_err());
    }

    #[test]
    fn parses_like_the_cli() {
        assert_eq!("512".parse::<SectorSize>(), Ok(SectorSize::S512));
        assert_eq!("4096".parse::<SectorSize>(), Ok(SectorSize::S4096));
        for bad in [
            "", "0", "1024", "0512", " 512", "512 ", "+512", "4k", "4K", "x",
        ] {
            let err = bad.parse::<SectorSize>().expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!("sector size must be 4096 or 512, not {bad}")
            );
        }
    }

    #[test]
    fn displays_and_serializes_as_the_number() {
        assert_eq!(SectorSize::S4096.to_string(), "4096");
        assert_eq!(format!("{:>5}", SectorSize::S512), "  512");
        assert_eq!(
            serde_json::to_string(&SectorSize::S512).expect("json"),
            "512"
        );
        let s: SectorSize = serde_json::from_str("4096").expect("json");
        assert_eq!(s, SectorSize::S4096);
        assert!(serde_json::from_str::<SectorSize>("1024").is_err());
        assert!(serde_json::from_str::<SectorSize>("-512").is_err());
        assert_eq!(u32::from(SectorSize::S512), 512);
        assert_eq!(u64::from(SectorSize::S4096), 4096);
        assert!(SectorSize::S512 < SectorSize::S4096);
    }
}
