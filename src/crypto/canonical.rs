//! One canonical encoding for everything that is MACed, signed or bound as associated
//! data: the volume header MAC (docs/format.md), the snapshot manifest MAC, the
//! associated data of wrapped data keys, and the changed-block sidecar checksum.
//!
//! The encoding is a plain concatenation of little-endian integers and length-prefixed
//! byte strings, so it is injective for a fixed sequence of calls: two different values
//! of one record never encode alike. The records predate this module and their byte
//! layouts are part of the on-disk format, so a [`Profile`] fixes the two widths that
//! differ between them: the length prefix of a byte string and the prefix of a count.
//! The encodings are frozen by the vectors in the tests below.
//!
//! Pure functions over memory: no I/O, no keys.

use std::collections::BTreeMap;

use super::CryptoError;

/// Width of a little-endian length or count prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    U16,
    U32,
    U64,
}

impl Width {
    fn bits(self) -> u32 {
        match self {
            Width::U16 => 16,
            Width::U32 => 32,
            Width::U64 => 64,
        }
    }
}

/// The prefix widths of one family of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Prefix of a byte string or string.
    pub length: Width,
    /// Prefix of a list or a map (number of elements).
    pub count: Width,
}

/// Header and snapshot-manifest MACs: `u64` lengths, `u32` counts (format v1).
pub const MAC_V1: Profile = Profile {
    length: Width::U64,
    count: Width::U32,
};

/// Associated data of wrapped data keys and the encryption context: `u32` lengths
/// and counts (key-wrap v1).
pub const KEYWRAP_V1: Profile = Profile {
    length: Width::U32,
    count: Width::U32,
};

/// The changed-block sidecar: a `u16` base-id length, a `u64` word count.
pub const SIDECAR_V1: Profile = Profile {
    length: Width::U16,
    count: Width::U64,
};

/// Builds one canonical byte string. A string longer than the profile's length prefix
/// can express is not truncated: [`CanonicalWriter::finish`] reports it.
#[derive(Debug)]
pub struct CanonicalWriter {
    profile: Profile,
    out: Vec<u8>,
    too_long: Option<(usize, u32)>,
}

impl CanonicalWriter {
    /// An empty encoding under `profile`.
    pub fn new(profile: Profile) -> Self {
        Self::with_capacity(profile, 0)
    }

    /// An empty encoding under `profile` with room for `capacity` bytes.
    pub fn with_capacity(profile: Profile, capacity: usize) -> Self {
        Self {
            profile,
            out: Vec::with_capacity(capacity),
            too_long: None,
        }
    }

    /// Bytes as they are, without a prefix (fixed-size fields: UUIDs, digests, magics).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }

    /// A flag as one byte, 0 or 1.
    pub fn flag(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// A byte string: its length in the profile's length width, then the bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.prefix(self.profile.length, b.len());
        self.raw(b)
    }

    /// A string as its UTF-8 bytes (see [`CanonicalWriter::bytes`]).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// A number of elements in the profile's count width.
    pub fn count(&mut self, n: usize) -> &mut Self {
        self.prefix(self.profile.count, n);
        self
    }

    /// A list of strings: the count, then each string.
    pub fn list(&mut self, items: &[String]) -> &mut Self {
        self.count(items.len());
        for s in items {
            self.str(s);
        }
        self
    }

    /// A map: the count, then its pairs in key order.
    pub fn map(&mut self, m: &BTreeMap<String, String>) -> &mut Self {
        self.count(m.len());
        self.pairs(m)
    }

    /// A map's pairs in key order without a count (the encryption context's layout).
    pub fn pairs(&mut self, m: &BTreeMap<String, String>) -> &mut Self {
        for (k, v) in m {
            self.str(k);
            self.str(v);
        }
        self
    }

    /// The encoding, or an error if a length or count did not fit its prefix.
    pub fn finish(self) -> Result<Vec<u8>, CryptoError> {
        match self.too_long {
            None => Ok(self.out),
            Some((len, bits)) => Err(CryptoError::CanonicalFieldTooLong { len, bits }),
        }
    }

    fn prefix(&mut self, width: Width, n: usize) {
        let fits = match width {
            Width::U16 => u16::try_from(n).map(|v| self.out.extend_from_slice(&v.to_le_bytes())),
            Width::U32 => u32::try_from(n).map(|v| self.out.extend_from_slice(&v.to_le_bytes())),
            Width::U64 => u64::try_from(n).map(|v| self.out.extend_from_slice(&v.to_le_bytes())),
        };
        if fits.is_err() && self.too_long.is_none() {
            self.too_long = Some((n, width.bits()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn mac_profile_vector() {
        let mut w = CanonicalWriter::new(MAC_V1);
        w.str("ab")
            .u32(7)
            .list(&["x".into()])
            .map(&map(&[("k", "v")]));
        let got = w.finish().unwrap();
        let want: Vec<u8> = [
            &2u64.to_le_bytes()[..],
            b"ab",
            &7u32.to_le_bytes(),
            &1u32.to_le_bytes(),
            &1u64.to_le_bytes(),
            b"x",
            &1u32.to_le_bytes(),
            &1u64.to_le_bytes(),
            b"k",
            &1u64.to_le_bytes(),
            b"v",
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn keywrap_profile_vector_pairs_have_no_count() {
        let mut w = CanonicalWriter::new(KEYWRAP_V1);
        w.str("id").pairs(&map(&[("a", "1"), ("b", "22")]));
        let want: Vec<u8> = [
            &2u32.to_le_bytes()[..],
            b"id",
            &1u32.to_le_bytes(),
            b"a",
            &1u32.to_le_bytes(),
            b"1",
            &1u32.to_le_bytes(),
            b"b",
            &2u32.to_le_bytes(),
            b"22",
        ]
        .concat();
        assert_eq!(w.finish().unwrap(), want);
    }

    #[test]
    fn sidecar_profile_vector() {
        let mut w = CanonicalWriter::new(SIDECAR_V1);
        w.raw(b"MAGIC").flag(true).str("s1").count(2).u64(5).u64(6);
        let want: Vec<u8> = [
            &b"MAGIC"[..],
            &[1],
            &2u16.to_le_bytes(),
            b"s1",
            &2u64.to_le_bytes(),
            &5u64.to_le_bytes(),
            &6u64.to_le_bytes(),
        ]
        .concat();
        assert_eq!(w.finish().unwrap(), want);
    }

    #[test]
    fn a_string_longer_than_its_prefix_is_an_error_not_a_truncation() {
        let long = "x".repeat(usize::from(u16::MAX) + 1);
        let mut w = CanonicalWriter::new(SIDECAR_V1);
        w.str(&long);
        let err = w.finish().unwrap_err();
        assert!(
            matches!(err, CryptoError::CanonicalFieldTooLong { len, bits: 16 } if len == long.len()),
            "{err}"
        );
        let mut w = CanonicalWriter::new(SIDECAR_V1);
        w.str(&long[1..]);
        assert_eq!(w.finish().unwrap().len(), 2 + usize::from(u16::MAX));
    }

    proptest! {
        /// Moving bytes between two adjacent strings changes the encoding (the
        /// length prefixes make the concatenation injective).
        #[test]
        fn adjacent_strings_never_collide(a in ".{0,8}", b in ".{0,8}", c in ".{0,8}", d in ".{0,8}") {
            prop_assume!((a.as_str(), b.as_str()) != (c.as_str(), d.as_str()));
            for profile in [MAC_V1, KEYWRAP_V1, SIDECAR_V1] {
                let mut x = CanonicalWriter::new(profile);
                x.str(&a).str(&b);
                let mut y = CanonicalWriter::new(profile);
                y.str(&c).str(&d);
                prop_assert_ne!(x.finish().unwrap(), y.finish().unwrap());
            }
        }
    }
}
