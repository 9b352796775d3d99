//! Creating a new volume file: the first header (sequence 1, key check value and MAC
//! from the DEK), both copies, the empty allocation map of a thin volume, and the
//! sparse data area, written and synced before the file counts as created (the map and
//! the length first, the header last).

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::copy::encode_copy;
use super::mac::{compute_kcv, compute_mac};
use super::{alloc, io_err, Header, VolumeError, VolumeSpec, CIPHER, DEFAULT_DATA_OFFSET};
use super::{FORMAT_VERSION, HEADER_COPY_SIZE};
use crate::crypto::Dek;
use crate::keys::WrappedDek;
use crate::volume::engine::{engine_for_borrowed, FileEngine};
use crate::volume::geometry;

/// Creates a new thin volume file (refusing to overwrite) with the given keyslots; the
/// key check value and MAC are computed from `dek`. The data area is left sparse and
/// the allocation map empty: the volume reads as zeros.
pub fn create(
    path: &Path,
    spec: &VolumeSpec,
    uuid: uuid::Uuid,
    keyslots: Vec<WrappedDek>,
    dek: &Dek,
) -> Result<Header, VolumeError> {
    create_with(path, spec, uuid, keyslots, dek, true)
}

/// [`create`], choosing whether the volume gets an allocation map. Without one
/// (`thin = false`) the volume has the original v1 layout that cryptvol versions
/// before the map can open, and its never-written blocks read as pseudo-random bytes.
pub fn create_with(
    path: &Path,
    spec: &VolumeSpec,
    uuid: uuid::Uuid,
    keyslots: Vec<WrappedDek>,
    dek: &Dek,
    thin: bool,
) -> Result<Header, VolumeError> {
    let p = || path.display().to_string();
    geometry::check_spec(spec)?;
    let mut header = first_header(spec, uuid, keyslots, dek, thin)?;
    header
        .validate()
        .map_err(|detail| VolumeError::InvalidHeader { path: p(), detail })?;
    header.header_mac = compute_mac(dek, &header)?;
    let copies = [encode_copy(&header, 0), encode_copy(&header, 1)];
    let [Ok(primary), Ok(secondary)] = copies else {
        let detail = copies.into_iter().find_map(Result::err).unwrap_or_default();
        return Err(VolumeError::InvalidHeader { path: p(), detail });
    };
    if let Some(spec) = crate::volume::backing::rbd_spec(path) {
        create_image(path, &spec?, &header, [&primary, &secondary])?;
        return Ok(header);
    }
    let file = create_new_file(path)?;
    let written = engine_for_borrowed(&file, path)
        .and_then(|engine| write_new_volume(&*engine, path, &header, [&primary, &secondary]));
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_err(path, e));
    }
    Ok(header)
}

/// The header of a new volume of `spec` (sequence 1, MAC not yet computed).
fn first_header(
    spec: &VolumeSpec,
    uuid: uuid::Uuid,
    keyslots: Vec<WrappedDek>,
    dek: &Dek,
    thin: bool,
) -> Result<Header, VolumeError> {
    let (layout, data_offset) = if thin {
        let (l, off) = alloc::MapLayout::for_size(spec.size);
        (Some(l), off)
    } else {
        (None, DEFAULT_DATA_OFFSET)
    };
    Ok(Header {
        format_version: FORMAT_VERSION,
        sequence: 1,
        uuid,
        size: spec.size,
        sector_size: spec.sector_size,
        data_offset,
        cipher: CIPHER.to_string(),
        keyslots,
        iv_unit: spec.sector_size,
        required_features: layout
            .map(|_| alloc::FEATURE.to_string())
            .into_iter()
            .collect(),
        compatible_features: Vec::new(),
        allocation_map: layout,
        reencrypt: None,
        key_check: compute_kcv(dek, &uuid)?,
        header_mac: [0u8; 32],
    })
}

/// Opens `path` for a new volume: created here, private to its owner, never an
/// existing file.
fn create_new_file(path: &Path) -> Result<File, VolumeError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => VolumeError::AlreadyExists {
                path: path.display().to_string(),
            },
            _ => io_err(path, e),
        })
}

/// Writes the initial allocation map and sizes the file to the end of the data area,
/// syncs, and only then writes both header copies and syncs the file and its
/// directory. A crash before a sync may leave any subset of the unsynced writes on
/// disk: with the map and the header in one batch, a valid header over a missing map
/// (whose pages then count as damaged, i.e. allocated) made a new volume read garbage
/// instead of zeros (found by the crash-state enumeration, `volume/crashstates.rs`).
/// Now a valid header implies a durable map and a full-length file.
fn write_new_volume(
    engine: &dyn FileEngine,
    path: &Path,
    header: &Header,
    copies: [&[u8]; 2],
) -> std::io::Result<()> {
    write_layout(engine, header, copies)?;
    sync_parent_dir(path)
}

/// The writes of [`write_new_volume`] through `engine`, without the directory sync (a
/// file's or an RBD image's).
fn write_layout(
    engine: &dyn FileEngine,
    header: &Header,
    [primary, secondary]: [&[u8]; 2],
) -> std::io::Result<()> {
    if let Some(layout) = &header.allocation_map {
        alloc::write_initial(engine, layout, &header.uuid)?;
    }
    engine.set_len(header.data_offset + header.size)?;
    engine.sync_all()?;
    engine.write_all_at(primary, 0)?;
    engine.write_all_at(secondary, HEADER_COPY_SIZE)?;
    engine.sync_all()
}

/// Creates the RBD image `spec` sized for the volume (refusing an existing image) and
/// writes the same layout as a volume file, under the image's exclusive lock; a failed
/// write removes the image.
fn create_image(
    path: &Path,
    spec: &crate::rbd::ImageSpec,
    header: &Header,
    copies: [&[u8]; 2],
) -> Result<(), VolumeError> {
    let len = header.data_offset + header.size;
    let engine = crate::volume::backing::create_engine(path, spec, len)?;
    if let Err(e) = write_layout(&*engine, header, copies) {
        drop(engine);
        crate::volume::backing::remove(path, spec);
        return Err(io_err(path, e));
    }
    Ok(())
}

fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
