//! Growing a volume that is not served (`cryptvol resize FILE --size SIZE`): unlock
//! it, grow it in the crash-safe order of `volume::resize`, and audit the change like
//! other header changes (one `resize` record in the key audit log, which is opened
//! before anything changes so that an unauditable resize is refused).

use std::path::Path;

use crate::crypto::Dek;
use crate::keys::{AuditLog, AuditWriter, KeyError};
use crate::progress::Progress;
use crate::volume::{Growth, Header, OpenOptions, Volume, VolumeError};

use super::{unlock, KeyOptions, OpsError};

/// The size a resize asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    /// The size of the data area afterwards (`--size 20G`).
    Absolute(u64),
    /// Bytes to add (`--size +10G`).
    Grow(u64),
}

impl NewSize {
    /// The new size of a volume of `current` bytes (`None` on overflow).
    pub fn resolve(self, current: u64) -> Option<u64> {
        match self {
            NewSize::Absolute(s) => Some(s),
            NewSize::Grow(d) => current.checked_add(d),
        }
    }

    /// Parses `SIZE` or `+SIZE` in the syntax of `create --size`.
    pub fn parse(s: &str) -> Result<NewSize, crate::size::SizeError> {
        match s.trim().strip_prefix('+') {
            Some(rest) => Ok(NewSize::Grow(crate::size::parse_size(rest)?)),
            None => Ok(NewSize::Absolute(crate::size::parse_size(s)?)),
        }
    }
}

/// How to grow.
#[derive(Debug, Clone, Copy)]
pub struct ResizeOptions {
    /// The size asked for.
    pub size: NewSize,
    /// Afterwards fill every unallocated chunk with encrypted zeros (keeps a volume made
    /// with `create --preallocate` thick: its new space is the only unallocated part).
    pub preallocate: bool,
    /// Show a progress bar while preallocating (else only log lines).
    pub progress: bool,
}

/// Grows the volume at `path` (not served) as `opts` say.
pub async fn resize(
    path: &Path,
    keys: &KeyOptions,
    opts: ResizeOptions,
) -> Result<Growth, OpsError> {
    let size = opts.size;
    let audit = AuditLog::choose(keys.audit_log.as_deref(), &keys.keystore_dir()).open()?;
    let rw = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let (vol, header, _) = match unlock(path, keys, rw).await {
        Err(OpsError::Volume(VolumeError::InUse { path })) => {
            return Err(OpsError::Volume(VolumeError::Resize {
                detail: "it is being served by a running cryptvol (its open lock is held); grow it online through the daemon instead: cryptvol resize --control PATH EXPORT --size SIZE".into(),
                path,
            }))
        }
        other => other?,
    };
    let new_size = size
        .resolve(header.size)
        .ok_or_else(|| VolumeError::Resize {
            path: path.display().to_string(),
            detail: "the requested size overflows".into(),
        })?;
    let dek = vol.data_key()?;
    let result = vol.grow_offline(&header, &dek, new_size);
    drop(vol);
    audit_resize(&audit, path, &header, new_size, result.as_ref().err())?;
    let (grown, growth) = result?;
    if opts.preallocate {
        preallocate(path, &grown, dek, opts.progress)?;
    }
    Ok(growth)
}

/// Fills the grown volume's unallocated chunks with encrypted zeros. Interrupted, the
/// volume keeps its new size and the rest stays thin (reads as zeros).
fn preallocate(path: &Path, header: &Header, dek: Dek, show: bool) -> Result<(), VolumeError> {
    let vol = Volume::open(path, header, dek, OpenOptions::default())?;
    let progress = if show {
        Progress::new(format!("preallocate {}", path.display()), header.size)
    } else {
        Progress::hidden(header.size)
    };
    vol.preallocate(&|done| progress.set_done(done))?;
    progress.finish();
    Ok(())
}

/// One `resize` record in the key audit log, for a grow that worked or failed.
fn audit_resize(
    audit: &AuditWriter,
    path: &Path,
    header: &Header,
    new_size: u64,
    error: Option<&VolumeError>,
) -> Result<(), KeyError> {
    let detail = format!("path={} size={}->{}", path.display(), header.size, new_size);
    audit.write_resize(&header.uuid, &detail, error.map(ToString::to_string))
}
