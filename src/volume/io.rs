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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;

use super::alloc::{AllocMap, MapHealth};
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
    /// The cipher engines (two while a re-encryption is in progress).
    keys: RwLock<Keys>,
    pub(super) locks: RangeLocks,
    /// The allocation map (thin volumes); `None` for volumes made before it existed.
    pub(super) map: Option<AllocMap>,
    /// A re-encryption is in progress: reads take range locks (a zone being converted
    /// must not be read half-way).
    pub(super) reencrypting: AtomicBool,
    /// The DEK(s), kept for header updates during re-encryption; the mutex also
    /// serialises re-encryption steps.
    pub(super) ctl: Mutex<Ctl>,
    /// Changed-chunk tracking (served volumes, see `online.rs`).
    pub(super) tracking: std::sync::OnceLock<super::online::Tracking>,
    /// A snapshot view is active: writes preserve old chunks first.
    pub(super) snapshotting: AtomicBool,
    pub(super) cow: Mutex<Option<std::sync::Arc<super::online::Cow>>>,
    /// A re-encryption zone whose step failed half-way and could not be finished: I/O to
    /// it is refused until the volume is opened again.
    pub(super) broken_zone: Mutex<Option<Span>>,
    /// Hole punches of trimmed chunks, as a sequence count: odd while one is under way.
    /// Reads take no lock, so a read that found a chunk allocated just before a trim
    /// cleared its bit could read the hole punched next (zeros, which decrypt to
    /// garbage); a read that overlapped a punch is redone under the range lock, which
    /// the trim holds while clearing and punching (see [`Volume::read_at`]).
    punches: AtomicU64,
    /// Test hook: runs once, in a read, between the map check and the file read.
    #[cfg(test)]
    read_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// Keys a volume keeps beyond its engines (only re-encryption needs them).
pub(super) struct Ctl {
    /// The DEK of the header's keyslots (the old one during a re-encryption).
    pub dek: Dek,
    /// The new DEK while re-encrypting.
    pub next: Option<Dek>,
}

/// The engines: `cur` for sectors at or above `wm`, `next` below it (re-encryption).
pub(super) struct Keys {
    pub cur: XtsEngine,
    pub next: Option<XtsEngine>,
    /// Watermark in sectors.
    pub wm: u64,
}

impl Keys {
    fn apply(
        &self,
        buf: &mut [u8],
        first: u64,
        ss: usize,
        encrypt: bool,
    ) -> Result<(), VolumeError> {
        let run = |e: &XtsEngine, b: &mut [u8], f: u64| {
            if encrypt {
                e.encrypt_sectors(b, f)
            } else {
                e.decrypt_sectors(b, f)
            }
        };
        match &self.next {
            Some(next) if first < self.wm => {
                let below = ((self.wm - first) as usize)
                    .saturating_mul(ss)
                    .min(buf.len());
                let (lo, hi) = buf.split_at_mut(below);
                run(next, lo, first)?;
                if !hi.is_empty() {
                    run(&self.cur, hi, self.wm)?;
                }
                Ok(())
            }
            _ => Ok(run(&self.cur, buf, first)?),
        }
    }
}

pub(super) fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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

impl<'a> Source<'a> {
    /// The part of the source for volume bytes `[lo, hi)` of a request at `offset`.
    fn sub(self, offset: u64, lo: u64, hi: u64) -> Source<'a> {
        match self {
            Source::Data(b) => Source::Data(&b[(lo - offset) as usize..(hi - offset) as usize]),
            Source::Zeros => Source::Zeros,
        }
    }
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
    ///
    /// A volume with a re-encryption in progress needs its new DEK too: use
    /// [`Volume::open_with_next`].
    pub fn open(
        path: &Path,
        header: &Header,
        dek: Dek,
        opts: OpenOptions,
    ) -> Result<Volume, VolumeError> {
        Volume::open_with_next(path, header, dek, None, opts)
    }

    /// [`Volume::open`] with the new DEK of a re-encryption in progress (`next`, checked
    /// against the header's re-encryption key check value). Finishes an interrupted
    /// re-encryption step first (read-write opens only).
    pub fn open_with_next(
        path: &Path,
        header: &Header,
        dek: Dek,
        next: Option<Dek>,
        opts: OpenOptions,
    ) -> Result<Volume, VolumeError> {
        let p = path.display().to_string();
        header.verify_with_dek(&dek, path)?;
        let next = match (&header.reencrypt, next) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(VolumeError::ReencryptKeyNeeded { path: p });
            }
            (Some(_), Some(n)) => {
                header.verify_next_dek(&n, path)?;
                Some(n)
            }
        };
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
        let next_engine = match &next {
            Some(n) => Some(XtsEngine::new(n, header.sector_size as usize)?),
            None => None,
        };
        let wm = header
            .reencrypt
            .as_ref()
            .map_or(0, |r| r.watermark / u64::from(header.sector_size));
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
        let map = match &header.allocation_map {
            Some(layout) => {
                let map = AllocMap::open(&file, *layout, header.uuid, header.size)
                    .map_err(|e| super::map_error(path, e))?;
                let h = map.health();
                if !h.pages_damaged.is_empty() {
                    tracing::warn!(path = %p, pages = ?h.pages_damaged, "allocation map pages damaged in both copies: their chunks are treated as allocated (never-written blocks there read as random bytes); the map is rewritten on the next flush");
                } else if h.pages_one_copy_bad > 0 {
                    tracing::warn!(path = %p, pages = h.pages_one_copy_bad, "allocation map: one copy of some pages is damaged; using the other (repaired on the next flush)");
                }
                Some(map)
            }
            None => None,
        };
        let vol = Volume {
            file,
            path: p,
            size: header.size,
            sector_size: header.sector_size,
            data_offset: header.data_offset,
            uuid: header.uuid,
            read_only: opts.read_only,
            discard: opts.discard && !opts.read_only,
            keys: RwLock::new(Keys {
                cur: engine,
                next: next_engine,
                wm,
            }),
            locks: RangeLocks::default(),
            map,
            reencrypting: AtomicBool::new(header.reencrypt.is_some()),
            ctl: Mutex::new(Ctl { dek, next }),
            tracking: std::sync::OnceLock::new(),
            snapshotting: AtomicBool::new(false),
            cow: Mutex::new(None),
            broken_zone: Mutex::new(None),
            punches: AtomicU64::new(0),
            #[cfg(test)]
            read_hook: Mutex::new(None),
        };
        if !vol.read_only && vol.map.as_ref().is_some_and(|m| !m.health().is_healthy()) {
            vol.flush()?;
        }
        if let Some(zone) = header.reencrypt.as_ref().and_then(|r| r.hotzone.as_ref()) {
            if vol.read_only {
                return Err(VolumeError::ReencryptInterrupted {
                    path: vol.path.clone(),
                });
            }
            vol.recover_hotzone(zone)?;
        }
        Ok(vol)
    }

    /// Whether the volume has an allocation map (thin volume).
    pub fn is_thin(&self) -> bool {
        self.map.is_some()
    }

    /// The allocation map's chunk size (`None` without a map).
    pub fn chunk_size(&self) -> Option<u64> {
        self.map.as_ref().map(AllocMap::chunk_size)
    }

    /// Allocated bytes of the data area right now (the whole size without a map).
    pub fn allocated_bytes(&self) -> u64 {
        match &self.map {
            Some(m) => m.allocated(self.size).1,
            None => self.size,
        }
    }

    /// What opening found about the map (`None` without a map).
    pub fn map_health(&self) -> Option<&MapHealth> {
        self.map.as_ref().map(AllocMap::health)
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

    pub(super) fn io_error(&self, source: std::io::Error) -> VolumeError {
        self.io_err(source)
    }

    /// Takes the range lock for a write over `span` and runs the pre-write hooks
    /// (changed-chunk tracking, snapshot copy-before-write).
    fn lock_w(&self, span: Span) -> Result<super::rangelock::RangeGuard<'_>, VolumeError> {
        let g = self.locks.lock(span);
        if self.reencrypting.load(Ordering::Acquire) {
            self.check_broken_zone(span)?;
        }
        self.before_write(span)?;
        Ok(g)
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
        self.decrypt(buf, first)
    }

    pub(super) fn keys_read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys()
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encrypts whole sectors in place with the key each sector is under.
    pub(super) fn encrypt(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.keys()
            .apply(buf, first, self.sector_size as usize, true)
    }

    /// Decrypts whole sectors in place with the key each sector is under.
    pub(super) fn decrypt(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.keys()
            .apply(buf, first, self.sector_size as usize, false)
    }

    /// Runs `f` with the engines locked for writing (re-encryption steps move the
    /// watermark and swap engines through this).
    pub(super) fn with_keys_mut<R>(&self, f: impl FnOnce(&mut Keys) -> R) -> R {
        let mut k = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        f(&mut k)
    }

    pub(super) fn read_sectors_raw(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.pread_sectors(buf, first)
    }

    pub(super) fn write_sectors_raw(&self, buf: &[u8], first: u64) -> Result<(), VolumeError> {
        self.pwrite_sectors(buf, first)
    }

    pub(super) fn sync_data(&self) -> Result<(), VolumeError> {
        self.sync()
    }

    /// Reads and decrypts `buf.len()` bytes at `offset` (any alignment).
    ///
    /// Reads take no lock: a read overlapping a concurrent write may see either
    /// version of each sector (or, on filesystems that do not make page-sized writes
    /// atomic for readers, a mix), as with any block device. A read overlapping a trim
    /// of a thin chunk sees the old data or zeros, never the punched hole: a read during
    /// which a hole was punched is redone under the range lock.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        sectors::check_range(offset, buf.len() as u64, self.size)?;
        // While re-encrypting, a zone being converted is range-locked by the step:
        // wait for it rather than decrypt a half-converted zone with the wrong key.
        let reencrypting = self.reencrypting.load(Ordering::Acquire);
        let span = sectors::covering(offset, buf.len() as u64, self.ss());
        if reencrypting {
            let _guard = self.locks.lock(span);
            self.check_broken_zone(span)?;
            return self.read_mapped(buf, offset);
        }
        // A seqlock against hole punching: the fast path costs two atomic loads.
        let before = self.punches.load(Ordering::SeqCst);
        self.read_mapped(buf, offset)?;
        if before.is_multiple_of(2) && self.punches.load(Ordering::SeqCst) == before {
            return Ok(());
        }
        // A punch was under way at some point of this read: the map bit we saw set may
        // have been cleared and the chunk punched before we read it. The trim holds the
        // range lock from clearing the bit to the end of the punch, so under it the map
        // and the file agree.
        let _guard = self.locks.lock(span);
        self.read_mapped(buf, offset)
    }

    /// The body of [`Volume::read_at`]: unallocated chunks as zeros, the rest from the
    /// file.
    fn read_mapped(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        let Some(map) = &self.map else {
            return self.read_range(buf, offset);
        };
        if buf.is_empty() {
            return Ok(());
        }
        let cs = map.chunk_size();
        let end = offset + buf.len() as u64;
        let (c0, c1) = (offset / cs, end.div_ceil(cs));
        if map.all_allocated(c0, c1) {
            self.run_read_hook();
            return self.read_range(buf, offset);
        }
        for (a, b, allocated) in map.runs(c0, c1) {
            let lo = offset.max(a * cs);
            let hi = end.min(b * cs);
            let part = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if allocated {
                self.run_read_hook();
                self.read_range(part, lo)?;
            } else {
                part.fill(0);
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn run_read_hook(&self) {
        let hook = lock_ignoring_poison(&self.read_hook).take();
        if let Some(h) = hook {
            h();
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn run_read_hook(&self) {}

    /// Reads and decrypts `[offset, offset + buf.len())` from the file (range checked).
    fn read_range(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
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
        if let Some(map) = &self.map {
            let cs = map.chunk_size();
            let (c0, c1) = (offset / cs, (offset + len).div_ceil(cs));
            if !map.all_allocated(c0, c1) {
                // First write to a chunk: the general path allocates it, under one lock
                // over the whole chunks (not this span's lock first, then that one).
                return self.write_range(offset, len, Source::Data(buf), fua);
            }
            let guard = self.lock_w(span)?;
            if !map.all_allocated(c0, c1) {
                // A trim unallocated a chunk between the check and the lock (rare):
                // the general path reallocates it.
                drop(guard);
                return self.write_range(offset, len, Source::Data(buf), fua);
            }
            self.encrypt(buf, span.first)?;
            self.pwrite_sectors(buf, span.first)?;
            drop(guard);
        } else {
            let _guard = self.lock_w(span)?;
            self.encrypt(buf, span.first)?;
            self.pwrite_sectors(buf, span.first)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes encrypted zeros over the range (reads back as zeros). Works in chunks of
    /// at most [`WRITE_CHUNK`] bytes, so any length (up to the volume size) needs
    /// bounded memory.
    ///
    /// On a thin volume, whole chunks in the range are marked unallocated instead of
    /// written (and, when opened with `discard`, their space is punched out of the
    /// file once the map saying so is durable); partial chunks get encrypted zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.zero_range(offset, len, fua, self.discard)
    }

    /// Like [`Volume::write_zeroes`], but never frees file space (NBD's `NO_HOLE`).
    pub fn write_zeroes_no_hole(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.zero_range(offset, len, fua, false)
    }

    fn zero_range(&self, offset: u64, len: u64, fua: bool, punch: bool) -> Result<(), VolumeError> {
        match &self.map {
            None => self.write_range(offset, len, Source::Zeros, fua),
            Some(map) => {
                self.check_writable(offset, len)?;
                if len > 0 {
                    self.zero_thin(map, offset, len, punch)?;
                }
                if fua {
                    self.flush()?;
                }
                Ok(())
            }
        }
    }

    /// The sectors of chunks `[c0, c1)` (the last chunk may be short).
    fn chunk_span(&self, cs: u64, c0: u64, c1: u64) -> Span {
        let ss = self.ss();
        Span {
            first: c0 * cs / ss,
            end: (c1 * cs).min(self.size) / ss,
        }
    }

    fn zero_thin(
        &self,
        map: &AllocMap,
        offset: u64,
        len: u64,
        punch: bool,
    ) -> Result<(), VolumeError> {
        let cs = map.chunk_size();
        let end = offset + len;
        let (c0, c1) = (offset / cs, end.div_ceil(cs));
        let _guard = self.lock_w(self.chunk_span(cs, c0, c1))?;
        let mut cleared: Vec<(u64, u64)> = Vec::new();
        for c in c0..c1 {
            if !map.is_allocated(c) {
                continue; // already reads as zeros
            }
            let (a, b) = (c * cs, ((c + 1) * cs).min(self.size));
            let (lo, hi) = (offset.max(a), end.min(b));
            if lo == a && hi == b {
                map.set_unallocated(c);
                match cleared.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => cleared.push((a, b)),
                }
            } else {
                let span = sectors::covering(lo, hi - lo, self.ss());
                self.write_sectors_locked(span, lo, hi - lo, Source::Zeros)?;
            }
        }
        if punch && !cleared.is_empty() {
            // The cleared bits must be durable before the data goes: otherwise a crash
            // could leave a set bit over a hole, which would read as garbage.
            self.flush()?;
            // Lock-free reads that overlap the punch redo themselves under the range
            // lock held here (see `read_at`).
            self.punches.fetch_add(1, Ordering::SeqCst);
            let punched = cleared
                .into_iter()
                .try_for_each(|(a, b)| self.punch(a, b - a));
            self.punches.fetch_add(1, Ordering::SeqCst);
            punched?;
        }
        Ok(())
    }

    /// Punches `[offset, offset + len)` (sector-aligned) out of the file.
    fn punch(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let start = self.data_offset + offset;
        // Both fit in off_t: they lie below data_offset + size <= i64::MAX.
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        loop {
            match nix::fcntl::fallocate(self.file.as_raw_fd(), flags, start as i64, len as i64) {
                Ok(()) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EOPNOTSUPP) => return Ok(()),
                Err(e) => return Err(self.io_err(std::io::Error::from_raw_os_error(e as i32))),
            }
        }
    }

    /// Fills the whole data area with encrypted zeros and marks every chunk allocated
    /// (`cryptvol create --preallocate`): afterwards the file shows no sign of which
    /// blocks are ever written. `progress` is called with the bytes done so far.
    pub fn preallocate(&self, progress: &dyn Fn(u64)) -> Result<(), VolumeError> {
        self.check_writable(0, self.size)?;
        let Some(map) = &self.map else {
            // Without a map, encrypted zeros over everything is the same thing.
            let mut done = 0;
            while done < self.size {
                let n = (self.size - done).min(WRITE_CHUNK as u64);
                self.write_range(done, n, Source::Zeros, false)?;
                done += n;
                progress(done);
            }
            return self.flush();
        };
        let cs = map.chunk_size();
        let per = (WRITE_CHUNK as u64 / cs).max(1);
        let mut c = 0;
        while c < map.chunks() {
            let e = (c + per).min(map.chunks());
            let _guard = self.lock_w(self.chunk_span(cs, c, e))?;
            for (a, b, allocated) in map.runs(c, e) {
                if allocated {
                    continue;
                }
                self.allocate_run(map, a, b, 0, 0, &[])?;
            }
            c = e;
            progress((c * cs).min(self.size));
        }
        self.flush()
    }

    /// A discard hint (NBD `TRIM`): a no-op unless the volume was opened with
    /// `discard`. With it, on a thin volume, the range is zeroed as by
    /// [`Volume::write_zeroes`] (whole chunks unallocated and punched, partial chunks
    /// encrypted zeros), so a trimmed range reads back as zeros. On a volume without
    /// an allocation map, whole sectors are punched and **read back as garbage**
    /// (a hole decrypts to pseudo-random bytes); partial sectors are left alone.
    /// Filesystems without hole punching make the punching a no-op.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_writable(offset, len)?;
        if !self.discard {
            return Ok(());
        }
        if self.map.is_some() {
            return self.zero_range(offset, len, false, true);
        }
        let span = sectors::inner(offset, len, self.ss());
        if span.is_empty() {
            return Ok(());
        }
        let _guard = self.lock_w(span)?;
        self.punch(span.first * self.ss(), span.count() * self.ss())
    }

    /// The allocation state of `[offset, offset + len)` as consecutive extents
    /// covering exactly that range (runs of equal state merged, chunk-granular).
    /// Without an allocation map everything is allocated.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<super::Extent>, VolumeError> {
        sectors::check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let Some(map) = &self.map else {
            return Ok(vec![super::Extent {
                offset,
                len,
                allocated: true,
            }]);
        };
        let cs = map.chunk_size();
        let end = offset + len;
        Ok(map
            .runs(offset / cs, end.div_ceil(cs))
            .into_iter()
            .map(|(a, b, allocated)| {
                let lo = offset.max(a * cs);
                super::Extent {
                    offset: lo,
                    len: end.min(b * cs) - lo,
                    allocated,
                }
            })
            .collect())
    }

    /// Whether the allocation map has changes not yet on disk.
    pub fn map_dirty(&self) -> bool {
        self.map.as_ref().is_some_and(AllocMap::is_dirty)
    }

    /// Makes the allocation map durable if it has changes (with the data it points
    /// to, as [`Volume::flush`] does); a no-op otherwise. The server calls it when a
    /// connection ends and every second, so that writes to new chunks do not stay
    /// invisible-after-a-crash for long even if the client never flushes.
    pub fn persist_map(&self) -> Result<(), VolumeError> {
        if self.read_only || !self.map_dirty() {
            return Ok(());
        }
        self.flush()
    }

    /// Makes every completed write durable (fdatasync), then the allocation map that
    /// points to it: an acknowledged flush covers both.
    pub fn flush(&self) -> Result<(), VolumeError> {
        match &self.map {
            Some(map) if !self.read_only => map
                .persist(&self.file, &|| self.file.sync_data())
                .map_err(|e| self.io_err(e)),
            _ => self.sync(),
        }
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
            let span = sectors::covering(offset, len, self.ss());
            match &self.map {
                None => {
                    let _guard = self.lock_w(span)?;
                    self.write_sectors_locked(span, offset, len, src)?;
                }
                Some(map) => self.write_thin(map, span, offset, len, src)?,
            }
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes `[offset, offset + len)` (covering sectors `span`) whose range lock the
    /// caller holds, in steps of at most `WRITE_CHUNK` bytes.
    fn write_sectors_locked(
        &self,
        span: Span,
        offset: u64,
        len: u64,
        src: Source<'_>,
    ) -> Result<(), VolumeError> {
        let ss = self.ss();
        let chunk_sectors = WRITE_CHUNK as u64 / ss;
        let scratch_len = (span.count().min(chunk_sectors) * ss) as usize;
        with_scratch(scratch_len, |scratch| {
            for chunk in sectors::chunks(span, chunk_sectors) {
                self.write_chunk(scratch, chunk, offset, len, src)?;
            }
            Ok(())
        })
    }

    /// The write path of a thin volume. When every chunk touched is allocated, a
    /// plain write under the sector lock. Otherwise, under a lock over the whole
    /// chunks: allocated runs are written as usual; unallocated runs are written whole
    /// (the request's bytes, encrypted zeros around them) and only then marked
    /// allocated, so a set bit always covers a fully written chunk.
    fn write_thin(
        &self,
        map: &AllocMap,
        span: Span,
        offset: u64,
        len: u64,
        src: Source<'_>,
    ) -> Result<(), VolumeError> {
        let cs = map.chunk_size();
        let end = offset + len;
        let (c0, c1) = (offset / cs, end.div_ceil(cs));
        if map.all_allocated(c0, c1) {
            let guard = self.lock_w(span)?;
            // Bits change only under a lock over their whole chunk, which this
            // overlaps: re-checked here, the answer is stable while we hold it.
            if map.all_allocated(c0, c1) {
                return self.write_sectors_locked(span, offset, len, src);
            }
            drop(guard);
        }
        let _guard = self.lock_w(self.chunk_span(cs, c0, c1))?;
        for (a, b, allocated) in map.runs(c0, c1) {
            let lo = offset.max(a * cs);
            let hi = end.min(b * cs);
            let part = src.sub(offset, lo, hi);
            match (allocated, part) {
                (true, _) => {
                    let s = sectors::covering(lo, hi - lo, self.ss());
                    self.write_sectors_locked(s, lo, hi - lo, part)?;
                }
                // Zeros over never-written chunks: nothing to do.
                (false, Source::Zeros) => {}
                (false, Source::Data(data)) => self.allocate_run(map, a, b, lo, hi, data)?,
            }
        }
        Ok(())
    }

    /// Writes the unallocated chunks `[a, b)` whole: `data` at volume bytes
    /// `[lo, hi)`, encrypted zeros elsewhere; then marks them allocated. The caller
    /// holds the range lock over the chunks.
    fn allocate_run(
        &self,
        map: &AllocMap,
        a: u64,
        b: u64,
        lo: u64,
        hi: u64,
        data: &[u8],
    ) -> Result<(), VolumeError> {
        let cs = map.chunk_size();
        let ss = self.ss();
        let step = (WRITE_CHUNK as u64 / cs).max(1) * cs;
        let mut pos = a * cs;
        let stop = (b * cs).min(self.size);
        while pos < stop {
            let n = (stop - pos).min(step);
            with_scratch(n as usize, |sc| {
                sc.fill(0);
                let (x, y) = (lo.max(pos), hi.min(pos + n));
                if x < y {
                    sc[(x - pos) as usize..(y - pos) as usize]
                        .copy_from_slice(&data[(x - lo) as usize..(y - lo) as usize]);
                }
                self.encrypt(sc, pos / ss)?;
                self.pwrite_sectors(sc, pos / ss)
            })?;
            for c in pos / cs..(pos + n).div_ceil(cs) {
                map.set_allocated(c);
            }
            pos += n;
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
        self.encrypt(sc, chunk.first)?;
        self.pwrite_sectors(sc, chunk.first)
    }
}

impl Drop for Volume {
    /// Persists the allocation map of writes that were never flushed (best effort: an
    /// error is logged; unflushed writes carry no durability promise anyway), then marks
    /// the changed-chunk tracking as cleanly closed.
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.flush() {
            tracing::warn!(path = %self.path, "final flush of the volume failed: {e}");
            return; // tracking stays "in use": the next snapshot reads everything
        }
        self.close_tracking();
    }
}

/// The length of a regular file or of a block device (seeking to its end).
pub(super) fn file_len(file: &File) -> std::io::Result<u64> {
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
    use crate::volume::header::tests::{dummy_slot, new_legacy_volume, new_volume};
    use crate::volume::{create, read_header, Extent, VolumeSpec, DEFAULT_DATA_OFFSET};
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

    fn open_discard(path: &Path, h: &Header, dek: &Dek) -> Volume {
        Volume::open(
            path,
            h,
            Dek::from_slice(dek.expose()).expect("dek"),
            OpenOptions {
                read_only: false,
                discard: true,
            },
        )
        .expect("open")
    }

    #[test]
    fn legacy_discard_punches_whole_sectors_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_legacy_volume(dir.path(), 64 * 1024, 4096);
        let v = open_discard(&path, &h, &dek);
        assert!(v.discard_enabled() && !v.is_thin());
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

    /// Allocated bytes of the backing file's data area (what `du` would count).
    fn file_blocks(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat").blocks() * 512
    }

    #[test]
    fn thin_fresh_volume_reads_zeros_and_allocates_whole_chunks() {
        let (_d, path, h, dek, v) = setup(1 << 20, 4096);
        assert!(v.is_thin());
        assert_eq!(v.chunk_size(), Some(65536));
        let mut back = vec![0xFFu8; 1 << 20];
        v.read_at(&mut back, 0).expect("read");
        assert!(back.iter().all(|&b| b == 0), "fresh volume reads zeros");
        assert_eq!(v.allocated_bytes(), 0);
        let before = file_blocks(&path);
        // A 100-byte write in chunk 3 allocates exactly that chunk.
        v.write_at(b"hello thin world", 3 * 65536 + 1000, false)
            .expect("write");
        assert_eq!(v.allocated_bytes(), 65536);
        let ext = v.extents(0, 1 << 20).expect("extents");
        assert_eq!(
            ext,
            vec![
                Extent {
                    offset: 0,
                    len: 3 * 65536,
                    allocated: false
                },
                Extent {
                    offset: 3 * 65536,
                    len: 65536,
                    allocated: true
                },
                Extent {
                    offset: 4 * 65536,
                    len: (1 << 20) - 4 * 65536,
                    allocated: false
                },
            ]
        );
        assert_eq!(
            v.extents(3 * 65536 + 10, 100).expect("sub"),
            vec![Extent {
                offset: 3 * 65536 + 10,
                len: 100,
                allocated: true
            }]
        );
        v.read_at(&mut back, 0).expect("read");
        let mut want = vec![0u8; 1 << 20];
        want[3 * 65536 + 1000..3 * 65536 + 1016].copy_from_slice(b"hello thin world");
        assert_eq!(back, want, "rest of the chunk reads as zeros");
        v.flush().expect("flush");
        assert!(
            file_blocks(&path) >= before + 65536,
            "the whole chunk was written"
        );
        // The whole chunk holds ciphertext of zeros around the data (no hole inside).
        let file = std::fs::read(&path).expect("read file");
        let base = (h.data_offset + 3 * 65536) as usize;
        assert!(file[base..base + 4096].iter().any(|&b| b != 0));
        assert!(file[base + 61440..base + 65536].iter().any(|&b| b != 0));
        // Unwritten chunks were never touched.
        assert!(file[h.data_offset as usize..base].iter().all(|&b| b == 0));
        drop(v);
        // Persisted: a reopened volume sees the same map and data.
        let v = open_rw(&path, &h, &dek);
        assert_eq!(v.allocated_bytes(), 65536);
        v.read_at(&mut back, 0).expect("read");
        assert_eq!(back, want);
        let sum = crate::volume::map_summary(&path, &h)
            .expect("summary")
            .expect("thin");
        assert_eq!(
            (sum.allocated_chunks, sum.allocated_bytes, sum.chunks),
            (1, 65536, 16)
        );
        assert!(sum.health.is_healthy());
    }

    /// Issue 15: the first write to a never-written chunk used to take the sector
    /// range lock, find the chunk unallocated, drop it and lock the whole chunk: two
    /// acquisitions (and two copy-before-write passes). Every write locks once.
    #[test]
    fn every_write_takes_the_range_lock_once() {
        let (_d, _path, _h, _dek, v) = setup(1 << 20, 4096);
        let locks = |v: &Volume| v.locks.acquisitions();
        let cases: [(&str, u64, usize, bool); 5] = [
            (
                "aligned write_at_mut, never-written chunk",
                2 * 65536,
                4096,
                true,
            ),
            (
                "aligned write_at_mut, allocated chunk",
                2 * 65536 + 8192,
                4096,
                true,
            ),
            (
                "unaligned write_at, never-written chunk",
                5 * 65536 + 10,
                100,
                false,
            ),
            (
                "unaligned write_at, allocated chunk",
                5 * 65536 + 500,
                100,
                false,
            ),
            (
                "write_at across chunks, one never written",
                5 * 65536 + 60000,
                10000,
                false,
            ),
        ];
        for (what, offset, len, in_place) in cases {
            let mut data = vec![0x5Au8; len];
            let before = locks(&v);
            if in_place {
                v.write_at_mut(&mut data, offset, false).expect(what);
            } else {
                v.write_at(&data, offset, false).expect(what);
            }
            assert_eq!(locks(&v) - before, 1, "{what}");
        }
    }

    /// Issue 14 B11: a read that found a chunk allocated, then a trim of that chunk
    /// (bit cleared, map flushed, hole punched), then the read's pread of the chunk: the
    /// read must return the old data or zeros, never the hole decrypted (garbage). The
    /// read hook stops the read right between its map check and its file read until the
    /// trim is done (events, no sleeps).
    #[test]
    fn a_read_racing_a_trim_of_its_chunk_returns_old_data_or_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 4 * 65536, 4096);
        let v = Arc::new(open_discard(&path, &h, &dek));
        let old = vec![0xabu8; 65536];
        for round in 0..4u64 {
            let chunk = round % 2; // the chunk written, read and trimmed
            let at = chunk * 65536;
            v.write_at(&old, at, false).expect("write");
            v.flush().expect("flush");
            let allocated_blocks = file_blocks(&path);
            let (checked_tx, checked_rx) = std::sync::mpsc::channel::<()>();
            let (trimmed_tx, trimmed_rx) = std::sync::mpsc::channel::<()>();
            *lock_ignoring_poison(&v.read_hook) = Some(Box::new(move || {
                checked_tx.send(()).expect("signal");
                // The trim finishes while this read is between its map check and pread.
                trimmed_rx.recv().expect("trim done");
            }));
            let reader = {
                let v = Arc::clone(&v);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    v.read_at(&mut buf, at).expect("read");
                    buf
                })
            };
            checked_rx.recv().expect("the read checked the map");
            v.discard(at, 65536).expect("trim");
            assert!(
                file_blocks(&path) < allocated_blocks,
                "round {round}: the trim punched the chunk (else this test shows nothing)"
            );
            trimmed_tx.send(()).expect("release the read");
            let got = reader.join().expect("reader");
            for (i, sector) in got.chunks(4096).enumerate() {
                assert!(
                    sector.iter().all(|&b| b == 0xab) || sector.iter().all(|&b| b == 0),
                    "round {round}, sector {i}: neither the old data nor zeros (the punched hole decrypted)"
                );
            }
        }
    }

    #[test]
    fn thin_zeroes_and_trim_unallocate_whole_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 4 * 65536 + 8192; // short last chunk
        let (path, h, dek) = new_volume(dir.path(), size, 512);
        let v = open_discard(&path, &h, &dek);
        let data = vec![0x77u8; size as usize];
        v.write_at(&data, 0, false).expect("write");
        assert_eq!(v.allocated_bytes(), size);
        v.flush().expect("flush");
        let full = file_blocks(&path);
        // Zero chunk 1 wholly and half of chunk 2: chunk 1 unallocated, chunk 2 keeps data.
        v.write_zeroes(65536, 65536 + 32768, false).expect("zeroes");
        assert_eq!(v.allocated_bytes(), size - 65536);
        assert!(
            file_blocks(&path) <= full - 65536,
            "whole chunk punched with discard on"
        );
        // Trim the short last chunk (to the end of the volume): unallocated.
        v.discard(4 * 65536, 8192).expect("trim");
        assert_eq!(v.allocated_bytes(), size - 65536 - 8192);
        // NO_HOLE zeroing of chunk 0 clears the bit but keeps the space.
        let before = file_blocks(&path);
        v.write_zeroes_no_hole(0, 65536, false).expect("no-hole");
        assert_eq!(file_blocks(&path), before, "NO_HOLE frees nothing");
        let mut want = data.clone();
        want[..65536].fill(0);
        want[65536..65536 * 2 + 32768].fill(0);
        want[4 * 65536..].fill(0);
        let mut back = vec![0u8; size as usize];
        v.read_at(&mut back, 0).expect("read");
        assert_eq!(back, want);
        v.flush().expect("flush");
        drop(v);
        let v = open_rw(&path, &h, &dek);
        v.read_at(&mut back, 0).expect("read");
        assert_eq!(back, want, "after reopen");
        // Re-allocating a previously used chunk writes zeros around new data, not the
        // stale ciphertext that may still be in the file.
        v.write_at(b"x", 10, false).expect("write");
        v.read_at(&mut back[..65536], 0).expect("read");
        assert_eq!(back[10], b'x');
        assert!(back[..10].iter().chain(&back[11..65536]).all(|&b| b == 0));
    }

    #[test]
    fn preallocate_fills_everything_with_ciphertext() {
        let (_d, path, h, _dek, v) = setup(256 * 1024, 4096);
        let calls = std::sync::atomic::AtomicU64::new(0);
        v.preallocate(&|done| calls.store(done, std::sync::atomic::Ordering::Relaxed))
            .expect("preallocate");
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 256 * 1024);
        assert_eq!(v.allocated_bytes(), 256 * 1024);
        assert_eq!(v.extents(0, 256 * 1024).expect("ext").len(), 1);
        let mut back = vec![1u8; 256 * 1024];
        v.read_at(&mut back, 0).expect("read");
        assert!(back.iter().all(|&b| b == 0));
        let file = std::fs::read(&path).expect("read");
        let area = &file[h.data_offset as usize..];
        // No all-zero 512-byte block anywhere in the data area.
        assert!(area.chunks(512).all(|c| c.iter().any(|&b| b != 0)));
    }

    #[test]
    fn damaged_map_pages_are_reported_and_repaired() {
        let (_d, path, h, dek, v) = setup(1 << 20, 4096);
        v.write_at(&[9u8; 4096], 0, true).expect("write");
        drop(v);
        let layout = h.allocation_map.expect("thin");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.write_all_at(&[0xEE; 64], layout.copy_offsets[0] + 500)
            .expect("damage");
        f.write_all_at(&[0xEE; 64], layout.copy_offsets[1] + 500)
            .expect("damage");
        drop(f);
        let sum = crate::volume::map_summary(&path, &h)
            .expect("summary")
            .expect("thin");
        assert_eq!(sum.health.pages_damaged, vec![0]);
        // Opening read-write treats the page as allocated (nothing lost) and repairs it.
        let v = open_rw(&path, &h, &dek);
        let mut back = vec![0u8; 4096];
        v.read_at(&mut back, 0).expect("read");
        assert_eq!(back, vec![9u8; 4096], "written data still readable");
        drop(v);
        let sum = crate::volume::map_summary(&path, &h)
            .expect("summary")
            .expect("thin");
        assert!(sum.health.is_healthy(), "{:?}", sum.health);
        assert_eq!(sum.allocated_chunks, 16, "conservatively all allocated");
    }

    #[test]
    fn aligned_write_at_mut_clobbers_and_persists() {
        let (_d, path, h, dek, v) = setup(64 * 1024, 512);
        let orig: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        // The first write to a chunk allocates it (whole-chunk path, buffer untouched);
        // the next aligned write takes the in-place path.
        let mut buf = orig.clone();
        v.write_at_mut(&mut buf, 1024, false).expect("write");
        assert_eq!(buf, orig, "allocating write leaves the buffer alone");
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
        Trim { offset: u64, len: u64 },
        Read { offset: u64, len: usize },
        Flush,
        Reopen,
    }

    /// Three whole 64 KiB chunks and a short one.
    const MODEL_SIZE: u64 = 3 * 65536 + 12 * 1024;

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..MODEL_SIZE).prop_flat_map(|o| (Just(o), 0..=(MODEL_SIZE - o).min(150_000)));
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
            range
                .clone()
                .prop_map(|(offset, len)| Op::Trim { offset, len }),
            range.prop_map(|(offset, len)| Op::Read {
                offset,
                len: len as usize
            }),
            Just(Op::Flush),
            Just(Op::Reopen),
        ]
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Runs `ops` against a volume and an in-memory model. `thin`: a volume with an
    /// allocation map (else a legacy one, zeroed first). `discard`: opened with
    /// discard (TRIM zeroes on a thin volume; legacy volumes are run without it, since
    /// a legacy TRIM leaves garbage the model cannot predict).
    fn run_model(ss: u32, thin: bool, discard: bool, ops: &[Op]) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = if thin {
            new_volume(dir.path(), MODEL_SIZE, ss)
        } else {
            new_legacy_volume(dir.path(), MODEL_SIZE, ss)
        };
        let open = || {
            let dek = Dek::from_slice(dek.expose()).expect("dek");
            Volume::open(
                &path,
                &h,
                dek,
                OpenOptions {
                    read_only: false,
                    discard,
                },
            )
            .expect("open")
        };
        let fail = |e: VolumeError| TestCaseError::fail(e.to_string());
        let mut v = open();
        let mut model = vec![0u8; MODEL_SIZE as usize];
        if !thin {
            v.write_zeroes(0, MODEL_SIZE, false).map_err(fail)?;
        }
        for op in ops {
            match *op {
                Op::Write { offset, len, seed } => {
                    let data = pattern(len, seed);
                    v.write_at(&data, offset, false).map_err(fail)?;
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::WriteMut { offset, len, seed } => {
                    let data = pattern(len, seed);
                    let mut buf = data.clone();
                    v.write_at_mut(&mut buf, offset, false).map_err(fail)?;
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::Zero { offset, len } => {
                    v.write_zeroes(offset, len, false).map_err(fail)?;
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Op::Trim { offset, len } => {
                    v.discard(offset, len).map_err(fail)?;
                    if thin && discard {
                        model[offset as usize..(offset + len) as usize].fill(0);
                    }
                }
                Op::Read { offset, len } => {
                    let mut buf = vec![0u8; len];
                    v.read_at(&mut buf, offset).map_err(fail)?;
                    prop_assert_eq!(&buf[..], &model[offset as usize..offset as usize + len]);
                }
                Op::Flush => v.flush().map_err(fail)?,
                Op::Reopen => {
                    v.flush().map_err(fail)?;
                    drop(v);
                    v = open();
                }
            }
            if thin {
                // The map never claims "unallocated" where the model holds data.
                let ext = v.extents(0, MODEL_SIZE).map_err(fail)?;
                for e in ext.iter().filter(|e| !e.allocated) {
                    let r = &model[e.offset as usize..(e.offset + e.len) as usize];
                    prop_assert!(r.iter().all(|&b| b == 0), "hole over data at {}", e.offset);
                }
            }
        }
        let mut all = vec![0u8; MODEL_SIZE as usize];
        v.read_at(&mut all, 0).map_err(fail)?;
        prop_assert!(all == model, "final image differs from the model");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matches_in_memory_model_512(ops in proptest::collection::vec(op(), 1..12), discard in any::<bool>()) {
            run_model(512, true, discard, &ops)?;
        }
        #[test]
        fn matches_in_memory_model_4096(ops in proptest::collection::vec(op(), 1..12), discard in any::<bool>()) {
            run_model(4096, true, discard, &ops)?;
        }
        #[test]
        fn legacy_matches_in_memory_model(ops in proptest::collection::vec(op(), 1..12), ss in prop_oneof![Just(512u32), Just(4096u32)]) {
            run_model(ss, false, false, &ops)?;
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
