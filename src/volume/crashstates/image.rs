//! A file's contents as the enumerator builds them: its length and only the pages that
//! were read as data or written, so that a sparse volume of many GiB (a grow that moves
//! the allocation map passes 2 GiB per map page) costs what it holds, not its size.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Granularity of an image's pages.
const PAGE: u64 = 4096;
/// Bytes read at once when loading a file's data.
const READ_BLOCK: u64 = 1 << 20;

/// A file image: everything not in `pages` (below `len`) reads as zeros.
#[derive(Clone, Debug, Default)]
pub(crate) struct Image {
    len: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

fn zero_page() -> Box<[u8]> {
    vec![0u8; PAGE as usize].into_boxed_slice()
}

impl Image {
    /// The image of `bytes`.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Image {
        let mut img = Image {
            len: bytes.len() as u64,
            pages: BTreeMap::new(),
        };
        img.load_nonzero(0, bytes);
        img
    }

    /// The image of the file at `path`, reading only its data extents (`SEEK_DATA`,
    /// `SEEK_HOLE`; the whole file where the file system has neither).
    pub(crate) fn read_file(path: &Path) -> std::io::Result<Image> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        let mut img = Image {
            len,
            pages: BTreeMap::new(),
        };
        let mut pos = 0;
        while pos < len {
            let Some((start, end)) = data_extent(&f, pos, len) else {
                break;
            };
            let mut at = start - start % PAGE;
            while at < end {
                let n = READ_BLOCK.min(end - at);
                let mut buf = vec![0u8; n as usize];
                f.read_exact_at(&mut buf, at)?;
                img.load_nonzero(at, &buf);
                at += n;
            }
            pos = end.max(pos + 1);
        }
        Ok(img)
    }

    /// Keeps the pages of `bytes` (at page-aligned `at`) that are not all zeros.
    fn load_nonzero(&mut self, at: u64, bytes: &[u8]) {
        for (i, piece) in bytes.chunks(PAGE as usize).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                let mut page = zero_page();
                page[..piece.len()].copy_from_slice(piece);
                self.pages.insert(at / PAGE + i as u64, page);
            }
        }
    }

    /// Writes `bytes` at `offset`, extending the image as a file write does.
    pub(crate) fn write(&mut self, offset: u64, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            let pos = offset + done as u64;
            let within = (pos % PAGE) as usize;
            let n = (PAGE as usize - within).min(bytes.len() - done);
            let page = self.pages.entry(pos / PAGE).or_insert_with(zero_page);
            page[within..within + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
        self.len = self.len.max(offset + bytes.len() as u64);
    }

    /// Zeros `start..end` (within the image).
    pub(crate) fn zero(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        if start >= end {
            return;
        }
        for (&idx, page) in self.pages.range_mut(start / PAGE..end.div_ceil(PAGE)) {
            let base = idx * PAGE;
            let a = (start.max(base) - base) as usize;
            let b = (end.min(base + PAGE) - base) as usize;
            page[a..b].fill(0);
        }
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    pub(crate) fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero(len, self.len);
            self.pages.retain(|&idx, _| idx * PAGE < len);
        }
        self.len = len;
    }

    /// The `len` bytes at `offset`, or `None` when they go past the end.
    pub(crate) fn read(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(len as u64)?;
        if end > self.len {
            return None;
        }
        let mut out = vec![0u8; len];
        if len == 0 {
            return Some(out);
        }
        for (&idx, page) in self.pages.range(offset / PAGE..end.div_ceil(PAGE)) {
            let base = idx * PAGE;
            let (a, b) = (offset.max(base), end.min(base + PAGE));
            out[(a - offset) as usize..(b - offset) as usize]
                .copy_from_slice(&page[(a - base) as usize..(b - base) as usize]);
        }
        Some(out)
    }

    /// Writes the image to `path` (replacing what is there) as a sparse file.
    pub(crate) fn save(&self, path: &Path) -> std::io::Result<()> {
        let f = File::create(path)?;
        f.set_len(self.len)?;
        for (&idx, page) in &self.pages {
            let start = idx * PAGE;
            let n = self.len.saturating_sub(start).min(PAGE) as usize;
            if page[..n].iter().any(|&b| b != 0) {
                f.write_all_at(&page[..n], start)?;
            }
        }
        Ok(())
    }
}

/// The next stretch of data at or after `pos`: `None` past the last one; the rest of
/// the file where the file system cannot say.
fn data_extent(f: &File, pos: u64, len: u64) -> Option<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let fd = f.as_raw_fd();
    let seek = |at: u64, whence| lseek(fd, at as libc::off_t, whence).map(|r| r as u64);
    match seek(pos, Whence::SeekData) {
        Ok(start) => {
            let end = seek(start, Whence::SeekHole).unwrap_or(len);
            Some((start, end.min(len)))
        }
        Err(nix::errno::Errno::ENXIO) => None,
        Err(_) => Some((pos, len)),
    }
}
