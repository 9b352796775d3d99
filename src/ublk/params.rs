//! What the kernel is told about the device (pure): the logical block size is the volume's
//! sector size, a volatile cache with FUA (so the kernel sends flushes and FUA writes),
//! discard and write-zeroes limits, read-only when the volume is.

use libublk::sys;

use super::UblkError;

/// The device as the frontend describes it to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes (a multiple of `sector_size`).
    pub size: u64,
    /// The volume's sector size: 512 or 4096.
    pub sector_size: u32,
    pub read_only: bool,
    /// Bytes each tag's buffer holds: the largest read or write.
    pub io_buf_bytes: u32,
}

/// Largest discard or write-zeroes request the kernel may send, in 512-byte sectors (1 GiB;
/// the volume zeroes or punches a range without a buffer).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// The basic and discard parameters for `g`.
pub fn ublk_params(g: Geometry) -> Result<sys::ublk_params, UblkError> {
    let shift = block_shift(g.sector_size)?;
    if g.size == 0 || !g.size.is_multiple_of(u64::from(g.sector_size)) {
        return Err(UblkError::BadGeometry(format!(
            "size {} is not a positive multiple of the {}-byte sector",
            g.size, g.sector_size
        )));
    }
    let mut attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    if g.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    let basic = sys::ublk_param_basic {
        attrs,
        logical_bs_shift: shift,
        // The volume encrypts whole sectors: smaller writes cost a read-modify-write.
        physical_bs_shift: shift,
        io_min_shift: shift,
        io_opt_shift: shift,
        max_sectors: g.io_buf_bytes >> 9,
        dev_sectors: g.size >> 9,
        ..Default::default()
    };
    let discard = sys::ublk_param_discard {
        discard_granularity: g.sector_size,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        max_discard_segments: 1,
        ..Default::default()
    };
    Ok(sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic,
        discard,
        ..Default::default()
    })
}

/// log2 of a supported sector size.
fn block_shift(sector_size: u32) -> Result<u8, UblkError> {
    match sector_size {
        512 => Ok(9),
        4096 => Ok(12),
        other => Err(UblkError::BadGeometry(format!(
            "sector size {other} (ublk serves 512 or 4096)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(size: u64, sector_size: u32, read_only: bool) -> Geometry {
        Geometry {
            size,
            sector_size,
            read_only,
            io_buf_bytes: 256 << 10,
        }
    }

    #[test]
    fn logical_block_size_is_the_volume_sector_size() {
        let p = ublk_params(geo(64 << 20, 4096, false)).expect("params");
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (64 << 20) / 512);
        assert_eq!(p.basic.max_sectors, 512);
        assert_eq!(p.discard.discard_granularity, 4096);
        let p = ublk_params(geo(1 << 20, 512, false)).expect("params");
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.discard.discard_granularity, 512);
    }

    #[test]
    fn cache_fua_discard_and_read_only_are_advertised() {
        let p = ublk_params(geo(1 << 20, 4096, false)).expect("params");
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
        assert_eq!(p.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
        assert!(p.discard.max_discard_sectors > 0);
        assert!(p.discard.max_write_zeroes_sectors > 0);
        let ro = ublk_params(geo(1 << 20, 4096, true)).expect("params");
        assert_ne!(ro.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(ublk_params(geo(1 << 20, 1024, false)).is_err());
        assert!(ublk_params(geo(0, 4096, false)).is_err());
        assert!(ublk_params(geo(4096 + 512, 4096, false)).is_err());
    }
}
