//! Volume geometry: the one implementation of the size rules that a volume spec, a
//! header, an open volume and an in-memory device all obey. A size is a positive
//! whole number of sectors; the data area starts on a 4096-byte boundary at least
//! [`DEFAULT_DATA_OFFSET`] into the file and ends within the largest possible file.
//!
//! The predicates return `bool`/`Option` so that each caller keeps its own message;
//! [`check_spec`] and [`check_size`] return the volume layer's user-facing errors.
//! Pure arithmetic: no I/O.

use super::{VolumeError, VolumeSpec, DEFAULT_DATA_OFFSET};
use crate::crypto::SectorSize;

/// Alignment of the data area's start in the backing file.
pub(crate) const DATA_OFFSET_ALIGN: u64 = 4096;

/// The largest byte offset a file can reach (`off_t` is signed).
pub(crate) const MAX_FILE_END: u64 = i64::MAX as u64;

/// `len` is a positive whole number of `unit`-byte sectors (`unit` 0 never is).
pub(crate) fn is_whole_units(len: u64, unit: u64) -> bool {
    len != 0 && unit != 0 && len.is_multiple_of(unit)
}

/// `len` is a positive whole number of sectors.
pub(crate) fn is_whole_sectors(len: u64, sector: SectorSize) -> bool {
    is_whole_units(len, sector.as_u64())
}

/// `offset` is a sector boundary (zero included).
pub(crate) fn is_sector_aligned(offset: u64, sector: SectorSize) -> bool {
    offset.is_multiple_of(sector.as_u64())
}

/// The sector size and size a caller asks for: [`VolumeError::BadSectorSize`] for a
/// sector size other than 512 or 4096, then [`VolumeError::BadSize`] for a size that
/// is not a positive multiple of it.
pub(crate) fn check_spec(spec: &VolumeSpec) -> Result<SectorSize, VolumeError> {
    let sector = SectorSize::try_from(spec.sector_size)
        .map_err(|_| VolumeError::BadSectorSize(spec.sector_size))?;
    check_size(spec.size, spec.sector_size)?;
    Ok(sector)
}

/// [`VolumeError::BadSize`] unless `size` is a positive multiple of `unit` (which need
/// not be a legal sector size: the in-memory device takes any block size).
pub(crate) fn check_size(size: u64, unit: u32) -> Result<(), VolumeError> {
    if is_whole_units(size, u64::from(unit)) {
        Ok(())
    } else {
        Err(VolumeError::BadSize {
            size,
            sector_size: unit,
        })
    }
}

/// Where the data area may start: a multiple of 4096, at least [`DEFAULT_DATA_OFFSET`].
pub(crate) fn is_valid_data_offset(data_offset: u64) -> bool {
    data_offset >= DEFAULT_DATA_OFFSET && data_offset.is_multiple_of(DATA_OFFSET_ALIGN)
}

/// The end of the data area in the file (`data_offset + size`), or `None` when it
/// lies beyond the largest possible file.
pub(crate) fn data_end(data_offset: u64, size: u64) -> Option<u64> {
    data_offset
        .checked_add(size)
        .filter(|&end| end <= MAX_FILE_END)
}

/// A file of `file_len` bytes holds the whole data area.
pub(crate) fn data_area_fits(file_len: u64, data_offset: u64, size: u64) -> bool {
    data_end(data_offset, size).is_some_and(|end| end <= file_len)
}

/// `[offset, offset + len)` is a non-empty run of whole sectors within a volume of
/// `size` bytes.
pub(crate) fn is_sector_range_within(offset: u64, len: u64, size: u64, sector: SectorSize) -> bool {
    is_whole_sectors(len, sector)
        && is_sector_aligned(offset, sector)
        && offset.checked_add(len).is_some_and(|end| end <= size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64, sector_size: u32) -> VolumeSpec {
        VolumeSpec { size, sector_size }
    }

    #[test]
    fn spec_checks_the_sector_size_first_then_the_size() {
        assert_eq!(
            check_spec(&spec(1 << 20, 512)).expect("ok"),
            SectorSize::S512
        );
        assert_eq!(
            check_spec(&spec(4096, 4096)).expect("ok"),
            SectorSize::S4096
        );
        assert!(matches!(
            check_spec(&spec(0, 1024)),
            Err(VolumeError::BadSectorSize(1024))
        ));
        assert!(matches!(
            check_spec(&spec(0, 0)),
            Err(VolumeError::BadSectorSize(0))
        ));
        for size in [0, 512, 4096 * 3 + 512] {
            assert!(matches!(
                check_spec(&spec(size, 4096)),
                Err(VolumeError::BadSize { size: s, sector_size: 4096 }) if s == size
            ));
        }
    }

    #[test]
    fn sizes_are_positive_whole_units() {
        assert!(is_whole_units(8192, 4096));
        assert!(!is_whole_units(0, 4096));
        assert!(!is_whole_units(4096, 0));
        assert!(!is_whole_units(6144, 4096));
        assert!(check_size(3 * 1024, 1024).is_ok());
        assert!(matches!(
            check_size(0, 1024),
            Err(VolumeError::BadSize {
                size: 0,
                sector_size: 1024
            })
        ));
        assert!(is_whole_sectors(512, SectorSize::S512));
        assert!(!is_whole_sectors(512, SectorSize::S4096));
        assert!(is_sector_aligned(0, SectorSize::S4096));
        assert!(!is_sector_aligned(512, SectorSize::S4096));
    }

    #[test]
    fn data_area_bounds() {
        assert!(is_valid_data_offset(DEFAULT_DATA_OFFSET));
        assert!(is_valid_data_offset(DEFAULT_DATA_OFFSET + 4096));
        assert!(!is_valid_data_offset(DEFAULT_DATA_OFFSET - 4096));
        assert!(!is_valid_data_offset(DEFAULT_DATA_OFFSET + 512));
        assert_eq!(data_end(1 << 20, 4096), Some((1 << 20) + 4096));
        assert_eq!(data_end(1 << 20, MAX_FILE_END), None);
        assert_eq!(data_end(u64::MAX, 1), None);
        assert_eq!(data_end(0, MAX_FILE_END), Some(MAX_FILE_END));
        assert!(data_area_fits(2 << 20, 1 << 20, 1 << 20));
        assert!(!data_area_fits((2 << 20) - 1, 1 << 20, 1 << 20));
        assert!(!data_area_fits(u64::MAX, 1 << 20, MAX_FILE_END));
    }

    #[test]
    fn sector_ranges() {
        let s = SectorSize::S512;
        assert!(is_sector_range_within(512, 1024, 2048, s));
        assert!(!is_sector_range_within(512, 0, 2048, s));
        assert!(!is_sector_range_within(100, 512, 2048, s));
        assert!(!is_sector_range_within(1536, 1024, 2048, s));
        assert!(!is_sector_range_within(u64::MAX - 511, 512, u64::MAX, s));
    }
}
