//! The seam between a block frontend (the NBD session in [`crate::server`]) and whatever
//! serves the blocks: the encrypted [`Volume`], or the in-memory [`MemDevice`] used in tests.
//!
//! It lives at the crate root, not under `server/` or `volume/`, because both sides depend
//! on it and neither should depend on the other's internals; a second frontend (ublk) or a
//! second device would plug in here too. Errors are [`VolumeError`]s so that
//! [`crate::server::errno_for`] stays the one place they become NBD error values.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::volume::{Extent, Volume, VolumeError};

/// A device of fixed size addressed in bytes. Every method may be called from several
/// threads at once; ranges are checked by the device (`OutOfRange` beyond the end).
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The logical sector size in bytes (smaller or unaligned requests still work).
    fn sector_size(&self) -> u32;
    /// Whether writes are refused (`ReadOnly`).
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError>;
    /// Writes `buf` at `offset` (durably before returning with `fua`). The device may use
    /// `buf` as scratch space (the volume encrypts in place): its contents are lost.
    fn write_at(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), VolumeError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), VolumeError>;
    /// Discards a range (TRIM): the device may forget its contents.
    fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError>;
    /// Zeroes a range; whole blocks may become holes.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError>;
    /// Zeroes a range, keeping it allocated (`NBD_CMD_FLAG_NO_HOLE`).
    fn write_zeroes_no_hole(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError>;
    /// The allocation state of `[offset, offset + len)` as consecutive extents covering
    /// exactly that range (empty for `len == 0`).
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError>;
    /// Makes the device's own metadata durable if it has changes (called when a session
    /// ends). A no-op by default.
    fn persist_metadata(&self) -> Result<(), VolumeError> {
        Ok(())
    }
}

/// The encrypted volume as a block device (a thin adapter: each method is the volume's).
impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn sector_size(&self) -> u32 {
        Volume::sector_size(self)
    }
    fn read_only(&self) -> bool {
        Volume::read_only(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        Volume::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), VolumeError> {
        Volume::write_at_mut(self, buf, offset, fua)
    }
    fn flush(&self) -> Result<(), VolumeError> {
        Volume::flush(self)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        Volume::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        Volume::write_zeroes(self, offset, len, fua)
    }
    fn write_zeroes_no_hole(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        Volume::write_zeroes_no_hole(self, offset, len, fua)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        Volume::extents(self, offset, len)
    }
    /// The allocation map (a no-op without changes or when read-only).
    fn persist_metadata(&self) -> Result<(), VolumeError> {
        Volume::persist_map(self)
    }
}

/// An in-memory block device: a byte vector with a per-block allocation bitmap. Blocks
/// never written, trimmed or zeroed whole are holes (read as zeros, reported unallocated).
/// For tests of the frontends; it can also be told to fail reads with `EIO`.
#[derive(Debug)]
pub struct MemDevice {
    block: u32,
    read_only: bool,
    inner: Mutex<MemInner>,
    flushes: AtomicU64,
    fail_reads: AtomicBool,
}

#[derive(Debug)]
struct MemInner {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

impl MemDevice {
    /// A zeroed device of `size` bytes (a multiple of `block`, which is also the sector
    /// size), all holes.
    pub fn new(size: u64, block: u32, read_only: bool) -> Result<MemDevice, VolumeError> {
        if block == 0 || !block.is_power_of_two() {
            return Err(VolumeError::BadSectorSize(block));
        }
        crate::volume::geometry::check_size(size, block)?;
        let len = usize::try_from(size).map_err(|_| VolumeError::BadSize {
            size,
            sector_size: block,
        })?;
        Ok(MemDevice {
            block,
            read_only,
            inner: Mutex::new(MemInner {
                data: vec![0; len],
                allocated: vec![false; len / block as usize],
            }),
            flushes: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
        })
    }

    /// How many times [`BlockDevice::flush`] was called (or a FUA write flushed).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Makes every later read fail with `EIO` (or succeed again).
    pub fn fail_reads(&self, fail: bool) {
        self.fail_reads.store(fail, Ordering::SeqCst);
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(usize, usize), VolumeError> {
        let size = BlockDevice::size(self);
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or(VolumeError::OutOfRange { offset, len, size })?;
        if write && self.read_only {
            return Err(VolumeError::ReadOnly);
        }
        // Both fit: size came from a usize.
        Ok((offset as usize, end as usize))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Zeroes `[lo, hi)`; whole blocks inside become holes when `hole`, every touched
    /// block is allocated otherwise.
    fn zero(&self, lo: usize, hi: usize, hole: bool) {
        let b = self.block as usize;
        let mut g = self.lock();
        g.data[lo..hi].fill(0);
        if lo == hi {
            return;
        }
        if hole {
            for blk in lo.div_ceil(b)..hi / b {
                g.allocated[blk] = false;
            }
        } else {
            for blk in lo / b..hi.div_ceil(b) {
                g.allocated[blk] = true;
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }
    fn sector_size(&self) -> u32 {
        self.block
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        let (lo, hi) = self.check(offset, buf.len() as u64, false)?;
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(VolumeError::Io {
                path: "memory".into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        buf.copy_from_slice(&self.lock().data[lo..hi]);
        Ok(())
    }
    fn write_at(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), VolumeError> {
        let (lo, hi) = self.check(offset, buf.len() as u64, true)?;
        let b = self.block as usize;
        {
            let mut g = self.lock();
            g.data[lo..hi].copy_from_slice(buf);
            for blk in lo / b..hi.div_ceil(b) {
                g.allocated[blk] = true;
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), VolumeError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let (lo, hi) = self.check(offset, len, true)?;
        self.zero(lo, hi, true);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        let (lo, hi) = self.check(offset, len, true)?;
        self.zero(lo, hi, true);
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn write_zeroes_no_hole(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        let (lo, hi) = self.check(offset, len, true)?;
        self.zero(lo, hi, false);
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        let (lo, hi) = self.check(offset, len, false)?;
        let b = self.block as usize;
        let g = self.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = lo;
        while pos < hi {
            let blk = pos / b;
            let next = ((blk + 1) * b).min(hi);
            let allocated = g.allocated[blk];
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.len += (next - pos) as u64,
                _ => out.push(Extent {
                    offset: pos as u64,
                    len: (next - pos) as u64,
                    allocated,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, allocated: bool) -> Extent {
        Extent {
            offset,
            len,
            allocated,
        }
    }

    #[test]
    fn mem_device_round_trips_and_reports_holes() {
        let d = MemDevice::new(8 * 512, 512, false).unwrap();
        assert_eq!(d.extents(0, 4096).unwrap(), vec![ext(0, 4096, false)]);
        let mut data = vec![7u8; 700];
        d.write_at(&mut data, 1000, false).unwrap();
        let mut back = vec![0u8; 700];
        d.read_at(&mut back, 1000).unwrap();
        assert_eq!(back, vec![7u8; 700]);
        // Bytes 1000..1700 touch blocks 1..=3.
        assert_eq!(
            d.extents(0, 4096).unwrap(),
            vec![
                ext(0, 512, false),
                ext(512, 1536, true),
                ext(2048, 2048, false)
            ]
        );
        // Extents are clipped to the range asked.
        assert_eq!(d.extents(600, 100).unwrap(), vec![ext(600, 100, true)]);
        assert!(d.extents(0, 0).unwrap().is_empty());
    }

    #[test]
    fn mem_device_zeroing_punches_only_whole_blocks() {
        let d = MemDevice::new(8 * 512, 512, false).unwrap();
        d.write_at(&mut [1u8; 4096], 0, false).unwrap();
        d.write_zeroes(256, 1024, false).unwrap();
        assert_eq!(
            d.extents(0, 4096).unwrap(),
            vec![
                ext(0, 512, true),
                ext(512, 512, false),
                ext(1024, 3072, true)
            ]
        );
        let mut back = vec![9u8; 4096];
        d.read_at(&mut back, 0).unwrap();
        assert!(back[..256].iter().all(|&b| b == 1));
        assert!(back[256..1280].iter().all(|&b| b == 0));
        assert!(back[1280..].iter().all(|&b| b == 1));
        d.discard(0, 4096).unwrap();
        assert_eq!(d.extents(0, 4096).unwrap(), vec![ext(0, 4096, false)]);
        d.write_zeroes_no_hole(0, 100, true).unwrap();
        assert_eq!(d.extents(0, 512).unwrap(), vec![ext(0, 512, true)]);
        assert_eq!(d.flushes(), 1);
    }

    #[test]
    fn mem_device_refuses_out_of_range_and_read_only_writes() {
        let d = MemDevice::new(4096, 512, true).unwrap();
        assert!(matches!(
            d.read_at(&mut [0u8; 2], 4095),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.extents(u64::MAX, 2),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_at(&mut [0u8; 2], 0, false),
            Err(VolumeError::ReadOnly)
        ));
        assert!(matches!(d.discard(0, 512), Err(VolumeError::ReadOnly)));
        assert!(MemDevice::new(1000, 512, false).is_err());
        assert!(MemDevice::new(4096, 0, false).is_err());
    }
}
