use libublk::sys;

use super::*;
use crate::blockdev::MemDevice;

const SIZE: u64 = 1 << 20;
const BUF: usize = 64 << 10;

fn desc(op: u32, flags: u32, start_sector: u64, nr_sectors: u32) -> Descriptor {
    Descriptor {
        op_flags: op | flags,
        start_sector,
        nr_sectors,
    }
}

fn decode(d: Descriptor) -> Result<Request, Refusal> {
    Request::decode(d, SIZE, BUF)
}

#[test]
fn reads_and_writes_are_decoded_in_512_byte_units() {
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_READ, 0, 8, 16)),
        Ok(Request::Read {
            offset: 4096,
            len: 8192
        })
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE, 0, 1, 1)),
        Ok(Request::Write {
            offset: 512,
            len: 512,
            fua: false
        })
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 0, 8)),
        Ok(Request::Write {
            offset: 0,
            len: 4096,
            fua: true
        })
    );
}

#[test]
fn flush_discard_and_write_zeroes_are_decoded() {
    // A flush carries no range (the kernel sends zeros there); any range is ignored.
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_FLUSH, 0, 0, 0)),
        Ok(Request::Flush)
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_DISCARD, 0, 16, 1024)),
        Ok(Request::Discard {
            offset: 8192,
            len: 512 << 10
        })
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 0, 8)),
        Ok(Request::WriteZeroes {
            offset: 0,
            len: 4096,
            fua: false,
            keep_allocated: false
        })
    );
    assert_eq!(
        decode(desc(
            sys::UBLK_IO_OP_WRITE_ZEROES,
            sys::UBLK_IO_F_NOUNMAP | sys::UBLK_IO_F_FUA,
            8,
            8
        )),
        Ok(Request::WriteZeroes {
            offset: 4096,
            len: 4096,
            fua: true,
            keep_allocated: true
        })
    );
}

#[test]
fn discard_and_zeroes_may_exceed_the_buffer_but_not_the_device() {
    // 1 MiB discard: larger than the 64 KiB buffer, which it does not use.
    assert!(decode(desc(sys::UBLK_IO_OP_DISCARD, 0, 0, 2048)).is_ok());
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_DISCARD, 0, 1, 2048)),
        Err(Refusal::OutOfBounds)
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 2048, 1)),
        Err(Refusal::OutOfBounds)
    );
}

#[test]
fn out_of_range_and_oversized_requests_are_refused() {
    // Ends exactly at the device's end: fine; one sector more: refused.
    assert!(decode(desc(sys::UBLK_IO_OP_READ, 0, 2040, 8)).is_ok());
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_READ, 0, 2041, 8)),
        Err(Refusal::OutOfBounds)
    );
    // Larger than the tag's buffer.
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE, 0, 0, 129)),
        Err(Refusal::OutOfBounds)
    );
    // A start sector whose byte offset overflows.
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_READ, 0, u64::MAX / 256, 1)),
        Err(Refusal::OutOfBounds)
    );
    assert_eq!(Refusal::OutOfBounds.errno(), -libc::EINVAL);
}

#[test]
fn unknown_operations_are_refused_with_eopnotsupp() {
    for op in [
        sys::UBLK_IO_OP_WRITE_SAME,
        sys::UBLK_IO_OP_ZONE_APPEND,
        sys::UBLK_IO_OP_REPORT_ZONES,
    ] {
        let r = decode(desc(op, 0, 0, 8));
        assert_eq!(r, Err(Refusal::Unsupported(op)));
        assert_eq!(r.unwrap_err().errno(), -libc::EOPNOTSUPP);
    }
}

fn mem(read_only: bool) -> MemDevice {
    MemDevice::new(SIZE, 4096, read_only).expect("mem device")
}

fn run(dev: &MemDevice, d: Descriptor, buf: &mut [u8]) -> i32 {
    let req = Request::decode(d, dev.size(), buf.len()).expect("decodes");
    execute(dev, req, buf)
}

#[test]
fn a_write_reads_back_and_results_count_bytes() {
    let dev = mem(false);
    let mut buf = vec![0u8; BUF];
    buf[..8192].fill(0xa5);
    assert_eq!(
        run(&dev, desc(sys::UBLK_IO_OP_WRITE, 0, 8, 16), &mut buf),
        8192
    );
    let mut back = vec![0u8; BUF];
    assert_eq!(
        run(&dev, desc(sys::UBLK_IO_OP_READ, 0, 8, 16), &mut back),
        8192
    );
    assert!(back[..8192].iter().all(|&b| b == 0xa5));
    // The bytes beyond the request are not touched.
    assert!(back[8192..].iter().all(|&b| b == 0));
}

#[test]
fn fua_writes_and_flushes_reach_the_device() {
    let dev = mem(false);
    let mut buf = vec![1u8; BUF];
    run(&dev, desc(sys::UBLK_IO_OP_WRITE, 0, 0, 8), &mut buf);
    assert_eq!(dev.flushes(), 0);
    run(
        &dev,
        desc(sys::UBLK_IO_OP_WRITE, sys::UBLK_IO_F_FUA, 0, 8),
        &mut buf,
    );
    assert_eq!(dev.flushes(), 1);
    assert_eq!(run(&dev, desc(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), &mut buf), 0);
    assert_eq!(dev.flushes(), 2);
}

#[test]
fn discard_and_write_zeroes_make_holes_unless_nounmap() {
    let dev = mem(false);
    let mut buf = vec![7u8; BUF];
    run(&dev, desc(sys::UBLK_IO_OP_WRITE, 0, 0, 128), &mut buf);
    let allocated = |off: u64| dev.extents(off, 4096).expect("extents")[0].allocated;
    assert!(allocated(0) && allocated(8192) && allocated(16384));
    assert_eq!(
        run(&dev, desc(sys::UBLK_IO_OP_DISCARD, 0, 0, 8), &mut buf),
        0
    );
    assert!(!allocated(0));
    assert_eq!(
        run(&dev, desc(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 16, 8), &mut buf),
        0
    );
    assert!(!allocated(8192));
    assert_eq!(
        run(
            &dev,
            desc(sys::UBLK_IO_OP_WRITE_ZEROES, sys::UBLK_IO_F_NOUNMAP, 32, 8),
            &mut buf
        ),
        0
    );
    assert!(allocated(16384));
    let mut back = vec![9u8; BUF];
    run(&dev, desc(sys::UBLK_IO_OP_READ, 0, 0, 48), &mut back);
    // Zeroed: [0, 4K) discarded, [8K, 12K) and [16K, 20K) zeroed; the rest keeps its data.
    for (block, want) in [(0, 0), (1, 7), (2, 0), (3, 7), (4, 0), (5, 7)] {
        let b = &back[block * 4096..(block + 1) * 4096];
        assert!(b.iter().all(|&x| x == want), "block {block}: want {want}");
    }
}

#[test]
fn device_errors_become_negative_errnos() {
    let ro = mem(true);
    let mut buf = vec![0u8; BUF];
    assert_eq!(
        run(&ro, desc(sys::UBLK_IO_OP_WRITE, 0, 0, 8), &mut buf),
        -libc::EPERM
    );
    let dev = mem(false);
    dev.fail_reads(true);
    assert_eq!(
        run(&dev, desc(sys::UBLK_IO_OP_READ, 0, 0, 8), &mut buf),
        -libc::EIO
    );
}

/// A `MemDevice` that counts `persist_metadata` calls (the volume's allocation map).
struct Persisting {
    inner: MemDevice,
    persists: std::sync::atomic::AtomicU32,
}

impl BlockDevice for Persisting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), VolumeError> {
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> Result<(), VolumeError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.inner.write_zeroes(offset, len, fua)
    }
    fn write_zeroes_no_hole(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.inner.write_zeroes_no_hole(offset, len, fua)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<crate::volume::Extent>, VolumeError> {
        self.inner.extents(offset, len)
    }
    fn persist_metadata(&self) -> Result<(), VolumeError> {
        self.persists
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn requests_that_change_allocation_persist_the_metadata_before_completing() {
    let dev = Persisting {
        inner: mem(false),
        persists: Default::default(),
    };
    let count = || dev.persists.load(std::sync::atomic::Ordering::SeqCst);
    let mut buf = vec![3u8; BUF];
    let mut run = |d: Descriptor| {
        let req = Request::decode(d, SIZE, BUF).expect("decodes");
        execute(&dev, req, &mut buf)
    };
    run(desc(sys::UBLK_IO_OP_READ, 0, 0, 8));
    run(desc(sys::UBLK_IO_OP_FLUSH, 0, 0, 0));
    assert_eq!(count(), 0, "reads and flushes change no metadata");
    run(desc(sys::UBLK_IO_OP_WRITE, 0, 0, 8));
    assert_eq!(count(), 1);
    run(desc(sys::UBLK_IO_OP_DISCARD, 0, 0, 8));
    assert_eq!(count(), 2);
    run(desc(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 0, 8));
    run(desc(
        sys::UBLK_IO_OP_WRITE_ZEROES,
        sys::UBLK_IO_F_NOUNMAP,
        0,
        8,
    ));
    assert_eq!(count(), 4);
}
