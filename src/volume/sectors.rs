//! Sector arithmetic: pure functions over byte ranges and sector indexes.
//! Every function here is total (no panics, no overflow) for the inputs its
//! doc comment allows; the property tests below check that.

use super::VolumeError;

/// A half-open range of sector indexes `[first, end)`, counted from the start
/// of the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub first: u64,
    pub end: u64,
}

impl Span {
    /// Number of sectors in the span.
    pub fn count(&self) -> u64 {
        self.end.saturating_sub(self.first)
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.first
    }
}

/// Checks that `[offset, offset + len)` lies within a volume of `size` bytes
/// (without overflowing).
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), VolumeError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(VolumeError::OutOfRange { offset, len, size }),
    }
}

/// Whether the byte range starts and ends on sector boundaries.
/// `sector_size` must be non-zero.
pub(crate) fn is_aligned(offset: u64, len: u64, sector_size: u64) -> bool {
    offset.is_multiple_of(sector_size) && len.is_multiple_of(sector_size)
}

/// The sectors that the byte range `[offset, offset + len)` touches, partially or
/// wholly. Requires `offset + len` not to overflow (call [`check_range`] first) and a
/// non-zero `sector_size`. An empty range gives an empty span.
pub(crate) fn covering(offset: u64, len: u64, sector_size: u64) -> Span {
    let end_byte = offset.saturating_add(len);
    let first = offset / sector_size;
    let end = if len == 0 {
        first
    } else {
        end_byte.div_ceil(sector_size)
    };
    Span { first, end }
}

/// The sectors lying wholly inside the byte range (what a discard may punch).
/// Same preconditions as [`covering`]. May be empty.
pub(crate) fn inner(offset: u64, len: u64, sector_size: u64) -> Span {
    let end_byte = offset.saturating_add(len);
    let first = offset.div_ceil(sector_size);
    let end = (end_byte / sector_size).max(first);
    Span { first, end }
}

/// Splits a span into consecutive chunks of at most `max_sectors` sectors
/// (`max_sectors` > 0).
pub(crate) fn chunks(span: Span, max_sectors: u64) -> impl Iterator<Item = Span> {
    let step = max_sectors.max(1);
    let mut next = span.first;
    std::iter::from_fn(move || {
        if next >= span.end {
            return None;
        }
        let first = next;
        let end = first.saturating_add(step).min(span.end);
        next = end;
        Some(Span { first, end })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sector_size() -> impl Strategy<Value = u64> {
        prop_oneof![Just(512u64), Just(4096u64)]
    }

    #[test]
    fn covering_examples() {
        assert_eq!(covering(0, 4096, 4096), Span { first: 0, end: 1 });
        assert_eq!(covering(1, 1, 4096), Span { first: 0, end: 1 });
        assert_eq!(covering(4095, 2, 4096), Span { first: 0, end: 2 });
        assert_eq!(covering(8192, 0, 4096), Span { first: 2, end: 2 });
        assert_eq!(covering(512, 1024, 512), Span { first: 1, end: 3 });
    }

    #[test]
    fn inner_examples() {
        assert!(inner(1, 4094, 4096).is_empty());
        assert_eq!(inner(1, 8191, 4096), Span { first: 1, end: 2 });
        assert_eq!(inner(0, 4096, 4096), Span { first: 0, end: 1 });
        assert!(inner(100, 10, 512).is_empty());
    }

    #[test]
    fn check_range_rejects_overflow_and_beyond_end() {
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
        assert!(check_range(10, 1, 10).is_err());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(0, 10, 10).is_ok());
        assert!(matches!(
            check_range(5, 6, 10),
            Err(VolumeError::OutOfRange {
                offset: 5,
                len: 6,
                size: 10
            })
        ));
    }

    proptest! {
        #[test]
        fn covering_contains_range(offset in 0u64..1 << 40, len in 1u64..1 << 24, ss in sector_size()) {
            let s = covering(offset, len, ss);
            prop_assert!(s.first * ss <= offset);
            prop_assert!(s.end * ss >= offset + len);
            // Minimal: dropping the first or last sector would uncover a byte.
            prop_assert!((s.first + 1) * ss > offset);
            prop_assert!((s.end - 1) * ss < offset + len);
        }

        #[test]
        fn inner_is_inside_and_maximal(offset in 0u64..1 << 40, len in 0u64..1 << 24, ss in sector_size()) {
            let s = inner(offset, len, ss);
            let c = covering(offset, len, ss);
            prop_assert!(s.first <= s.end);
            if !s.is_empty() {
                prop_assert!(s.first * ss >= offset);
                prop_assert!(s.end * ss <= offset + len);
                prop_assert!(c.first <= s.first && s.end <= c.end);
            }
            // Maximal: the sector just before/after is not wholly inside.
            if s.first > 0 {
                prop_assert!((s.first - 1) * ss < offset);
            }
            prop_assert!((s.end + 1) * ss > offset + len);
        }

        #[test]
        fn aligned_iff_covering_equals_inner(offset in 0u64..1 << 30, len in 1u64..1 << 20, ss in sector_size()) {
            let aligned = is_aligned(offset, len, ss);
            prop_assert_eq!(aligned, covering(offset, len, ss) == inner(offset, len, ss));
        }

        #[test]
        fn chunks_partition_the_span(first in 0u64..1 << 40, count in 0u64..10_000, max in 1u64..600) {
            let span = Span { first, end: first + count };
            let parts: Vec<Span> = chunks(span, max).collect();
            let mut next = first;
            for p in &parts {
                prop_assert_eq!(p.first, next);
                prop_assert!(p.count() >= 1 && p.count() <= max);
                next = p.end;
            }
            prop_assert_eq!(next, span.end);
            prop_assert_eq!(parts.len() as u64, count.div_ceil(max));
        }

        #[test]
        fn check_range_matches_model(offset in any::<u64>(), len in any::<u64>(), size in any::<u64>()) {
            let ok = (offset as u128) + (len as u128) <= size as u128;
            prop_assert_eq!(check_range(offset, len, size).is_ok(), ok);
        }
    }
}
