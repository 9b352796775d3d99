//! One ublk I/O descriptor as a [`BlockDevice`] call: pure decoding ([`Request::decode`])
//! and the call itself ([`execute`]), which returns what the ublk driver expects as the
//! command's result (bytes done, or a negative errno).
//!
//! The kernel addresses ublk requests in 512-byte units whatever the logical block size,
//! and bounds them by the parameters we gave it; those bounds are checked again here
//! (a descriptor lives in memory the kernel writes, so it is treated as peer input).

use libublk::sys;

use crate::blockdev::BlockDevice;
use crate::volume::VolumeError;

/// ublk descriptors count in 512-byte sectors, whatever the device's block size.
const UBLK_SECTOR_SHIFT: u32 = 9;

/// A decoded ublk request, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the tag's buffer.
    Read { offset: u64, len: usize },
    /// Write `len` bytes of the tag's buffer at `offset`; durable before completion with `fua`.
    Write { offset: u64, len: usize, fua: bool },
    /// Make completed writes durable.
    Flush,
    /// Forget a range (TRIM).
    Discard { offset: u64, len: u64 },
    /// Zero a range; `keep_allocated` for `REQ_NOUNMAP` (no holes).
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        keep_allocated: bool,
    },
}

/// Why a descriptor cannot be served: the negative errno it completes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An operation this frontend does not serve (zoned, write-same): `EOPNOTSUPP`.
    Unsupported(u32),
    /// Beyond the device's end, or larger than the tag's buffer: `EINVAL`.
    OutOfBounds,
}

impl Refusal {
    /// The command result for the driver.
    pub fn errno(self) -> i32 {
        match self {
            Refusal::Unsupported(_) => -libc::EOPNOTSUPP,
            Refusal::OutOfBounds => -libc::EINVAL,
        }
    }
}

/// The fields of a ublk I/O descriptor this frontend reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub op_flags: u32,
    pub start_sector: u64,
    pub nr_sectors: u32,
}

impl From<&sys::ublksrv_io_desc> for Descriptor {
    fn from(d: &sys::ublksrv_io_desc) -> Descriptor {
        Descriptor {
            op_flags: d.op_flags,
            start_sector: d.start_sector,
            nr_sectors: d.nr_sectors,
        }
    }
}

impl Request {
    /// Decodes `d` for a device of `device_size` bytes whose per-tag buffers hold
    /// `buf_len` bytes (the bound for reads and writes).
    pub fn decode(d: Descriptor, device_size: u64, buf_len: usize) -> Result<Request, Refusal> {
        let op = d.op_flags & 0xff;
        let fua = d.op_flags & sys::UBLK_IO_F_FUA != 0;
        if op == sys::UBLK_IO_OP_FLUSH {
            return Ok(Request::Flush);
        }
        let (offset, len) = byte_range(d, device_size)?;
        match op {
            sys::UBLK_IO_OP_READ => Ok(Request::Read {
                offset,
                len: buffer_len(len, buf_len)?,
            }),
            sys::UBLK_IO_OP_WRITE => Ok(Request::Write {
                offset,
                len: buffer_len(len, buf_len)?,
                fua,
            }),
            sys::UBLK_IO_OP_DISCARD => Ok(Request::Discard { offset, len }),
            sys::UBLK_IO_OP_WRITE_ZEROES => Ok(Request::WriteZeroes {
                offset,
                len,
                fua,
                keep_allocated: d.op_flags & sys::UBLK_IO_F_NOUNMAP != 0,
            }),
            other => Err(Refusal::Unsupported(other)),
        }
    }
}

/// The descriptor's range in bytes, inside `[0, device_size)`.
fn byte_range(d: Descriptor, device_size: u64) -> Result<(u64, u64), Refusal> {
    let offset = d
        .start_sector
        .checked_mul(1 << UBLK_SECTOR_SHIFT)
        .ok_or(Refusal::OutOfBounds)?;
    let len = u64::from(d.nr_sectors) << UBLK_SECTOR_SHIFT;
    match offset.checked_add(len) {
        Some(end) if end <= device_size => Ok((offset, len)),
        _ => Err(Refusal::OutOfBounds),
    }
}

/// `len` as a buffer length, refused when the tag's buffer is smaller.
fn buffer_len(len: u64, buf_len: usize) -> Result<usize, Refusal> {
    usize::try_from(len)
        .ok()
        .filter(|&l| l <= buf_len)
        .ok_or(Refusal::OutOfBounds)
}

/// Runs `req` on `dev` with the tag's buffer `buf`; returns the command result: the bytes
/// read or written (0 for the others) or a negative errno.
///
/// What a write, discard or write-zeroes changed in the device's own metadata (a thin
/// volume's allocation map) is made durable before the request completes. Over ublk a
/// daemon that is killed and recovered is invisible to the kernel, which expects every
/// completed write to read back; the data itself is in the backing file already (the
/// kill loses no page cache), but a map bit held only in memory would make a freshly
/// allocated chunk read as zeros after recovery. The cost is one data sync when a request
/// allocates or frees a chunk (a no-op otherwise).
pub fn execute(dev: &dyn BlockDevice, req: Request, buf: &mut [u8]) -> i32 {
    let done = match req {
        Request::Read { offset, len } => dev.read_at(&mut buf[..len], offset).map(|()| len),
        Request::Write { offset, len, fua } => dev
            .write_at(&mut buf[..len], offset, fua)
            .and_then(|()| dev.persist_metadata())
            .map(|()| len),
        Request::Flush => dev.flush().map(|()| 0),
        Request::Discard { offset, len } => dev
            .discard(offset, len)
            .and_then(|()| dev.persist_metadata())
            .map(|()| 0),
        Request::WriteZeroes {
            offset,
            len,
            fua,
            keep_allocated,
        } => zero(dev, offset, len, fua, keep_allocated)
            .and_then(|()| dev.persist_metadata())
            .map(|()| 0),
    };
    match done {
        // Bounded by the tag's buffer (a few hundred KiB), so it fits.
        Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
        Err(e) => errno_result(&e),
    }
}

/// Write-zeroes, as holes unless `keep_allocated` (`REQ_NOUNMAP`).
fn zero(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
    fua: bool,
    keep_allocated: bool,
) -> Result<(), VolumeError> {
    if keep_allocated {
        dev.write_zeroes_no_hole(offset, len, fua)
    } else {
        dev.write_zeroes(offset, len, fua)
    }
}

/// A volume error as the negative errno the block layer sees (the same mapping as the
/// NBD replies: `EPERM`, `EINVAL`, `ENOSPC` or `EIO`).
pub fn errno_result(e: &VolumeError) -> i32 {
    let errno = crate::server::errno_for(e).wire();
    -i32::try_from(errno).unwrap_or(libc::EIO)
}

#[cfg(test)]
#[path = "request/tests.rs"]
mod tests;
