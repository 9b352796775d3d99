//! Growing a volume (`cryptvol resize`), crash-safely: a crash at any point leaves a
//! volume that opens with either its old size or its new size.
//!
//! Order (docs/format.md §6a):
//! 1. persist the map; zero the newly exposed tail of the old last chunk when that
//!    chunk is allocated (a set bit promises ciphertext for the whole chunk);
//! 2. extend the file to `data_offset + new size` (sparse), fsync;
//! 3. when the map needs more pages, write the grown map (both copies) in free space
//!    of the reserved area, never over the copies the old header points to, fsync;
//! 4. commit the header recording the new size (and map place): the two-copy header
//!    update of `header/write.rs`, whose MAC covers the size and the map layout.
//!
//! Before step 4 the old header still describes a valid volume (a longer file and
//! unused map copies are ignored); during it, either copy wins and both are complete.
//! Shrinking is refused: data would be lost.

use super::alloc::{self, MapLayout, CHUNKS_PER_PAGE, PAGE_SIZE};
use super::header::{write_header, Header, HEADER_AREA_SIZE};
use super::{crash_point, geometry, Volume, VolumeError};
use crate::crypto::Dek;

/// Sizes of a grow, for messages and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    pub old_size: u64,
    pub new_size: u64,
    /// Whether the allocation map was moved to a bigger place.
    pub map_relocated: bool,
}

pub(super) fn resize_err(path: &str, detail: String) -> VolumeError {
    VolumeError::Resize {
        path: path.to_string(),
        detail,
    }
}

/// Checks that `header` may grow to `new_size`: no re-encryption in progress, larger
/// than now, whole sectors, and the data area still fits a file.
pub(crate) fn check_growth(path: &str, header: &Header, new_size: u64) -> Result<(), VolumeError> {
    if let Some(r) = &header.reencrypt {
        return Err(resize_err(
            path,
            format!(
                "a re-encryption is in progress ({} of {} bytes done); resize after it finishes",
                r.watermark, header.size
            ),
        ));
    }
    if new_size < header.size {
        return Err(resize_err(
            path,
            format!(
                "cannot shrink the volume from {} to {} bytes: data beyond the new end would be lost; use a new volume and copy (cryptvol export, then cryptvol import)",
                header.size, new_size
            ),
        ));
    }
    if new_size == header.size {
        return Err(resize_err(
            path,
            format!("the volume already has {new_size} bytes; give a larger --size"),
        ));
    }
    geometry::check_size(new_size, header.sector_size)?;
    if header
        .data_offset
        .checked_add(new_size)
        .is_none_or(|end| end > geometry::MAX_FILE_END)
    {
        return Err(resize_err(
            path,
            format!(
                "{new_size} bytes after the data offset {} do not fit in a file",
                header.data_offset
            ),
        ));
    }
    Ok(())
}

/// The map layout for `new_size`: the same when the page count does not change, else
/// both copies in one free stretch of the reserved area (before or after the current
/// copies, never overlapping them). Refuses growth past what the area can hold.
pub(crate) fn grown_layout(
    old: &MapLayout,
    new_size: u64,
    data_offset: u64,
) -> Result<MapLayout, String> {
    let pages = new_size
        .div_ceil(u64::from(old.chunk_size))
        .div_ceil(CHUNKS_PER_PAGE)
        .max(1);
    if pages <= old.pages {
        return Ok(*old);
    }
    let page = PAGE_SIZE as u64;
    let old_lo = old.copy_offsets[0].min(old.copy_offsets[1]);
    let old_hi = old.copy_offsets[0].max(old.copy_offsets[1]) + old.pages * page;
    let need = 2 * pages * page;
    let start = if HEADER_AREA_SIZE + need <= old_lo {
        HEADER_AREA_SIZE
    } else if old_hi + need <= data_offset {
        old_hi
    } else {
        let free = old_lo
            .saturating_sub(HEADER_AREA_SIZE)
            .max(data_offset.saturating_sub(old_hi));
        let max_pages = free / (2 * page);
        let max_size = max_pages * CHUNKS_PER_PAGE * u64::from(old.chunk_size);
        return Err(format!(
            "this volume's allocation map area (up to the data offset {data_offset}) has room for a map of at most {max_pages} pages, i.e. a volume of at most {max_size} bytes, and {new_size} bytes need {pages} pages; create a new volume of that size and copy the data (cryptvol export, then cryptvol import)"
        ));
    };
    Ok(MapLayout {
        chunk_size: old.chunk_size,
        pages,
        copy_offsets: [start, start + pages * page],
    })
}

impl Volume {
    /// Grows this volume, opened read-write and not served, to `new_size` bytes, in the
    /// crash-safe order of this module, and returns the header as written. `header`
    /// and `dek` are the ones it was opened with. The volume must be dropped
    /// afterwards: its in-memory size is the old one.
    pub fn grow_offline(
        &self,
        header: &Header,
        dek: &Dek,
        new_size: u64,
    ) -> Result<(Header, Growth), VolumeError> {
        if self.geo.read_only {
            return Err(VolumeError::ReadOnly);
        }
        self.grow_on_disk(header, dek, new_size)
    }

    /// Steps 1–4 of this module on disk, for [`Volume::grow_offline`] and
    /// [`Volume::grow_online`] (which holds the whole-volume range lock around it). The
    /// in-memory size and map are left as they were.
    pub(super) fn grow_on_disk(
        &self,
        header: &Header,
        dek: &Dek,
        new_size: u64,
    ) -> Result<(Header, Growth), VolumeError> {
        let path = self.geo.path.clone();
        check_growth(&path, header, new_size)?;
        let new_layout = match &header.allocation_map {
            Some(old) => Some(
                grown_layout(old, new_size, header.data_offset)
                    .map_err(|d| resize_err(&path, d))?,
            ),
            None => None,
        };
        self.flush()?;
        self.zero_exposed_tail(new_size)?;
        self.extend_file(header.data_offset + new_size)?;
        crash_point("resize-after-extend");
        let relocated = new_layout.is_some_and(|l| Some(l) != header.allocation_map);
        if let (true, Some(layout), Some(map)) = (relocated, &new_layout, &self.map) {
            alloc::write_copies(&*self.engine, layout, &self.geo.uuid, &map.words())
                .and_then(|()| self.engine.sync_all())
                .map_err(|e| self.io_err(e))?;
        }
        crash_point("resize-before-header");
        let mut new = header.clone();
        new.size = new_size;
        new.allocation_map = new_layout;
        write_header(std::path::Path::new(&path), &mut new, dek)?;
        let growth = Growth {
            old_size: header.size,
            new_size,
            map_relocated: relocated,
        };
        Ok((new, growth))
    }

    /// When the old size ends inside an allocated chunk, the rest of that chunk (up to
    /// the new size) becomes part of the volume: its bit promises ciphertext there, so
    /// encrypted zeros are written and synced before the header grows.
    fn zero_exposed_tail(&self, new_size: u64) -> Result<(), VolumeError> {
        let Some(map) = &self.map else {
            return Ok(());
        };
        let cs = map.chunk_size();
        let old = self.size();
        if old.is_multiple_of(cs) || !map.is_allocated(old / cs) {
            return Ok(());
        }
        let end = (old / cs + 1).saturating_mul(cs).min(new_size);
        let mut buf = vec![0u8; usize::try_from(end - old).unwrap_or(0)];
        let first = old / self.ss();
        self.encrypt(&mut buf, first)?;
        self.pwrite_sectors(&buf, first)?;
        self.sync_data()
    }

    /// Makes the backing file at least `end` bytes long (sparse) and syncs it; a block
    /// device must already be that large.
    fn extend_file(&self, end: u64) -> Result<(), VolumeError> {
        let is_file = match &self.file {
            Some(file) => file.metadata().map_err(|e| self.io_err(e))?.is_file(),
            // An RBD image grows like a file.
            None => true,
        };
        let len = self.engine.len().map_err(|e| self.io_err(e))?;
        if len >= end {
            return Ok(());
        }
        if !is_file {
            return Err(resize_err(
                &self.geo.path,
                format!("the block device holds {len} bytes and the grown volume needs {end}; grow the device first"),
            ));
        }
        self.engine
            .set_len(end)
            .and_then(|()| self.engine.sync_all())
            .map_err(|e| self.io_err(e))
    }
}

#[cfg(test)]
mod tests;
