//! One open RBD image: size, resize, positioned I/O through `rbd_aio_*` completions
//! (blocking and async forms), the exclusive lock that fences a served image, and the
//! takeover that breaks a dead owner's lock and blocklists it.

use std::ffi::{c_char, CStr};
use std::ptr;

use super::cluster::{cstring, Cluster, Ioctx};
use super::completion::{run_async, run_blocking};
use super::error::RbdError;
use super::ffi;
use super::spec::ImageSpec;

/// An open image. Every method may be called from many threads at once.
pub struct RbdImage {
    raw: ffi::RbdImageT,
    /// Dropped after `raw` is closed (Drop closes the image first).
    io: Ioctx,
    name: String,
}

// SAFETY: librbd's image handle is internally synchronised: concurrent aio submissions,
// size queries and lock calls from several threads are supported; the handle is closed
// only in Drop, when no other reference exists.
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

impl std::fmt::Debug for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdImage")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open and closed once; rbd_close waits for in-flight
        // operations (none remain: every call here waits for its completion or owns its
        // buffer in the completion).
        let r = unsafe { ffi::rbd_close(self.raw) };
        if r < 0 {
            tracing::warn!(image = %self.name, errno = -r, "closing the RBD image failed");
        }
    }
}

impl RbdImage {
    /// Creates an image of `size` bytes with the pool's default features (exclusive-lock
    /// included) and 4 MiB objects.
    pub fn create(cluster: &Cluster, spec: &ImageSpec, size: u64) -> Result<(), RbdError> {
        let io = Ioctx::new(cluster, &spec.pool, spec.namespace.as_deref())?;
        let name = cstring(spec.image.as_bytes(), "the image name")?;
        let mut order: std::ffi::c_int = 0;
        // SAFETY: a valid ioctx, a NUL-terminated name, a valid out-pointer for the order
        // (0: the default).
        let r = unsafe { ffi::rbd_create(io.raw(), name.as_ptr(), size, &mut order) };
        check(&io, "creating the image", &spec.to_string(), r.into())
    }

    /// Removes an image (it must not be open anywhere).
    pub fn remove(cluster: &Cluster, spec: &ImageSpec) -> Result<(), RbdError> {
        let io = Ioctx::new(cluster, &spec.pool, spec.namespace.as_deref())?;
        let name = cstring(spec.image.as_bytes(), "the image name")?;
        // SAFETY: a valid ioctx and a NUL-terminated name.
        let r = unsafe { ffi::rbd_remove(io.raw(), name.as_ptr()) };
        check(&io, "removing the image", &spec.to_string(), r.into())
    }

    /// Opens an existing image for reading and writing (no lock taken yet).
    pub fn open(cluster: &Cluster, spec: &ImageSpec) -> Result<RbdImage, RbdError> {
        let io = Ioctx::new(cluster, &spec.pool, spec.namespace.as_deref())?;
        let name = cstring(spec.image.as_bytes(), "the image name")?;
        let mut raw: ffi::RbdImageT = ptr::null_mut();
        // SAFETY: a valid ioctx, a NUL-terminated name, a valid out-pointer, no snapshot.
        let r = unsafe { ffi::rbd_open(io.raw(), name.as_ptr(), &mut raw, ptr::null()) };
        if r == -libc::ENOENT {
            return Err(RbdError::NotFound {
                image: spec.to_string(),
            });
        }
        check(&io, "opening the image", &spec.to_string(), r.into())?;
        Ok(RbdImage {
            raw,
            io,
            name: spec.to_string(),
        })
    }

    /// `rbd:POOL/IMAGE` of this image.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The image's size in bytes.
    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let r = unsafe { ffi::rbd_get_size(self.raw, &mut size) };
        self.check("reading the size", r.into())?;
        Ok(size)
    }

    /// Grows (or shrinks) the image to `size` bytes.
    pub fn resize(&self, size: u64) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let r = unsafe { ffi::rbd_resize(self.raw, size) };
        self.check("resizing", r.into())
    }

    /// Fills `buf` from `offset`; bytes past the image's end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), RbdError> {
        let want = self.readable(buf.len(), offset)?;
        if want > 0 {
            let ptr = buf.as_mut_ptr().cast::<c_char>();
            // SAFETY: `buf[..want]` is valid for writes and borrowed until run_blocking
            // returns, which is after librbd completed the read.
            let r = unsafe { run_blocking(|c| ffi::rbd_aio_read(self.raw, offset, want, ptr, c)) };
            // The part inside the image was read in full (librbd reads holes as zeros).
            self.check("reading", r)?;
        }
        buf[want..].fill(0);
        Ok(())
    }

    /// Writes all of `buf` at `offset` (inside the image: it does not grow by writing).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), RbdError> {
        self.inside("writing", offset, buf.len() as u64)?;
        let ptr = buf.as_ptr().cast::<c_char>();
        let len = buf.len();
        // SAFETY: `buf` is valid for reads and borrowed until librbd completed the write.
        let r = unsafe { run_blocking(|c| ffi::rbd_aio_write(self.raw, offset, len, ptr, c)) };
        self.check("writing", r)
    }

    /// Discards `[offset, offset + len)`: advisory, as NBD's trim. librbd frees whole
    /// discard granules (`rbd_discard_granularity_bytes`, 64 KiB) and skips the partial
    /// ones, so only whole granules are sure to read as zeros after; use
    /// [`write_zeroes`](Self::write_zeroes) where zeros are needed.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), RbdError> {
        self.inside("discarding", offset, len)?;
        // SAFETY: no buffer; an open image.
        let r = unsafe { run_blocking(|c| ffi::rbd_aio_discard(self.raw, offset, len, c)) };
        self.check("discarding", r)
    }

    /// Makes `[offset, offset + len)` read as zeros, freeing whole objects' extents where
    /// it can (thin: no `THICK_PROVISION` flag).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RbdError> {
        self.inside("zeroing", offset, len)?;
        let len = usize::try_from(len).map_err(|_| RbdError::PastEnd {
            op: "zeroing",
            target: self.name.clone(),
            end: offset.saturating_add(len),
            size: usize::MAX as u64,
        })?;
        // SAFETY: no buffer; an open image; flags 0 (thin zeroing, no op flags).
        let r =
            unsafe { run_blocking(|c| ffi::rbd_aio_write_zeroes(self.raw, offset, len, c, 0, 0)) };
        self.check("zeroing", r)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<(), RbdError> {
        // SAFETY: no buffer; an open image.
        let r = unsafe { run_blocking(|c| ffi::rbd_aio_flush(self.raw, c)) };
        self.check("flushing", r)
    }

    /// Reads `len` bytes at `offset` without blocking a thread (the buffer is owned by the
    /// completion until librbd is done with it).
    pub async fn read_owned(&self, offset: u64, len: usize) -> Result<Vec<u8>, RbdError> {
        let want = self.readable(len, offset)?;
        let mut buf = vec![0u8; len];
        if want == 0 {
            return Ok(buf);
        }
        let ptr = buf.as_mut_ptr().cast::<c_char>();
        // SAFETY: `ptr` points into `buf`'s heap storage, which moves into the completion
        // (not reallocated) and lives until librbd completed the read.
        let fut = unsafe { run_async(buf, |c| ffi::rbd_aio_read(self.raw, offset, want, ptr, c)) };
        let (r, buf) = fut.await;
        self.check("reading", r)?;
        // Only a failed submission loses the buffer, and that returned an error above.
        Ok(buf.unwrap_or_else(|| vec![0u8; len]))
    }

    /// Writes `buf` at `offset` without blocking a thread; gives the buffer back.
    pub async fn write_owned(&self, buf: Vec<u8>, offset: u64) -> Result<Vec<u8>, RbdError> {
        self.inside("writing", offset, buf.len() as u64)?;
        let ptr = buf.as_ptr().cast::<c_char>();
        let len = buf.len();
        // SAFETY: as in read_owned: the buffer is owned by the completion until done.
        let fut = unsafe { run_async(buf, |c| ffi::rbd_aio_write(self.raw, offset, len, ptr, c)) };
        let (r, buf) = fut.await;
        self.check("writing", r)?;
        Ok(buf.unwrap_or_default())
    }

    /// [`flush`](Self::flush) without blocking a thread.
    pub async fn flush_async(&self) -> Result<(), RbdError> {
        // SAFETY: no buffer; an open image.
        let fut = unsafe { run_async((), |c| ffi::rbd_aio_flush(self.raw, c)) };
        self.check("flushing", fut.await.0)
    }

    /// [`discard`](Self::discard) without blocking a thread.
    pub async fn discard_async(&self, offset: u64, len: u64) -> Result<(), RbdError> {
        self.inside("discarding", offset, len)?;
        // SAFETY: no buffer; an open image.
        let fut = unsafe { run_async((), |c| ffi::rbd_aio_discard(self.raw, offset, len, c)) };
        self.check("discarding", fut.await.0)
    }

    /// How many of `len` bytes at `offset` lie inside the image.
    fn readable(&self, len: usize, offset: u64) -> Result<usize, RbdError> {
        let size = self.size()?;
        let inside = size.saturating_sub(offset);
        Ok(usize::try_from(inside).map_or(len, |i| i.min(len)))
    }

    /// Refuses an operation past the image's end (librbd would silently clip it).
    fn inside(&self, op: &'static str, offset: u64, len: u64) -> Result<(), RbdError> {
        let size = self.size()?;
        let end = offset.saturating_add(len);
        if end > size {
            return Err(RbdError::PastEnd {
                op,
                target: self.name.clone(),
                end,
                size,
            });
        }
        Ok(())
    }

    pub(super) fn check(&self, op: &'static str, r: i64) -> Result<(), RbdError> {
        check(&self.io, op, &self.name, r)
    }

    pub(super) fn raw(&self) -> ffi::RbdImageT {
        self.raw
    }
}

fn check(io: &Ioctx, op: &'static str, target: &str, r: i64) -> Result<(), RbdError> {
    if r < 0 {
        let bound = io.cluster().timeouts().osd_op.as_secs();
        return Err(RbdError::from_ret(op, target, r, bound));
    }
    Ok(())
}

/// Copies librbd's owner strings and frees them.
pub(super) fn take_owner_strings(owners: &mut [*mut c_char], count: usize) -> Vec<String> {
    let count = count.min(owners.len());
    let names = owners[..count]
        .iter()
        .filter(|p| !p.is_null())
        // SAFETY: non-null entries are NUL-terminated strings librbd strdup'ed for us.
        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect();
    // SAFETY: the first `count` entries were filled by rbd_lock_get_owners and are freed
    // once, here.
    unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count) };
    names
}
