//! The backing store's I/O engine: the one way a [`Volume`](super::Volume) and its
//! metadata read, write, size and sync the backing file. [`FileEngine`] is the seam a
//! second engine (io_uring, `O_DIRECT`, a network block store) plugs into without
//! touching the volume's logic; [`StdFileEngine`] is the engine over `std::fs::File`
//! (pread/pwrite, fdatasync/fsync, `ftruncate`, `fallocate(PUNCH_HOLE | KEEP_SIZE)`).
//!
//! What goes through the engine: every data-area read and write (sector ciphertext,
//! copy-before-write reads, re-encryption zones), data syncs, hole punching, and the
//! metadata: both header copies (read, written and synced by `header/recovery.rs`,
//! `header/write.rs`, `header/create.rs`), the allocation map's pages (`alloc.rs`) and
//! the file's length (`header/create.rs`, `resize.rs`). What does not: opening the file
//! (`O_NOFOLLOW`/`O_EXCL` rules), the header `flock`, the in-use lock and the
//! file-identity check at open (`open.rs`), and directory syncs. Engines are made by
//! [`engine_for`], the one place a test build can put a recording engine in between
//! (`crashstates.rs`). The engine knows offsets in the file only: no sectors, no keys.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;

/// Positioned I/O on the backing file. Offsets are file offsets (the data area starts
/// at the header's data offset); every method is callable from many threads at once.
pub(crate) trait FileEngine: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`. Bytes beyond the end of the file (a sparse or
    /// shortened file) read as zeros.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;

    /// One read of up to `buf.len()` bytes at `offset`: the number read (0 at the end of
    /// the file). The `O_DIRECT` engine ([`DirectFileEngine`](super::engine_direct::DirectFileEngine))
    /// reads through it so that a short read at the end of the file is not followed by a
    /// read at an unaligned offset. The default reads the whole buffer.
    fn read_some_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.read_exact_at(buf, offset).map(|()| buf.len())
    }

    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;

    /// Makes completed writes durable (fdatasync).
    fn sync_data(&self) -> std::io::Result<()>;

    /// Frees `[offset, offset + len)` keeping the file's size (reads as zeros after).
    /// A filesystem that cannot punch holes makes this a no-op, not an error.
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()>;

    /// The file's length (a block device's size).
    fn len(&self) -> std::io::Result<u64>;

    /// Sets the file's length (a new volume's size, a grow); new bytes read as zeros.
    fn set_len(&self, len: u64) -> std::io::Result<()>;

    /// Makes completed writes and the file's metadata durable (fsync).
    fn sync_all(&self) -> std::io::Result<()>;
    /// The engine's name in logs (`serve`'s "export opened" line).
    fn name(&self) -> &'static str {
        "unnamed"
    }
}

/// The engine for an open backing file at `path`: a [`StdFileEngine`] (in test builds,
/// wrapped in a recording engine when a crash-state test records `path`'s directory).
pub(crate) fn engine_for(file: Arc<File>, path: &Path) -> Box<dyn FileEngine> {
    let engine = StdFileEngine::new(file);
    #[cfg(test)]
    if let Some(recording) = super::crashstates::recording_engine(path, &engine) {
        return recording;
    }
    let _ = path;
    Box::new(engine)
}

/// [`engine_for`] over a borrowed file (a header read or write under its `flock`): the
/// engine gets its own descriptor of the same open file.
pub(crate) fn engine_for_borrowed(
    file: &File,
    path: &Path,
) -> std::io::Result<Box<dyn FileEngine>> {
    Ok(engine_for(Arc::new(file.try_clone()?), path))
}

/// The engine over a `std::fs::File`, shared with what must hold the file itself (the
/// in-use lock).
#[derive(Debug, Clone)]
pub(crate) struct StdFileEngine {
    file: Arc<File>,
}

impl StdFileEngine {
    pub(crate) fn new(file: Arc<File>) -> Self {
        Self { file }
    }
}

impl FileEngine for StdFileEngine {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileEngine::read_exact_at(&*self.file, buf, offset)
    }

    fn read_some_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        FileEngine::read_some_at(&*self.file, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        FileEngine::write_all_at(&*self.file, buf, offset)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        FileEngine::sync_data(&*self.file)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        FileEngine::punch_hole(&*self.file, offset, len)
    }

    fn len(&self) -> std::io::Result<u64> {
        FileEngine::len(&*self.file)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        FileEngine::set_len(&*self.file, len)
    }

    fn sync_all(&self) -> std::io::Result<()> {
        FileEngine::sync_all(&*self.file)
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

/// The same operations on a plain `File` (what [`StdFileEngine`] does, and what tests
/// of the map and header code use directly).
impl FileEngine for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_some_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        loop {
            match self.read_at(buf, offset) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        File::sync_data(self)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(start), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        };
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        loop {
            match nix::fcntl::fallocate(self.as_raw_fd(), flags, start, len) {
                Ok(()) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EOPNOTSUPP) => return Ok(()),
                Err(e) => return Err(std::io::Error::from_raw_os_error(e as i32)),
            }
        }
    }

    fn len(&self) -> std::io::Result<u64> {
        file_len(self)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }

    fn sync_all(&self) -> std::io::Result<()> {
        File::sync_all(self)
    }

    fn name(&self) -> &'static str {
        "threads"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> (tempfile::NamedTempFile, StdFileEngine) {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .expect("open");
        (f, StdFileEngine::new(Arc::new(file)))
    }

    #[test]
    fn reads_past_the_end_as_zeros_and_writes_at_offsets() {
        let (_f, e) = engine();
        e.write_all_at(b"abcd", 10).expect("write");
        assert_eq!(e.len().expect("len"), 14);
        let mut buf = [0xFFu8; 8];
        e.read_exact_at(&mut buf, 8).expect("read");
        assert_eq!(&buf, b"\0\0abcd\0\0");
        e.sync_data().expect("sync");
    }

    #[test]
    fn set_len_grows_the_file_with_zeros_and_syncs() {
        let (_f, e) = engine();
        e.write_all_at(b"xy", 0).expect("write");
        e.set_len(8192).expect("set_len");
        e.sync_all().expect("sync_all");
        assert_eq!(e.len().expect("len"), 8192);
        let mut buf = [0xFFu8; 4];
        e.read_exact_at(&mut buf, 8190).expect("read");
        assert_eq!(
            &buf, b"\0\0\0\0",
            "the end of the file and past it read as zeros"
        );
    }

    #[test]
    fn punching_keeps_the_size_and_reads_zeros() {
        let (_f, e) = engine();
        e.write_all_at(&[7u8; 8192], 0).expect("write");
        e.punch_hole(0, 4096).expect("punch");
        assert_eq!(e.len().expect("len"), 8192);
        let mut buf = [0xFFu8; 8192];
        e.read_exact_at(&mut buf, 0).expect("read");
        // Filesystems without hole punching leave the data: both are correct.
        assert!(buf[..4096].iter().all(|&b| b == 0) || buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..].iter().all(|&b| b == 7));
    }
}
