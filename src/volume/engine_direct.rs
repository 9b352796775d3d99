//! The `O_DIRECT` variant of the file engines (`serve --direct`, config `direct = true`):
//! [`DirectFileEngine`] sends aligned reads and writes of the backing file through a
//! second descriptor opened with `O_DIRECT`, by the threads or the io_uring engine.
//!
//! Why: buffered writes to one file are serialised on its inode lock; `O_DIRECT`
//! writes that do not extend the file take it shared on ext4 and xfs, so the server's
//! threads write in parallel (docs/performance.md, "O_DIRECT backing file").
//!
//! Alignment ([`ALIGN`], 4096 bytes, a multiple of every logical block size in use):
//! - A range whose offset or length is not a multiple of [`ALIGN`] (header copies,
//!   allocation-map pages of odd sizes, 512-byte sectors of a 512-byte volume) goes
//!   through the ordinary descriptor, buffered, whole. No read-modify-write of a block is
//!   ever done here, so two writers of neighbouring 512-byte sectors cannot undo each
//!   other, and a write never extends the file past its end. Linux keeps the two paths
//!   coherent: a direct read or write first writes back and drops the cached pages of
//!   its range.
//! - An aligned range in a buffer whose address is not aligned (the volume's buffers are
//!   plain `Vec`s) is copied through a per-thread aligned bounce buffer of at most
//!   [`BOUNCE_MAX`] bytes, in pieces of that size. Cost: one memcpy of the payload, and
//!   up to [`BOUNCE_MAX`] + [`ALIGN`] bytes of memory per thread that did direct I/O.
//! - Size, truncation and `fsync` of metadata go through the ordinary descriptor;
//!   fdatasync and hole punching through the direct one (both act on the inode).
//!
//! A filesystem that refuses `O_DIRECT` (tmpfs on older kernels, some FUSE
//! filesystems return EINVAL; tmpfs on this machine's 6.18 kernel accepts it) makes the open fail with an error naming `--direct` and
//! the filesystem: no silent fallback, since the option was asked for.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::engine::{FileEngine, StdFileEngine};
use super::engine_select::{cached_probe, decide, EngineChoice, EngineKind};
use super::engine_uring::UringFileEngine;

/// The alignment of direct I/O: offsets, lengths and buffer addresses.
pub(crate) const ALIGN: usize = 4096;

/// The largest piece copied through the bounce buffer at once.
pub(crate) const BOUNCE_MAX: usize = 1 << 20;

thread_local! {
    /// This thread's bounce buffer (over-allocated by [`ALIGN`] to hold an aligned
    /// window of up to [`BOUNCE_MAX`] bytes).
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Positioned I/O with `O_DIRECT` for aligned ranges (see the module docs).
#[derive(Debug)]
pub(crate) struct DirectFileEngine {
    /// The engine over the `O_DIRECT` descriptor.
    direct: Box<dyn FileEngine>,
    /// The engine over the ordinary descriptor.
    buffered: Box<dyn FileEngine>,
    name: &'static str,
}

impl DirectFileEngine {
    /// The engine of `kind` over `direct` (opened with `O_DIRECT`) and `buffered` (the
    /// same file, opened without it).
    pub(crate) fn new(kind: EngineKind, direct: Arc<File>, buffered: Arc<File>) -> Self {
        let (direct, name): (Box<dyn FileEngine>, _) = match kind {
            EngineKind::Threads => (Box::new(StdFileEngine::new(direct)), "threads+direct"),
            EngineKind::Uring => (Box::new(UringFileEngine::new(direct)), "io_uring+direct"),
        };
        Self {
            direct,
            buffered: Box::new(StdFileEngine::new(buffered)),
            name,
        }
    }
}

fn aligned_range(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

fn aligned_addr(p: *const u8) -> bool {
    (p as usize).is_multiple_of(ALIGN)
}

/// Runs `f` on an aligned scratch slice of `len` (≤ [`BOUNCE_MAX`]) bytes: this
/// thread's bounce buffer, or a fresh one if it is in use.
fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    fn window(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
        if v.len() < len + ALIGN {
            *v = vec![0u8; len + ALIGN];
        }
        let start = v.as_ptr().align_offset(ALIGN).min(ALIGN);
        &mut v[start..start + len]
    }
    BOUNCE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(window(&mut v, len)),
        Err(_) => f(window(&mut Vec::new(), len)),
    })
}

impl DirectFileEngine {
    /// One direct read into `buf` (aligned range): bytes read, 0 at the end.
    fn read_piece(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if aligned_addr(buf.as_ptr()) {
            return self.direct.read_some_at(buf, offset);
        }
        let len = buf.len().min(BOUNCE_MAX);
        with_bounce(len, |b| {
            let n = self.direct.read_some_at(b, offset)?;
            buf[..n].copy_from_slice(&b[..n]);
            Ok(n)
        })
    }
}

impl FileEngine for DirectFileEngine {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if !aligned_range(offset, buf.len()) {
            return self.buffered.read_exact_at(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset
                .checked_add(done as u64)
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFBIG))?;
            let n = self.read_piece(&mut buf[done..], at)?;
            done += n;
            // The end of the file (maybe inside a block): the rest reads as zeros, and
            // no read is issued at an unaligned offset.
            if n == 0 || n % ALIGN != 0 {
                buf[done..].fill(0);
                break;
            }
        }
        Ok(())
    }

    fn read_some_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if !aligned_range(offset, buf.len()) {
            return self.buffered.read_some_at(buf, offset);
        }
        self.read_piece(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if !aligned_range(offset, buf.len()) {
            return self.buffered.write_all_at(buf, offset);
        }
        if aligned_addr(buf.as_ptr()) {
            return self.direct.write_all_at(buf, offset);
        }
        let mut at = offset;
        for piece in buf.chunks(BOUNCE_MAX) {
            with_bounce(piece.len(), |b| {
                b.copy_from_slice(piece);
                self.direct.write_all_at(b, at)
            })?;
            at = at
                .checked_add(piece.len() as u64)
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        }
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.direct.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.direct.punch_hole(offset, len)
    }

    fn len(&self) -> std::io::Result<u64> {
        self.buffered.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.buffered.set_len(len)
    }

    fn sync_all(&self) -> std::io::Result<()> {
        self.buffered.sync_all()
    }

    fn name(&self) -> &'static str {
        self.name
    }
}

/// Opens `path` again with `O_DIRECT` (read-write unless `read_only`) and checks it is
/// the same file as `file`. A filesystem refusing `O_DIRECT` is an error naming it.
pub(crate) fn open_direct(path: &Path, file: &File, read_only: bool) -> Result<File, String> {
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| open_error(&e, &filesystem_name(file)))?;
    let (a, b) = (
        file.metadata().map_err(|e| e.to_string())?,
        direct.metadata().map_err(|e| e.to_string())?,
    );
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err("the file was replaced while it was being opened with O_DIRECT".into());
    }
    Ok(direct)
}

/// The error of a failed `O_DIRECT` open of a file on filesystem `fs`.
fn open_error(e: &std::io::Error, fs: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EINVAL) => format!(
            "the backing file's filesystem ({fs}) refuses O_DIRECT (--direct / config `direct`): serve it without --direct or move the volume to ext4 or xfs"
        ),
        _ => format!("cannot open it with O_DIRECT (--direct): {e}"),
    }
}

/// The name of the filesystem `file` is on (its magic number when unknown).
pub(crate) fn filesystem_name(file: &File) -> String {
    let Ok(st) = nix::sys::statfs::fstatfs(file) else {
        return "unknown".into();
    };
    #[allow(clippy::unnecessary_cast)]
    let magic = st.filesystem_type().0 as u64;
    match magic {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6573_5546 => "fuse".into(),
        0x6969 => "nfs".into(),
        other => format!("type {other:#x}"),
    }
}

/// The `O_DIRECT` engine for the volume at `path` whose ordinary descriptor is `file`:
/// threads or io_uring as `choice` decides (see `engine_select`).
pub(crate) fn open_direct_engine(
    file: Arc<File>,
    choice: EngineChoice,
    read_only: bool,
    path: &Path,
) -> Result<Box<dyn FileEngine>, String> {
    let kind = decide(choice, cached_probe)?;
    let direct = open_direct(path, &file, read_only)?;
    tracing::debug!("{}: file engine {kind:?} with O_DIRECT", path.display());
    Ok(Box::new(DirectFileEngine::new(
        kind,
        Arc::new(direct),
        file,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_option_and_the_filesystem() {
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        let msg = open_error(&einval, "tmpfs");
        assert!(msg.contains("--direct") && msg.contains("(tmpfs)"), "{msg}");
        let other = open_error(&std::io::Error::from_raw_os_error(libc::EACCES), "ext4");
        assert!(
            other.contains("--direct") && !other.contains("refuses"),
            "{other}"
        );
    }

    #[test]
    fn filesystems_are_named() {
        let shm = File::open("/dev/shm").expect("/dev/shm");
        assert_eq!(filesystem_name(&shm), "tmpfs");
        let f = tempfile::NamedTempFile::new().expect("tmp");
        assert!(!filesystem_name(f.as_file()).is_empty());
    }

    #[test]
    fn a_replaced_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, [0u8; 4096]).expect("a");
        std::fs::write(&b, [0u8; 4096]).expect("b");
        let first = File::open(&a).expect("open a");
        std::fs::rename(&b, &a).expect("replace a");
        let err = open_direct(&a, &first, true).expect_err("another file");
        assert!(err.contains("replaced"), "{err}");
        let now = File::open(&a).expect("open a again");
        open_direct(&a, &now, true).expect("the same file opens with O_DIRECT here");
    }

    #[test]
    fn bounce_windows_are_aligned_even_when_nested() {
        with_bounce(ALIGN * 3, |outer| {
            assert!(aligned_addr(outer.as_ptr()) && outer.len() == ALIGN * 3);
            with_bounce(ALIGN, |inner| {
                assert!(aligned_addr(inner.as_ptr()) && inner.len() == ALIGN);
                assert_ne!(inner.as_ptr(), outer.as_ptr());
            });
        });
    }
}
