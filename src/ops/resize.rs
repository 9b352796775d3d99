//! Growing a volume that is not served (`cryptvol resize FILE --size SIZE`): unlock
//! it, grow it in the crash-safe order of `volume::resize`, and audit the change like
//! other header changes (one `resize` record in the key audit log, which is opened
//! before anything changes so that an unauditable resize is refused).

use std::path::Path;

use crate::keys::{AuditEvent, AuditLog, EncryptionContext, KeyError, Principal};
use crate::volume::{Growth, OpenOptions, VolumeError};

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

/// Grows the volume at `path` (not served) to `size`.
pub async fn resize(path: &Path, keys: &KeyOptions, size: NewSize) -> Result<Growth, OpsError> {
    let audit = AuditLog::choose(keys.audit_log.as_deref(), &keys.keystore_dir()).open()?;
    let opts = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let (vol, header, _) = match unlock(path, keys, opts).await {
        Err(OpsError::Volume(VolumeError::InUse { path })) => {
            return Err(OpsError::Volume(VolumeError::Resize {
                detail: "it is being served by a running cryptvol (its open lock is held); grow a served volume through its daemon: cryptvol resize --control SOCKET EXPORT --size SIZE".into(),
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
    let ctx = EncryptionContext::for_volume(&header.uuid);
    let detail = format!("path={} size={}->{}", path.display(), header.size, new_size);
    // The audit record's `error` field names a key error kind: a failed resize is
    // recorded as the volume being in a state that does not allow it.
    let failure = result.as_ref().err().map(|e| KeyError::InvalidState {
        key: header.uuid.to_string(),
        reason: e.to_string(),
    });
    audit.write(&AuditEvent {
        operation: "resize",
        backend: "volume",
        key_id: "",
        context: Some(&ctx),
        principal: &Principal::current(),
        outcome: failure.as_ref().map_or(Ok(()), Err),
        detail: Some(&detail),
    })?;
    Ok(result?.1)
}
