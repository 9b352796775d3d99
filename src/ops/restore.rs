//! Restoring a snapshot into a new volume file under a new data key, built under a
//! hidden `.FILE.partial` name and published only when complete.

use std::path::Path;
use std::sync::Arc;

use crate::keys::EncryptionContext;
use crate::progress::Progress;
use crate::snapshot::{self, RestoreStats, SnapshotId, Store};
use crate::volume::{Header, OpenOptions, Volume, VolumeError, VolumeSpec};

use super::create::create_volume_with_dek;
use super::key_choice::{generate_for, slot_key};
use super::partial::{partial_path, publish_partial, RemoveOnDrop};
use super::unlock::unlock_snapshot;
use super::{KeyOptions, NewKey, OpsError};

/// What a restore did.
#[derive(Debug)]
pub struct RestoreOutcome {
    pub header: Header,
    pub stats: RestoreStats,
}

/// Creates the volume `path` from snapshot `id` of `store`, under a new random DEK
/// wrapped by `target` (`None`: the snapshot's own master key): every chunk is decrypted
/// with the snapshot's DEK and re-encrypted with the new one. The restore writes every
/// chunk anyway, so this costs nothing, and it keeps the rule that every volume has its
/// own data key: two volumes sharing one would let whoever holds both files compare
/// their ciphertexts sector by sector (which sectors hold the same data). There is no
/// option to keep the snapshot's DEK. The manifest MAC and every chunk hash are verified. The volume is built
/// under `.FILE.partial` and renamed only when complete: on any error (or when the future
/// is dropped, e.g. on Ctrl-C) the partial file is removed; one left by a killed process
/// is removed by the next restore to the same name.
pub async fn restore_snapshot(
    store: &Store,
    id: &SnapshotId,
    path: &Path,
    keys: &KeyOptions,
    target: Option<NewKey<'_>>,
) -> Result<RestoreOutcome, OpsError> {
    if crate::volume::is_rbd_path(path) {
        return Err(super::not_on_rbd(path, "create --from-snapshot").into());
    }
    if path.exists() {
        return Err(VolumeError::AlreadyExists {
            path: path.display().to_string(),
        }
        .into());
    }
    let m = snapshot::restore::load_manifest(store, id).await?;
    let (dek, slot) = unlock_snapshot(&m, keys).await?;
    let uuid = uuid::Uuid::new_v4();
    let ctx = EncryptionContext::for_volume(&uuid);
    let svc = keys.service();
    let to = match target {
        Some(t) => t,
        None => slot_key(&m.keyslots[slot], keys)?,
    };
    let (new_dek, wrapped) = generate_for(keys, &svc, &to, &ctx).await?;
    let partial = partial_path(path);
    // symlink_metadata: a (dangling) symlink planted at the derived name is removed too;
    // the partial volume itself is then created with O_EXCL.
    if std::fs::symlink_metadata(&partial).is_ok() {
        tracing::info!(
            "removing {} left by an interrupted restore",
            partial.display()
        );
        std::fs::remove_file(&partial).map_err(|e| VolumeError::Io {
            path: partial.display().to_string(),
            source: e,
        })?;
    }
    let spec = VolumeSpec {
        size: m.volume_size,
        sector_size: m.sector_size,
    };
    let header = create_volume_with_dek(&partial, &spec, uuid, vec![wrapped], &new_dek)?;
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let vol = Arc::new(Volume::open(
        &partial,
        &header,
        new_dek,
        OpenOptions::default(),
    )?);
    let progress = Progress::new(format!("restore {id}"), m.volume_size);
    let stats = snapshot::restore_into(store, &m, &dek, Arc::clone(&vol), &progress).await?;
    drop(vol);
    publish_partial(&partial, path)?;
    guard.0 = None;
    Ok(RestoreOutcome { header, stats })
}
