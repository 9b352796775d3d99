//! The write paths of a volume: writes of any alignment (read-modify-write of partial
//! sectors under the range lock), in-place aligned writes, write-zeroes, discard and
//! preallocation. On a thin volume, a never-written chunk is written whole and only
//! then marked allocated, under one range lock over its whole chunks.

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use super::alloc::AllocMap;
use super::sectors::{self, Span};
use super::{Volume, VolumeError};

/// Largest buffer one write step encrypts and writes at a time (also the bound on
/// the per-thread scratch buffer).
pub const WRITE_CHUNK: usize = 1 << 20;

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
        self.zero_range(offset, len, fua, self.geo.discard)
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
            end: (c1 * cs).min(self.size()) / ss,
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
            let (a, b) = (c * cs, ((c + 1) * cs).min(self.size()));
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
        // Cannot overflow: it lies below data_offset + size <= i64::MAX (checked in open).
        let start = self.geo.data_offset + offset;
        self.engine
            .punch_hole(start, len)
            .map_err(|e| self.io_err(e))
    }

    /// Fills the whole data area with encrypted zeros and marks every chunk allocated
    /// (`cryptvol create --preallocate`): afterwards the file shows no sign of which
    /// blocks are ever written. `progress` is called with the bytes done so far.
    pub fn preallocate(&self, progress: &dyn Fn(u64)) -> Result<(), VolumeError> {
        self.check_writable(0, self.size())?;
        let Some(map) = &self.map else {
            // Without a map, encrypted zeros over everything is the same thing.
            let mut done = 0;
            while done < self.size() {
                let n = (self.size() - done).min(WRITE_CHUNK as u64);
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
            progress((c * cs).min(self.size()));
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
        if !self.geo.discard {
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
        let stop = (b * cs).min(self.size());
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

#[cfg(test)]
mod tests;
