//! Volume lifecycle operations composed from `volume/` and `keys/`: create a volume
//! with a new data key, unlock one (unwrap its DEK through the right backend), describe
//! one, and change its keyslots without touching data (rekey, keyslot add/remove).
//! No protocol knowledge lives here.
//!
//! One module per concern; callers use the re-exports below (`crate::ops::X`):
//! - `key_choice`: where keys come from ([`KeyOptions`]), which master key wraps a new
//!   data key ([`NewKey`]), and which master key an existing keyslot names.
//! - `unlock`: unwrapping a volume's or a snapshot's data key through its keyslots.
//! - `create`: making new volume files ([`create_volume`], [`CreateOptions`]).
//! - `partial`: files built under a hidden `.FILE.partial` name and published whole.
//! - `keyslots`: changing a volume's keyslots (rekey, add, remove) and purging keys.
//! - `reencrypt_keys`: the fresh data key a re-encryption wraps for every keyslot.
//! - `resize`: growing a volume that is not served ([`resize`], [`NewSize`]).
//! - `snapshots`: taking and copying snapshots; `restore`: restoring one.
//! - `info`: what `cryptvol info` shows.
//! - `break_glass`: handing a volume's data key to dm-crypt (`cryptvol break-glass`).

mod break_glass;
#[cfg(test)]
mod crashstates_tests;
mod create;
mod info;
mod key_choice;
mod keyslots;
mod partial;
mod reencrypt_keys;
mod resize;
mod restore;
mod snapshots;
mod unlock;

pub use break_glass::{break_glass, DekFd, Recovery};
pub use create::{
    create_and_open, create_volume, create_volume_with, create_volume_with_dek, CreateOptions,
};
pub use info::{
    info, AllocationInfo, HeaderHealthInfo, HotzoneInfo, KeyslotInfo, ReencryptionInfo, VolumeInfo,
};
pub use key_choice::{slot_key_ref, KeyOptions, NewKey};
pub use keyslots::{keyslot_add, keyslot_remove, purge_expired_keys, rekey, KeyslotChange};
pub use partial::partial_path;
pub use reencrypt_keys::reencrypt_new_dek;
pub use resize::{resize, NewSize, ResizeOptions};
pub use restore::{restore_snapshot, RestoreOutcome};
pub use snapshots::{snapshot_copy, snapshot_create, snapshot_served};
pub use unlock::{unlock, unlock_snapshot};

use std::path::Path;

use crate::keys::{KeyError, WrappedDek};
use crate::snapshot::SnapshotError;
use crate::volume::VolumeError;

/// Errors of lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path} (volume {uuid}): no keyslot could be unlocked:\n{details}")]
    NoUsableKeyslot {
        path: String,
        uuid: String,
        details: String,
    },
    #[error("{path}: {reason}")]
    Keyslot { path: String, reason: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{path} is being served by a running cryptvol (its open lock is held): a served volume is snapshotted through the daemon that serves it (`cryptvol snapshot create EXPORT [--control SOCKET]`), or stop serving it first")]
    VolumeServed { path: String },
    #[error("break-glass refused: {reason}")]
    BreakGlass { reason: String },
}

/// An [`OpsError::Keyslot`] for the volume at `path`.
fn keyslot_err(path: &Path, reason: String) -> OpsError {
    OpsError::Keyslot {
        path: path.display().to_string(),
        reason,
    }
}

/// `", key ID"` for a keyslot that names a key (empty for a passphrase keyslot), as
/// keyslots are listed in messages.
fn key_suffix(slot: &WrappedDek) -> String {
    if slot.key_id.is_empty() {
        String::new()
    } else {
        format!(", key {}", slot.key_id.escape_debug())
    }
}

/// The refusal of a command not built for `rbd:` volumes yet (docs/rbd.md, "What is next").
pub(crate) fn not_on_rbd(path: &std::path::Path, what: &str) -> crate::volume::VolumeError {
    crate::volume::VolumeError::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("{what} is not built for RBD volumes yet"),
        ),
    }
}
