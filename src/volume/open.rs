//! Opening a volume: checking the key(s) and geometry against the header, opening the
//! backing file (identity check, in-use lock, length), loading the allocation map,
//! assembling the [`Volume`] from its parts, then the repairs an open does (a damaged
//! map rewritten, an interrupted re-encryption step finished).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use super::alloc::AllocMap;
use super::cipher::Cipher;
use super::cow::CowState;
use super::engine::FileEngine;
use super::engine_direct::open_direct_engine;
use super::engine_select::{open_engine, EngineChoice};
use super::geometry;
use super::header::{check_engine_uuid, check_file_uuid};
use super::io::Geometry;
use super::rangelock::RangeLocks;
use super::reencrypt::ReencryptState;
use super::{Header, Volume, VolumeError};
use crate::crypto::{Dek, SectorSize, XtsEngine};

/// How a volume is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Punch holes on discard (leaks which blocks are unused).
    pub discard: bool,
    /// The backing file's engine (`serve --engine`) [default: auto].
    pub engine: EngineChoice,
    /// Aligned data I/O with `O_DIRECT` (`serve --direct`); refused by filesystems
    /// without it (see `engine_direct`).
    pub direct: bool,
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
        let next = check_keys(path, header, &dek, next)?;
        let end = check_geometry(path, header)?;
        let cipher = cipher_for(header, &dek, next.as_ref())?;
        let (file, engine) = match super::backing::rbd_spec(path) {
            Some(spec) => (None, open_image(path, &spec?, header, opts)?),
            None => {
                let file = open_backing_file(path, header, opts)?;
                let engine = if opts.direct {
                    open_direct_engine(file.clone(), opts.engine, opts.read_only, path)
                } else {
                    open_engine(file.clone(), opts.engine, path)
                }
                .map_err(|why| VolumeError::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::other(why),
                })?;
                (Some(file), engine)
            }
        };
        check_data_area_fits(path, header, &*engine, end)?;
        let map = load_map(path, header, &*engine)?;
        let vol = Volume {
            geo: Geometry {
                path: path.display().to_string(),
                size: AtomicU64::new(header.size),
                sector_size: header.sector_size,
                data_offset: header.data_offset,
                uuid: header.uuid,
                read_only: opts.read_only,
                discard: opts.discard && !opts.read_only,
            },
            engine,
            file,
            cipher,
            locks: RangeLocks::default(),
            map,
            punches: AtomicU64::new(0),
            reenc: ReencryptState::new(header.reencrypt.is_some(), dek, next),
            tracking: OnceLock::new(),
            cow: CowState::default(),
            #[cfg(test)]
            read_hook: std::sync::Mutex::new(None),
        };
        vol.repair_after_open(header)?;
        Ok(vol)
    }

    /// What an open must do before any I/O: rewrite a damaged allocation map, finish a
    /// re-encryption step interrupted by a crash (refused read-only).
    fn repair_after_open(&self, header: &Header) -> Result<(), VolumeError> {
        if !self.geo.read_only && self.map.as_ref().is_some_and(|m| !m.health().is_healthy()) {
            self.flush()?;
        }
        if let Some(zone) = header.reencrypt.as_ref().and_then(|r| r.hotzone.as_ref()) {
            if self.geo.read_only {
                return Err(VolumeError::ReencryptInterrupted {
                    path: self.geo.path.clone(),
                });
            }
            self.recover_hotzone(zone)?;
        }
        Ok(())
    }
}

/// Verifies `dek` against the header and, while a re-encryption is in progress, that
/// the new DEK `next` is given and right. Returns the new DEK to keep (none otherwise).
fn check_keys(
    path: &Path,
    header: &Header,
    dek: &Dek,
    next: Option<Dek>,
) -> Result<Option<Dek>, VolumeError> {
    header.verify_with_dek(dek, path)?;
    match (&header.reencrypt, next) {
        (None, _) => Ok(None),
        (Some(_), None) => Err(VolumeError::ReencryptKeyNeeded {
            path: path.display().to_string(),
        }),
        (Some(_), Some(n)) => {
            header.verify_next_dek(&n, path)?;
            Ok(Some(n))
        }
    }
}

/// Checks the header's geometry is one format v1 allows; returns the end of the data
/// area in the file.
fn check_geometry(path: &Path, header: &Header) -> Result<u64, VolumeError> {
    let p = path.display().to_string();
    let end = geometry::data_end(header.data_offset, header.size).ok_or_else(|| {
        VolumeError::InvalidHeader {
            path: p.clone(),
            detail: "data offset + size overflows".into(),
        }
    })?;
    let sector = SectorSize::try_from(header.sector_size).ok();
    if header.sector_size != header.iv_unit
        || !sector.is_some_and(|s| geometry::is_whole_sectors(header.size, s))
    {
        return Err(VolumeError::InvalidHeader {
            path: p,
            detail: format!(
                "sector size {} / IV unit {} / size {} are not a valid v1 combination",
                header.sector_size, header.iv_unit, header.size
            ),
        });
    }
    Ok(end)
}

/// The cipher engines: `dek` above the header's watermark, `next` below it.
fn cipher_for(header: &Header, dek: &Dek, next: Option<&Dek>) -> Result<Cipher, VolumeError> {
    let sector_size = SectorSize::try_from(header.sector_size)?;
    let engine = XtsEngine::new(dek, sector_size)?;
    let next_engine = match next {
        Some(n) => Some(XtsEngine::new(n, sector_size)?),
        None => None,
    };
    let wm = header
        .reencrypt
        .as_ref()
        .map_or(0, |r| r.watermark / u64::from(header.sector_size));
    Ok(Cipher::new(engine, next_engine, wm))
}

/// Opens the backing file, checks it is the header's volume and takes the in-use lock.
fn open_backing_file(
    path: &Path,
    header: &Header,
    opts: OpenOptions,
) -> Result<Arc<File>, VolumeError> {
    let p = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .open(path)
        .map_err(|source| VolumeError::Io {
            path: p.clone(),
            source,
        })?;
    check_file_uuid(&file, path, header.uuid)?;
    lock_in_use(&file, &p, opts.read_only)?;
    Ok(Arc::new(file))
}

/// Opens the RBD image `spec` (its exclusive lock is the in-use lock of a writable open)
/// and checks it is the header's volume.
fn open_image(
    path: &Path,
    spec: &crate::rbd::ImageSpec,
    header: &Header,
    opts: OpenOptions,
) -> Result<Box<dyn FileEngine>, VolumeError> {
    let access = if opts.read_only {
        super::backing::Access::ReadOnly
    } else {
        super::backing::Access::Write
    };
    let engine = super::backing::open_engine(path, spec, access)?;
    check_engine_uuid(&*engine, path, header.uuid)?;
    Ok(engine)
}

/// Checks the file holds the whole data area (up to `end`).
fn check_data_area_fits(
    path: &Path,
    header: &Header,
    engine: &dyn FileEngine,
    end: u64,
) -> Result<(), VolumeError> {
    let p = path.display().to_string();
    let len = engine.len().map_err(|source| VolumeError::Io {
        path: p.clone(),
        source,
    })?;
    if !geometry::data_area_fits(len, header.data_offset, header.size) {
        return Err(VolumeError::Truncated {
            path: p,
            detail: format!(
                "the data area needs {end} bytes (data offset {} + size {}) but the file has {len}; restore it from a backup",
                header.data_offset, header.size
            ),
        });
    }
    Ok(())
}

/// Loads the allocation map of a thin volume (`None` without one), warning about
/// damaged pages (the next flush rewrites them).
fn load_map(
    path: &Path,
    header: &Header,
    file: &dyn FileEngine,
) -> Result<Option<AllocMap>, VolumeError> {
    let Some(layout) = &header.allocation_map else {
        return Ok(None);
    };
    let p = path.display();
    let map = AllocMap::open(file, *layout, header.uuid, header.size)
        .map_err(|e| super::map_error(path, e))?;
    let h = map.health();
    if !h.pages_damaged.is_empty() {
        tracing::warn!(path = %p, pages = ?h.pages_damaged, "allocation map pages damaged in both copies: their chunks are treated as allocated (never-written blocks there read as random bytes); the map is rewritten on the next flush");
    } else if h.pages_one_copy_bad > 0 {
        tracing::warn!(path = %p, pages = h.pages_one_copy_bad, "allocation map: one copy of some pages is damaged; using the other (repaired on the next flush)");
    }
    Ok(Some(map))
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
mod tests;
