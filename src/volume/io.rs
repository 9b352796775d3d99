//! Encrypted I/O over the backing file: any byte range, sector-aligned or not,
//! with read-modify-write under per-range locks. Synchronous and thread-safe:
//! the server calls it from blocking worker threads.
//!
//! Data area: sector `i` (counted from `data_offset`) is stored at file offset
//! `data_offset + i * sector_size`, encrypted with AES-256-XTS under tweak `i`
//! (128-bit little endian), i.e. dm-crypt `aes-xts-plain64` with `iv_large_sectors`.

use std::cell::RefCell;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;

use super::header::check_file_uuid;
use super::rangelock::RangeLocks;
use super::sectors::{self, Span};
use super::{Header, VolumeError};
use crate::crypto::{Dek, XtsEngine};

/// Largest buffer one write step encrypts and writes at a time (also the bound on
/// the per-thread scratch buffer).
pub const WRITE_CHUNK: usize = 1 << 20;

/// How a volume is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Punch holes on discard (leaks which blocks are unused).
    pub discard: bool,
}

/// An open, unlocked volume. `Send + Sync`: share it behind an `Arc` and call its
/// `&self` methods from any number of threads.
pub struct Volume {
    file: File,
    path: String,
    size: u64,
    sector_size: u32,
    data_offset: u64,
    uuid: uuid::Uuid,
    read_only: bool,
    discard: bool,
    engine: XtsEngine,
    locks: RangeLocks,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.path)
            .field("uuid", &self.uuid)
            .field("size", &self.size)
            .field("sector_size", &self.sector_size)
            .field("data_offset", &self.data_offset)
            .field("read_only", &self.read_only)
            .field("discard", &self.discard)
            .finish_non_exhaustive()
    }
}

/// Where the plaintext of a write comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Data(&'a [u8]),
    Zeros,
}

thread_local! {
    /// Per-thread scratch for writes, grown on demand up to `WRITE_CHUNK`.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch buffer of exactly `len` (≤ `WRITE_CHUNK`) bytes,
/// reusing this thread's buffer.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        // Not reachable (no re-entrancy), but never panic over it.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

impl Volume {
    /// Opens the data area of `path` whose header is `header`, verifying the key check
    /// value and header MAC with `dek`. Takes ownership of the DEK (wiped on drop).
    pub fn open(
        path: &Path,
        header: &Header,
        dek: Dek,
        opts: OpenOptions,
    ) -> Result<Volume, VolumeError> {
        let p = path.display().to_string();
        header.verify_with_dek(&dek, path)?;
        let end = header
            .data_offset
            .checked_add(header.size)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| VolumeError::InvalidHeader {
                path: p.clone(),
                detail: "data offset + size overflows".into(),
            })?;
        if header.sector_size != header.iv_unit
            || (header.sector_size != 512 && header.sector_size != 4096)
            || !header.size.is_multiple_of(u64::from(header.sector_size))
        {
            return Err(VolumeError::InvalidHeader {
                path: p,
                detail: format!(
                    "sector size {} / IV unit {} / size {} are not a valid v1 combination",
                    header.sector_size, header.iv_unit, header.size
                ),
            });
        }
        let engine = XtsEngine::new(&dek, header.sector_size as usize)?;
        drop(dek);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|e| VolumeError::Io {
                path: p.clone(),
                source: e,
            })?;
        check_file_uuid(&file, path, header.uuid)?;
        lock_in_use(&file, &p, opts.read_only)?;
        let len = file_len(&file).map_err(|e| VolumeError::Io {
            path: p.clone(),
            source: e,
        })?;
        if len < end {
            return Err(VolumeError::Truncated {
                path: p,
                detail: format!(
                    "the data area needs {end} bytes (data offset {} + size {}) but the file has {len}; restore it from a backup",
                    header.data_offset, header.size
                ),
            });
        }
        Ok(Volume {
            file,
            path: p,
            size: header.size,
            sector_size: header.sector_size,
            data_offset: header.data_offset,
            uuid: header.uuid,
            read_only: opts.read_only,
            discard: opts.discard && !opts.read_only,
            engine,
            locks: RangeLocks::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    pub fn uuid(&self) -> uuid::Uuid {
        self.uuid
    }
    /// Byte offset of the data area in the backing file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// Whether discards punch holes (opened with `discard` and writable).
    pub fn discard_enabled(&self) -> bool {
        self.discard
    }
    /// The backing file's path, as given to `open`.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn ss(&self) -> u64 {
        u64::from(self.sector_size)
    }

    fn file_offset(&self, sector: u64) -> u64 {
        // Cannot overflow: sector * ss < size and data_offset + size <= i64::MAX (checked in open).
        self.data_offset + sector * self.ss()
    }

    fn io_err(&self, source: std::io::Error) -> VolumeError {
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => VolumeError::NoSpace(source),
            _ => VolumeError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Reads whole sectors starting at `first` into `buf` (ciphertext); bytes beyond
    /// the end of a (sparse or shortened) file read as zeros.
    fn pread_sectors(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        let offset = self.file_offset(first);
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        Ok(())
    }

    fn pwrite_sectors(&self, buf: &[u8], first: u64) -> Result<(), VolumeError> {
        self.file
            .write_all_at(buf, self.file_offset(first))
            .map_err(|e| self.io_err(e))
    }

    /// Reads and decrypts whole sectors.
    fn read_plain(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.pread_sectors(buf, first)?;
        self.engine.decrypt_sectors(buf, first)?;
        Ok(())
    }

    /// Reads and decrypts `buf.len()` bytes at `offset` (any alignment).
    ///
    /// Reads take no lock: a read overlapping a concurrent write may see either
    /// version of each sector (or, on filesystems that do not make page-sized writes
    /// atomic for readers, a mix), as with any block device.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        sectors::check_range(offset, buf.len() as u64, self.size)?;
        let ss = self.ss();
        let mut pos = offset;
        let mut done = 0usize;
        let mut one = [0u8; 4096];
        while done < buf.len() {
            let remaining = (buf.len() - done) as u64;
            let sector = pos / ss;
            let in_sector = pos % ss;
            if in_sector == 0 && remaining >= ss {
                // Fast path: whole sectors straight into the caller's buffer.
                let n = (remaining - remaining % ss) as usize;
                self.read_plain(&mut buf[done..done + n], sector)?;
                done += n;
                pos += n as u64;
            } else {
                // A partial sector: decrypt it in a stack buffer, copy out the part asked for.
                let tmp = &mut one[..ss as usize];
                self.read_plain(tmp, sector)?;
                let n = (ss - in_sector).min(remaining) as usize;
                let start = in_sector as usize;
                buf[done..done + n].copy_from_slice(&tmp[start..start + n]);
                done += n;
                pos += n as u64;
            }
        }
        Ok(())
    }

    /// Encrypts and writes `buf` at `offset` (any alignment; partial sectors by
    /// read-modify-write). With `fua`, returns only once the data is durable.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), VolumeError> {
        self.write_range(offset, buf.len() as u64, Source::Data(buf), fua)
    }

    /// Like [`Volume::write_at`], but encrypts the caller's buffer in place when the
    /// request is sector-aligned, saving a copy. **`buf` holds ciphertext (or, for an
    /// unaligned request, is left unchanged) afterwards**: only use it when the buffer
    /// is not needed again.
    pub fn write_at_mut(&self, buf: &mut [u8], offset: u64, fua: bool) -> Result<(), VolumeError> {
        let ss = self.ss();
        let len = buf.len() as u64;
        if len == 0 || !sectors::is_aligned(offset, len, ss) {
            return self.write_range(offset, len, Source::Data(buf), fua);
        }
        self.check_writable(offset, len)?;
        let span = sectors::covering(offset, len, ss);
        let _guard = self.locks.lock(span);
        self.engine.encrypt_sectors(buf, span.first)?;
        self.pwrite_sectors(buf, span.first)?;
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes encrypted zeros over the range (reads back as zeros). Works in chunks of
    /// at most [`WRITE_CHUNK`] bytes, so any length (up to the volume size) needs
    /// bounded memory.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.write_range(offset, len, Source::Zeros, fua)
    }

    /// A discard hint: punches whole-sector holes when opened with `discard`, else nothing.
    ///
    /// Only sectors lying wholly inside the range are punched; partial sectors at
    /// either end are left as they are. **A discarded sector reads back as garbage,
    /// not zeros**: the hole reads as zero ciphertext, which decrypts to pseudo-random
    /// bytes. Callers that need zeros must use [`Volume::write_zeroes`]. Filesystems
    /// without hole punching make this a no-op.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_writable(offset, len)?;
        if !self.discard {
            return Ok(());
        }
        let span = sectors::inner(offset, len, self.ss());
        if span.is_empty() {
            return Ok(());
        }
        let _guard = self.locks.lock(span);
        let start = self.file_offset(span.first);
        let bytes = span.count() * self.ss();
        // Both fit in off_t: they lie below data_offset + size <= i64::MAX.
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        loop {
            match nix::fcntl::fallocate(self.file.as_raw_fd(), flags, start as i64, bytes as i64) {
                Ok(()) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EOPNOTSUPP) => return Ok(()),
                Err(e) => return Err(self.io_err(std::io::Error::from_raw_os_error(e as i32))),
            }
        }
    }

    /// The allocation state of `[offset, offset + len)` as consecutive extents
    /// covering exactly that range (allocated runs merged).
    /// (Stub until the allocation map lands: everything is allocated.)
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<super::Extent>, VolumeError> {
        sectors::check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![super::Extent {
            offset,
            len,
            allocated: true,
        }])
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> Result<(), VolumeError> {
        self.sync()
    }

    fn sync(&self) -> Result<(), VolumeError> {
        self.file.sync_data().map_err(|e| self.io_err(e))
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        if self.read_only {
            return Err(VolumeError::ReadOnly);
        }
        sectors::check_range(offset, len, self.size)
    }

    /// The write path shared by `write_at`, `write_at_mut` (unaligned) and
    /// `write_zeroes`: holds the range lock over every sector touched, then walks the
    /// covering sectors in chunks; each chunk is assembled as plaintext in the scratch
    /// buffer (partial first/last sectors read and decrypted first), encrypted and
    /// written with one pwrite.
    fn write_range(
        &self,
        offset: u64,
        len: u64,
        src: Source<'_>,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.check_writable(offset, len)?;
        if len > 0 {
            let ss = self.ss();
            let span = sectors::covering(offset, len, ss);
            let _guard = self.locks.lock(span);
            let chunk_sectors = WRITE_CHUNK as u64 / ss;
            let scratch_len = (span.count().min(chunk_sectors) * ss) as usize;
            with_scratch(scratch_len, |scratch| {
                for chunk in sectors::chunks(span, chunk_sectors) {
                    self.write_chunk(scratch, chunk, offset, len, src)?;
                }
                Ok::<(), VolumeError>(())
            })?;
        }
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn write_chunk(
        &self,
        scratch: &mut [u8],
        chunk: Span,
        offset: u64,
        len: u64,
        src: Source<'_>,
    ) -> Result<(), VolumeError> {
        let ss = self.ss();
        let nbytes = (chunk.count() * ss) as usize;
        let sc = &mut scratch[..nbytes];
        let chunk_start = chunk.first * ss;
        let chunk_end = chunk.end * ss;
        // The part of the request inside this chunk, in volume bytes.
        let a = offset.max(chunk_start);
        let b = (offset + len).min(chunk_end);
        let head_partial = a > chunk_start;
        let tail_partial = b < chunk_end;
        let ss_us = ss as usize;
        if head_partial {
            self.read_plain(&mut sc[..ss_us], chunk.first)?;
        }
        if tail_partial && !(head_partial && chunk.count() == 1) {
            self.read_plain(&mut sc[nbytes - ss_us..], chunk.end - 1)?;
        }
        let dst = &mut sc[(a - chunk_start) as usize..(b - chunk_start) as usize];
        match src {
            Source::Data(buf) => {
                dst.copy_from_slice(&buf[(a - offset) as usize..(b - offset) as usize])
            }
            Source::Zeros => dst.fill(0),
        }
        self.engine.encrypt_sectors(sc, chunk.first)?;
        self.pwrite_sectors(sc, chunk.first)
    }
}

fn file_len(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        use std::io::{Seek, SeekFrom};
        let mut f = file;
        return f.seek(SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// Byte of the reserved area (after both header copies) that an open volume locks, so
/// that one file is never served twice for writing, not even by the same process.
/// The lock is an open-file-description (OFD) record lock, independent of the `flock`
/// that header reads and writes take, so `cryptvol info` still works on a served volume.
const IN_USE_LOCK_OFFSET: i64 = super::header::HEADER_AREA_SIZE as i64;

/// Takes the in-use lock: exclusive for a writable open, shared for a read-only one.
/// It is released when the file is closed (the volume dropped).
fn lock_in_use(file: &File, path: &str, read_only: bool) -> Result<(), VolumeError> {
    use nix::fcntl::{fcntl, FcntlArg};
    let lock = libc::flock {
        l_type: if read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: IN_USE_LOCK_OFFSET,
        l_len: 1,
        l_pid: 0,
    };
    match fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EACCES) => {
            Err(VolumeError::InUse {
                path: path.to_string(),
            })
        }
        // Filesystems without record locks: open unlocked rather than refuse.
        Err(nix::errno::Errno::ENOLCK) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(VolumeError::Io {
            path: path.to_string(),
            source: std::io::Error::from(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::header::tests::{dummy_slot, new_volume};
    use crate::volume::{create, read_header, VolumeSpec, DEFAULT_DATA_OFFSET};
    use proptest::prelude::*;
    use std::path::PathBuf;
    use std::sync::{Arc, Barrier};

    fn open_rw(path: &Path, h: &Header, dek: &Dek) -> Volume {
        let dek = Dek::from_slice(dek.expose()).expect("dek");
        Volume::open(path, h, dek, OpenOptions::default()).expect("open")
    }

    fn setup(size: u64, ss: u32) -> (tempfile::TempDir, PathBuf, Header, Dek, Volume) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), size, ss);
        let v = open_rw(&path, &h, &dek);
        (dir, path, h, dek, v)
    }

    /// xorshift64*: deterministic pseudo-random numbers for tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn volume_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Volume>();
    }

    #[test]
    fn fresh_volume_opens_and_reports_geometry() {
        let (_d, path, h, _, v) = setup(1 << 20, 512);
        assert_eq!(v.size(), 1 << 20);
        assert_eq!(v.sector_size(), 512);
        assert_eq!(v.uuid(), h.uuid);
        assert_eq!(v.data_offset(), DEFAULT_DATA_OFFSET);
        assert!(!v.read_only());
        assert_eq!(v.path(), path.display().to_string());
    }

    #[test]
    fn open_with_wrong_dek_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, _) = new_volume(dir.path(), 1 << 20, 4096);
        let other = Dek::generate().expect("dek");
        assert!(matches!(
            Volume::open(&path, &h, other, OpenOptions::default()),
            Err(VolumeError::KeyCheckFailed { .. })
        ));
    }

    #[test]
    fn open_refuses_header_of_another_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path_a, _, _) = new_volume(dir.path(), 1 << 20, 4096);
        let other = dir.path().join("b.img");
        let uuid = uuid::Uuid::new_v4();
        let dek_b = Dek::generate().expect("dek");
        let spec = VolumeSpec {
            size: 1 << 20,
            sector_size: 4096,
        };
        let hb = create(&other, &spec, uuid, vec![dummy_slot(&uuid, "b")], &dek_b).expect("create");
        assert!(matches!(
            Volume::open(&path_a, &hb, dek_b, OpenOptions::default()),
            Err(VolumeError::InvalidHeader { .. })
        ));
    }

    #[test]
    fn truncated_data_area_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_len(DEFAULT_DATA_OFFSET + (1 << 20) - 4096)
            .expect("truncate");
        let (h2, _) = read_header(&path).expect("header intact");
        assert_eq!(h2.uuid, h.uuid);
        let r = Volume::open(
            &path,
            &h2,
            Dek::from_slice(dek.expose()).expect("dek"),
            OpenOptions::default(),
        );
        match r {
            Err(VolumeError::Truncated { detail, .. }) => {
                assert!(detail.contains("restore"), "{detail}")
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn out_of_range_and_read_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 64 * 1024, 4096);
        let ro = Volume::open(
            &path,
            &h,
            Dek::from_slice(dek.expose()).expect("dek"),
            OpenOptions {
                read_only: true,
                discard: true,
            },
        )
        .expect("open ro");
        let mut b = [0u8; 10];
        ro.read_at(&mut b, 100).expect("read ok");
        assert!(matches!(
            ro.write_at(&b, 0, false),
            Err(VolumeError::ReadOnly)
        ));
        assert!(matches!(
            ro.write_at_mut(&mut b, 0, false),
            Err(VolumeError::ReadOnly)
        ));
        assert!(matches!(
            ro.write_zeroes(0, 10, false),
            Err(VolumeError::ReadOnly)
        ));
        assert!(matches!(ro.discard(0, 4096), Err(VolumeError::ReadOnly)));
        assert!(!ro.discard_enabled());
        ro.flush().expect("flush on read-only is harmless");
        assert!(matches!(
            ro.read_at(&mut b, 64 * 1024 - 5),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            ro.read_at(&mut b, u64::MAX - 2),
            Err(VolumeError::OutOfRange { .. })
        ));
        drop(ro);
        let rw = open_rw(&path, &h, &dek);
        assert!(matches!(
            rw.write_at(&b, 64 * 1024 - 9, false),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            rw.write_zeroes(0, 64 * 1024 + 1, false),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            rw.discard(u64::MAX, 2),
            Err(VolumeError::OutOfRange { .. })
        ));
        // Zero-length requests at the end are fine.
        rw.write_at(&[], 64 * 1024, true).expect("empty write");
        rw.read_at(&mut [], 64 * 1024).expect("empty read");
    }

    #[test]
    fn fresh_volume_reads_without_error() {
        let (_d, _p, _h, _dek, v) = setup(64 * 1024, 4096);
        let mut b = vec![0u8; 64 * 1024];
        v.read_at(&mut b, 0).expect("read sparse");
    }

    #[test]
    fn plaintext_never_reaches_the_file() {
        let (_d, path, _h, _dek, v) = setup(256 * 1024, 4096);
        let pattern: Vec<u8> = b"TOP-SECRET-PATTERN-0123456789abc".repeat(4096);
        v.write_at(&pattern[..100_000], 3, true).expect("write");
        let mut same = vec![0x41u8; 8192];
        v.write_at_mut(&mut same, 128 * 1024, true).expect("write");
        let file = std::fs::read(&path).expect("read file");
        let needle = &pattern[..16];
        assert!(
            !file.windows(16).any(|w| w == needle),
            "plaintext found in backing file"
        );
        assert!(
            !file.windows(64).any(|w| w.iter().all(|&b| b == 0x41)),
            "constant plaintext found"
        );
        // ...while the data reads back.
        let mut back = vec![0u8; 100_000];
        v.read_at(&mut back, 3).expect("read");
        assert_eq!(back, pattern[..100_000]);
    }

    #[test]
    fn data_area_is_standard_xts_plain64() {
        use aes::cipher::KeyInit;
        use aes::Aes256;
        use xts_mode::{get_tweak_default, Xts128};
        for ss in [512usize, 4096] {
            let (_d, path, h, dek, v) = setup(64 * 1024, ss as u32);
            let sector = 5u64;
            let plain: Vec<u8> = (0..ss).map(|i| (i * 7 % 251) as u8).collect();
            v.write_at(&plain, sector * ss as u64, true).expect("write");
            let file = std::fs::read(&path).expect("read");
            let at = (h.data_offset + sector * ss as u64) as usize;
            let mut ct = file[at..at + ss].to_vec();
            assert_ne!(ct, plain);
            let k = dek.expose();
            let xts = Xts128::new(
                Aes256::new_from_slice(&k[..32]).expect("key1"),
                Aes256::new_from_slice(&k[32..]).expect("key2"),
            );
            // Tweak = sector index from the start of the data area, 128-bit LE.
            let mut tweak = [0u8; 16];
            tweak[..8].copy_from_slice(&sector.to_le_bytes());
            assert_eq!(tweak[..], get_tweak_default(u128::from(sector))[..]);
            xts.decrypt_sector(&mut ct, tweak.into());
            assert_eq!(ct, plain, "sector size {ss}");
        }
    }

    #[test]
    fn write_zeroes_reads_back_zeros() {
        let (_d, _p, _h, _dek, v) = setup(3 << 20, 4096);
        let ones = vec![0xFFu8; 3 << 20];
        v.write_at(&ones, 0, false).expect("write");
        // Spans several chunks with partial sectors at both ends.
        let (off, len) = (1000u64, (2 << 20) + 5000);
        v.write_zeroes(off, len, true).expect("zeroes");
        let mut back = vec![0u8; 3 << 20];
        v.read_at(&mut back, 0).expect("read");
        for (i, &b) in back.iter().enumerate() {
            let inside = (i as u64) >= off && (i as u64) < off + len;
            assert_eq!(b, if inside { 0 } else { 0xFF }, "byte {i}");
        }
    }

    #[test]
    fn discard_punches_whole_sectors_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 64 * 1024, 4096);
        let v = Volume::open(
            &path,
            &h,
            Dek::from_slice(dek.expose()).expect("dek"),
            OpenOptions {
                read_only: false,
                discard: true,
            },
        )
        .expect("open");
        assert!(v.discard_enabled());
        let data = vec![0x5Au8; 64 * 1024];
        v.write_at(&data, 0, true).expect("write");
        // Covers sector 1 wholly, sectors 0 and 2 partially.
        v.discard(100, 2 * 4096).expect("discard");
        let mut back = vec![0u8; 64 * 1024];
        v.read_at(&mut back, 0).expect("read");
        assert!(
            back[..4096].iter().all(|&b| b == 0x5A),
            "partial head sector kept"
        );
        assert!(
            back[2 * 4096..].iter().all(|&b| b == 0x5A),
            "partial tail sector kept"
        );
        // Sector 1: either punched (garbage) or untouched if the filesystem cannot punch.
        let file = std::fs::read(&path).expect("read");
        let at = (h.data_offset + 4096) as usize;
        let punched = file[at..at + 4096].iter().all(|&b| b == 0);
        if punched {
            assert!(
                back[4096..8192].iter().any(|&b| b != 0x5A && b != 0),
                "reads garbage"
            );
        }
        // Without the discard option, nothing happens.
        drop(v);
        let v2 = open_rw(&path, &h, &dek);
        v2.write_at(&data, 0, true).expect("write");
        v2.discard(0, 64 * 1024).expect("no-op");
        v2.read_at(&mut back, 0).expect("read");
        assert_eq!(back, data);
    }

    #[test]
    fn aligned_write_at_mut_clobbers_and_persists() {
        let (_d, path, h, dek, v) = setup(64 * 1024, 512);
        let orig: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        let mut buf = orig.clone();
        v.write_at_mut(&mut buf, 1024, false).expect("write");
        assert_ne!(buf, orig, "aligned buffer was encrypted in place");
        let mut odd = orig[..700].to_vec();
        v.write_at_mut(&mut odd, 20_001, false).expect("unaligned");
        v.flush().expect("flush");
        drop(v);
        let v = open_rw(&path, &h, &dek);
        let mut back = vec![0u8; 8192];
        v.read_at(&mut back, 1024).expect("read");
        assert_eq!(back, orig);
        let mut back = vec![0u8; 700];
        v.read_at(&mut back, 20_001).expect("read");
        assert_eq!(back, orig[..700]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, len: usize, seed: u8 },
        WriteMut { offset: u64, len: usize, seed: u8 },
        Zero { offset: u64, len: u64 },
        Read { offset: u64, len: usize },
    }

    const MODEL_SIZE: u64 = 48 * 1024;

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..MODEL_SIZE).prop_flat_map(|o| (Just(o), 0..=(MODEL_SIZE - o).min(20_000)));
        prop_oneof![
            (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write {
                offset,
                len: len as usize,
                seed
            }),
            (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::WriteMut {
                offset,
                len: len as usize,
                seed
            }),
            range
                .clone()
                .prop_map(|(offset, len)| Op::Zero { offset, len }),
            range.prop_map(|(offset, len)| Op::Read {
                offset,
                len: len as usize
            }),
        ]
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn run_model(ss: u32, ops: &[Op]) -> Result<(), TestCaseError> {
        let (_d, _p, _h, _dek, v) = setup(MODEL_SIZE, ss);
        let mut model = vec![0u8; MODEL_SIZE as usize];
        v.write_zeroes(0, MODEL_SIZE, false)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for op in ops {
            match *op {
                Op::Write { offset, len, seed } => {
                    let data = pattern(len, seed);
                    v.write_at(&data, offset, false)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::WriteMut { offset, len, seed } => {
                    let data = pattern(len, seed);
                    let mut buf = data.clone();
                    v.write_at_mut(&mut buf, offset, false)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::Zero { offset, len } => {
                    v.write_zeroes(offset, len, false)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Op::Read { offset, len } => {
                    let mut buf = vec![0u8; len];
                    v.read_at(&mut buf, offset)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&buf[..], &model[offset as usize..offset as usize + len]);
                }
            }
        }
        let mut all = vec![0u8; MODEL_SIZE as usize];
        v.read_at(&mut all, 0)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(all == model, "final image differs from the model");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matches_in_memory_model_512(ops in proptest::collection::vec(op(), 1..12)) {
            run_model(512, &ops)?;
        }
        #[test]
        fn matches_in_memory_model_4096(ops in proptest::collection::vec(op(), 1..12)) {
            run_model(4096, &ops)?;
        }
    }

    /// Concurrent overlapping unaligned writes. Every write holds the lock over all
    /// the sectors it touches for its whole duration, so overlapping writes are
    /// linearizable: after each round, the image must equal the previous image with
    /// the round's writes applied in *some* order. A torn sector (garbage after
    /// decryption) or a lost update (an RMW writing back stale bytes of a neighbour)
    /// breaks that.
    #[test]
    fn concurrent_overlapping_writes_are_linearizable() {
        for ss in [512u32, 4096] {
            let size = 32 * 1024u64;
            let (_d, _p, _h, _dek, v) = setup(size, ss);
            let v = Arc::new(v);
            let writers = 4usize;
            let mut image = vec![0u8; size as usize];
            v.write_at(&image, 0, false).expect("init");
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(ss));
            for round in 0..30u8 {
                // Ranges around a common centre so they overlap partially, unaligned.
                let centre = rng.below(size - 12_000) + 6_000;
                let ranges: Vec<(u64, usize, u8)> = (0..writers)
                    .map(|w| {
                        let start = centre - rng.below(6_000);
                        let len = (rng.below(5_999) + 1) as usize;
                        (start, len, round.wrapping_mul(8).wrapping_add(w as u8 + 1))
                    })
                    .collect();
                let barrier = Arc::new(Barrier::new(writers));
                let handles: Vec<_> = ranges
                    .iter()
                    .copied()
                    .map(|(start, len, value)| {
                        let (v, barrier) = (v.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            let buf = vec![value; len];
                            barrier.wait();
                            v.write_at(&buf, start, false).expect("write");
                        })
                    })
                    .collect();
                for h in handles {
                    h.join().expect("writer thread");
                }
                let mut got = vec![0u8; size as usize];
                v.read_at(&mut got, 0).expect("read");
                let found = permutations(writers).into_iter().find_map(|perm| {
                    let mut m = image.clone();
                    for &w in &perm {
                        let (start, len, value) = ranges[w];
                        m[start as usize..start as usize + len].fill(value);
                    }
                    (m == got).then_some(m)
                });
                match found {
                    Some(m) => image = m,
                    None => panic!("sector size {ss}, round {round}: result is not any serial order of {ranges:?}"),
                }
            }
        }
    }

    /// Writers own interleaved, byte-disjoint 37-byte pieces that share sectors: every
    /// write to a piece is a read-modify-write of sectors holding other writers' pieces.
    /// A lost update would leave some piece with a stale value.
    #[test]
    fn read_modify_write_never_loses_a_neighbours_bytes() {
        const PIECE: u64 = 37;
        const WRITERS: u64 = 6;
        for ss in [512u32, 4096] {
            let size = 16 * 1024u64;
            let (_d, _p, _h, _dek, v) = setup(size, ss);
            let v = Arc::new(v);
            let pieces = size / PIECE;
            let barrier = Arc::new(Barrier::new(WRITERS as usize));
            let handles: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (v, barrier) = (v.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let mut rng = Rng(0x1234_5678 + w);
                        let mine: Vec<u64> = (0..pieces).filter(|p| p % WRITERS == w).collect();
                        barrier.wait();
                        for round in 0..3u8 {
                            let value = [(w as u8 + 1) * 16 + round; PIECE as usize];
                            for _ in 0..mine.len() {
                                let p = mine[rng.below(mine.len() as u64) as usize];
                                v.write_at(&value, p * PIECE, false).expect("write");
                            }
                            // Final pass so every piece holds this round's value.
                            for &p in &mine {
                                v.write_at(&value, p * PIECE, false).expect("write");
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("writer thread");
            }
            let mut got = vec![0u8; size as usize];
            v.read_at(&mut got, 0).expect("read");
            for p in 0..pieces {
                let want = ((p % WRITERS) as u8 + 1) * 16 + 2;
                let piece = &got[(p * PIECE) as usize..((p + 1) * PIECE) as usize];
                assert!(
                    piece.iter().all(|&b| b == want),
                    "sector size {ss}: piece {p} lost its writer's bytes: {piece:?}"
                );
            }
        }
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for i in 0..=p.len() {
                let mut q = p.clone();
                q.insert(i, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn permutations_are_complete() {
        let p = permutations(4);
        assert_eq!(p.len(), 24);
        let mut sorted = p.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 24);
    }

    #[test]
    fn no_space_is_mapped() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let (_d, _p, _h, _dek, v) = setup(64 * 1024, 4096);
        assert!(matches!(v.io_err(e), VolumeError::NoSpace(_)));
        let e = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert!(matches!(v.io_err(e), VolumeError::NoSpace(_)));
        let e = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(v.io_err(e), VolumeError::Io { .. }));
    }

    #[test]
    fn a_volume_is_open_for_writing_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 64 * 1024, 4096);
        let ro = |read_only| OpenOptions {
            read_only,
            discard: false,
        };
        let key = || Dek::from_slice(dek.expose()).expect("dek");
        let rw = Volume::open(&path, &h, key(), ro(false)).expect("first writer");
        assert!(matches!(
            Volume::open(&path, &h, key(), ro(false)),
            Err(VolumeError::InUse { .. })
        ));
        assert!(matches!(
            Volume::open(&path, &h, key(), ro(true)),
            Err(VolumeError::InUse { .. })
        ));
        // The header can still be read while the volume is open.
        read_header(&path).expect("read header of an open volume");
        drop(rw);
        let r1 = Volume::open(&path, &h, key(), ro(true)).expect("reader 1");
        let _r2 = Volume::open(&path, &h, key(), ro(true)).expect("readers share");
        assert!(matches!(
            Volume::open(&path, &h, key(), ro(false)),
            Err(VolumeError::InUse { .. })
        ));
        drop(r1);
    }
}
