//! The volume and its core I/O: the [`Volume`] type with one field per concern, the
//! read path (lock-free, with a seqlock against hole punches), extents, flush, and the
//! sector-level helpers every other part uses. Synchronous and thread-safe: the server
//! calls it from blocking worker threads.
//!
//! Data area: sector `i` (counted from `data_offset`) is stored at file offset
//! `data_offset + i * sector_size`, encrypted with AES-256-XTS under tweak `i`
//! (128-bit little endian), i.e. dm-crypt `aes-xts-plain64` with `iv_large_sectors`.
//!
//! The other concerns live beside it: opening (`open.rs`), the write paths
//! (`write.rs`), the cipher engines (`cipher.rs`), the file I/O engine (`engine.rs`),
//! re-encryption progress (`reencrypt.rs`), changed-block tracking (`tracking.rs`),
//! copy-before-write (`cow.rs`) and snapshot views (`snapshot_view.rs`).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use super::alloc::{AllocMap, MapHealth};
use super::cipher::Cipher;
use super::cow::CowState;
use super::engine::FileEngine;
use super::rangelock::{RangeGuard, RangeLocks};
use super::reencrypt::ReencryptState;
use super::sectors::{self, Span};
use super::tracking::Tracking;
use super::VolumeError;

/// An open, unlocked volume. `Send + Sync`: share it behind an `Arc` and call its
/// `&self` methods from any number of threads.
pub struct Volume {
    /// What the volume is and how it was opened.
    pub(super) geo: Geometry,
    /// The backing file's I/O engine: every read, write, sync and punch of the data
    /// area, and of the allocation map's pages and the file's length.
    pub(super) engine: Box<dyn FileEngine>,
    /// The backing file itself, for what does not go through the engine: the in-use
    /// lock (held while this is open) and the file's type (a grow). `None` for a volume
    /// on an RBD image (the engine holds the image and its exclusive lock).
    pub(super) file: Option<Arc<File>>,
    /// The cipher engines (two while a re-encryption is in progress).
    pub(super) cipher: Cipher,
    pub(super) locks: RangeLocks,
    /// The allocation map (thin volumes); `None` for volumes made before it existed.
    pub(super) map: Option<AllocMap>,
    /// Hole punches of trimmed chunks, as a sequence count: odd while one is under way.
    /// Reads take no lock, so a read that found a chunk allocated just before a trim
    /// cleared its bit could read the hole punched next (zeros, which decrypt to
    /// garbage); a read that overlapped a punch is redone under the range lock, which
    /// the trim holds while clearing and punching (see [`Volume::read_at`]).
    pub(super) punches: AtomicU64,
    /// Re-encryption progress: whether one is under way, the keys, a broken zone.
    pub(super) reenc: ReencryptState,
    /// Changed-chunk tracking (served volumes, see `tracking.rs`).
    pub(super) tracking: OnceLock<Tracking>,
    /// Copy-before-write for an active snapshot view (see `cow.rs`).
    pub(super) cow: CowState,
    /// Test hook: runs once, in a read, between the map check and the file read.
    #[cfg(test)]
    pub(super) read_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

/// What a volume is (from its header) and how it was opened.
#[derive(Debug)]
pub(super) struct Geometry {
    /// The backing file's path, as given to `open`.
    pub path: String,
    /// The data area's size: atomic because an online grow (`resize_online.rs`) changes
    /// it while the volume is served; every request reads it once per range check.
    pub size: AtomicU64,
    pub sector_size: u32,
    /// Byte offset of the data area in the backing file.
    pub data_offset: u64,
    pub uuid: uuid::Uuid,
    pub read_only: bool,
    /// Discards punch holes (opened with `discard` and writable).
    pub discard: bool,
}

pub(super) fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("path", &self.geo.path)
            .field("uuid", &self.geo.uuid)
            .field("size", &self.size())
            .field("sector_size", &self.geo.sector_size)
            .field("data_offset", &self.geo.data_offset)
            .field("read_only", &self.geo.read_only)
            .field("discard", &self.geo.discard)
            .finish_non_exhaustive()
    }
}

impl Volume {
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
            Some(m) => m.allocated(self.size()).1,
            None => self.size(),
        }
    }

    /// What opening found about the map (`None` without a map).
    pub fn map_health(&self) -> Option<&MapHealth> {
        self.map.as_ref().map(AllocMap::health)
    }

    /// The data area's size now (an online grow may raise it at any time; it never
    /// shrinks while the volume is open).
    pub fn size(&self) -> u64 {
        self.geo.size.load(Ordering::Acquire)
    }

    pub fn sector_size(&self) -> u32 {
        self.geo.sector_size
    }

    pub fn read_only(&self) -> bool {
        self.geo.read_only
    }

    pub fn uuid(&self) -> uuid::Uuid {
        self.geo.uuid
    }

    /// Byte offset of the data area in the backing file.
    pub fn data_offset(&self) -> u64 {
        self.geo.data_offset
    }

    /// Whether discards punch holes (opened with `discard` and writable).
    pub fn discard_enabled(&self) -> bool {
        self.geo.discard
    }

    /// The backing file's path, as given to `open`.
    pub fn path(&self) -> &str {
        &self.geo.path
    }

    /// The name of the engine driving the backing file ("threads", "io_uring").
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub(super) fn ss(&self) -> u64 {
        u64::from(self.geo.sector_size)
    }

    pub(super) fn file_offset(&self, sector: u64) -> u64 {
        // Cannot overflow: sector * ss < size and data_offset + size <= i64::MAX (checked in open).
        self.geo.data_offset + sector * self.ss()
    }

    /// Takes the range lock for a write over `span` and runs the pre-write hooks
    /// (changed-chunk tracking, snapshot copy-before-write).
    pub(super) fn lock_w(&self, span: Span) -> Result<RangeGuard<'_>, VolumeError> {
        let g = self.locks.lock(span);
        if self.reenc.active.load(Ordering::Acquire) {
            self.check_broken_zone(span)?;
        }
        self.before_write(span)?;
        Ok(g)
    }

    /// An I/O error on the backing file: out-of-space errors as [`VolumeError::NoSpace`].
    pub(super) fn io_err(&self, source: std::io::Error) -> VolumeError {
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => VolumeError::NoSpace(source),
            _ => VolumeError::Io {
                path: self.geo.path.clone(),
                source,
            },
        }
    }

    /// Reads whole sectors starting at `first` into `buf` (ciphertext); bytes beyond
    /// the end of a (sparse or shortened) file read as zeros.
    pub(super) fn pread_sectors(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.engine
            .read_exact_at(buf, self.file_offset(first))
            .map_err(|e| self.io_err(e))
    }

    /// Writes whole sectors of ciphertext starting at `first`.
    pub(super) fn pwrite_sectors(&self, buf: &[u8], first: u64) -> Result<(), VolumeError> {
        self.engine
            .write_all_at(buf, self.file_offset(first))
            .map_err(|e| self.io_err(e))
    }

    /// Reads and decrypts whole sectors.
    pub(super) fn read_plain(&self, buf: &mut [u8], first: u64) -> Result<(), VolumeError> {
        self.pread_sectors(buf, first)?;
        self.decrypt(buf, first)
    }

    pub(super) fn sync_data(&self) -> Result<(), VolumeError> {
        self.engine.sync_data().map_err(|e| self.io_err(e))
    }

    /// Reads and decrypts `buf.len()` bytes at `offset` (any alignment).
    ///
    /// Reads take no lock: a read overlapping a concurrent write may see either
    /// version of each sector (or, on filesystems that do not make page-sized writes
    /// atomic for readers, a mix), as with any block device. A read overlapping a trim
    /// of a thin chunk sees the old data or zeros, never the punched hole: a read during
    /// which a hole was punched is redone under the range lock.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        sectors::check_range(offset, buf.len() as u64, self.size())?;
        // While re-encrypting, a zone being converted is range-locked by the step:
        // wait for it rather than decrypt a half-converted zone with the wrong key.
        let reencrypting = self.reenc.active.load(Ordering::Acquire);
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
    /// file. Takes no lock: the caller holds the range lock when a punch may be under
    /// way (a snapshot view's chunk read does).
    pub(super) fn read_mapped(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
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

    /// The allocation state of `[offset, offset + len)` as consecutive extents
    /// covering exactly that range (runs of equal state merged, chunk-granular).
    /// Without an allocation map everything is allocated.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<super::Extent>, VolumeError> {
        sectors::check_range(offset, len, self.size())?;
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
        if self.geo.read_only || !self.map_dirty() {
            return Ok(());
        }
        self.flush()
    }

    /// Makes every completed write durable (fdatasync), then the allocation map that
    /// points to it: an acknowledged flush covers both.
    pub fn flush(&self) -> Result<(), VolumeError> {
        match &self.map {
            Some(map) if !self.geo.read_only => map
                .persist(&*self.engine, &|| self.engine.sync_data())
                .map_err(|e| self.io_err(e)),
            _ => self.sync_data(),
        }
    }

    pub(super) fn check_writable(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        if self.geo.read_only {
            return Err(VolumeError::ReadOnly);
        }
        sectors::check_range(offset, len, self.size())
    }
}

impl Drop for Volume {
    /// Persists the allocation map of writes that were never flushed (best effort: an
    /// error is logged; unflushed writes carry no durability promise anyway), then marks
    /// the changed-chunk tracking as cleanly closed.
    fn drop(&mut self) {
        if self.geo.read_only {
            return;
        }
        if let Err(e) = self.flush() {
            tracing::warn!(path = %self.geo.path, "final flush of the volume failed: {e}");
            return; // tracking stays "in use": the next snapshot reads everything
        }
        self.close_tracking();
    }
}

#[cfg(test)]
pub(super) mod test_support;
#[cfg(test)]
mod tests;
