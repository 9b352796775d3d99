//! Making new volume files: a fresh data key wrapped under the chosen master key
//! ([`create_volume`], [`create_and_open`]), optionally preallocated under a hidden name
//! ([`CreateOptions`]), or with a given data key and keyslots ([`create_volume_with_dek`],
//! for restores); and the check of a new volume's geometry.

use std::path::Path;

use crate::crypto::Dek;
use crate::keys::{EncryptionContext, WrappedDek};
use crate::progress::Progress;
use crate::volume::{self, Header, OpenOptions, Volume, VolumeError, VolumeSpec};

use super::key_choice::generate_for;
use super::partial::{partial_path, publish_partial};
use super::{KeyOptions, NewKey, OpsError};

/// Creates a new volume at `path` with a fresh random DEK wrapped by the chosen key.
pub async fn create_volume(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
) -> Result<Header, OpsError> {
    create_volume_with(path, spec, key, keys, &CreateOptions::default()).await
}

/// Extra choices of `cryptvol create`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// Fill the whole data area with ciphertext (of zeros) and mark every chunk
    /// allocated, so the file never shows which blocks were written. Costs the full
    /// size in disk space and a write of the whole volume up front.
    pub preallocate: bool,
    /// Show a progress bar (else only log lines) while preallocating.
    pub progress: bool,
    /// Make a volume without an allocation map (the original v1 layout, readable by
    /// cryptvol before 0.2; never-written blocks read as pseudo-random bytes).
    pub no_allocation_map: bool,
}

/// [`create_volume`] with [`CreateOptions`]. A failed preallocation removes the file.
pub async fn create_volume_with(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
    opts: &CreateOptions,
) -> Result<Header, OpsError> {
    if !opts.preallocate {
        let (header, _) = create_with_dek(path, spec, key, keys, !opts.no_allocation_map).await?;
        return Ok(header);
    }
    if crate::volume::is_rbd_path(path) {
        return Err(super::not_on_rbd(path, "create --preallocate").into());
    }
    // A preallocation takes a while: build it under a hidden name, published only when
    // complete (an interrupted one is removed by the next run).
    if path.exists() {
        return Err(VolumeError::AlreadyExists {
            path: path.display().to_string(),
        }
        .into());
    }
    let partial = partial_path(path);
    remove_interrupted_preallocation(&partial)?;
    let (header, dek) = create_with_dek(&partial, spec, key, keys, !opts.no_allocation_map).await?;
    if let Err(e) = preallocate(&partial, &header, dek, opts.progress) {
        let _ = std::fs::remove_file(&partial);
        return Err(e.into());
    }
    if let Err(e) = publish_partial(&partial, path) {
        let _ = std::fs::remove_file(&partial);
        return Err(e.into());
    }
    Ok(header)
}

/// Removes a `.FILE.partial` left by an interrupted preallocation, if there is one.
fn remove_interrupted_preallocation(partial: &Path) -> Result<(), VolumeError> {
    match std::fs::remove_file(partial) {
        Ok(()) => tracing::info!(path = %partial.display(), "removed an interrupted preallocation"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(VolumeError::Io {
                path: partial.display().to_string(),
                source: e,
            })
        }
    }
    Ok(())
}

/// Opens the new volume at `path` and fills its whole data area (with a progress bar
/// when `show_progress`, else only log lines).
fn preallocate(
    path: &Path,
    header: &Header,
    dek: Dek,
    show_progress: bool,
) -> Result<(), VolumeError> {
    let vol = Volume::open(path, header, dek, OpenOptions::default())?;
    let progress = if show_progress {
        Progress::new(format!("preallocate {}", path.display()), header.size)
    } else {
        Progress::hidden(header.size)
    };
    vol.preallocate(&|done| progress.set_done(done))?;
    progress.finish();
    Ok(())
}

/// Like [`create_volume`], and opens the new (thin) volume with the DEK it was made
/// with (no second unwrap: a passphrase read from a descriptor can be read only once).
pub async fn create_and_open(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
    opts: OpenOptions,
) -> Result<(Volume, Header), OpsError> {
    let (header, dek) = create_with_dek(path, spec, key, keys, true).await?;
    let vol = Volume::open(path, &header, dek, opts)?;
    Ok((vol, header))
}

/// Creates a volume file at `path` (`thin`: with an allocation map) under a fresh DEK
/// wrapped by `key`; returns its header and the DEK.
async fn create_with_dek(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
    thin: bool,
) -> Result<(Header, Dek), OpsError> {
    validate_spec(spec)?;
    if path.exists() {
        return Err(VolumeError::AlreadyExists {
            path: path.display().to_string(),
        }
        .into());
    }
    let uuid = uuid::Uuid::new_v4();
    let ctx = EncryptionContext::for_volume(&uuid);
    let svc = keys.service();
    let (dek, wrapped) = generate_for(keys, &svc, &key, &ctx).await?;
    let header = volume::create_with(path, spec, uuid, vec![wrapped], &dek, thin)?;
    Ok((header, dek))
}

/// Creates a volume file at `path` with the given UUID, keyslots and data key (the key
/// check value and MAC are computed from `dek`), for restores, which make the data key
/// and its keyslots first.
pub fn create_volume_with_dek(
    path: &Path,
    spec: &VolumeSpec,
    uuid: uuid::Uuid,
    keyslots: Vec<WrappedDek>,
    dek: &Dek,
) -> Result<Header, OpsError> {
    validate_spec(spec)?;
    Ok(volume::create(path, spec, uuid, keyslots, dek)?)
}

/// Checks a new volume's sector size (512 or 4096) and size (a non-zero multiple of
/// the sector size).
fn validate_spec(spec: &VolumeSpec) -> Result<(), VolumeError> {
    crate::volume::geometry::check_spec(spec).map(drop)
}
