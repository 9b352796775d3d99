//! The key handling around the snapshot layer (`src/snapshot/`): taking a snapshot of a
//! volume file offline ([`snapshot_create`]) or of a served volume's point-in-time view
//! ([`snapshot_served`]), and copying one between stores, as it is or under another key
//! ([`snapshot_copy`]).

use std::path::Path;
use std::sync::Arc;

use crate::crypto::Dek;
use crate::keys::{KeyError, KeyOp};
use crate::progress::Progress;
use crate::snapshot::{self, CopyStats, CreateStats, Manifest, SnapshotId, Store, VolumeKeys};
use crate::volume::{self, OpenOptions, SnapshotView, Volume, VolumeError};

use super::key_choice::{generate_for, same_master_key};
use super::unlock::{unlock_dek, unlock_snapshot, warn_health};
use super::{KeyOptions, NewKey, OpsError};

/// A copy of a DEK (the type is deliberately not `Clone`).
fn dek_copy(dek: &Dek) -> Result<Dek, OpsError> {
    Ok(Dek::from_slice(dek.expose()).map_err(KeyError::from)?)
}

/// Takes an offline snapshot of the volume file at `path` into `store`. The volume is
/// opened read-only, which its open lock refuses while a `cryptvol serve` has it open for
/// writing (and which keeps writers out until the snapshot is done).
pub async fn snapshot_create(
    path: &Path,
    keys: &KeyOptions,
    store: &Store,
    opts: &snapshot::CreateOptions,
) -> Result<CreateStats, OpsError> {
    let (header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    let order: Vec<usize> = (0..header.keyslots.len()).collect();
    let (dek, _) = unlock_dek(path, &header, keys, KeyOp::Unwrap, &order).await?;
    let ro = OpenOptions {
        read_only: true,
        discard: false,
        ..OpenOptions::default()
    };
    let vol = match Volume::open(path, &header, dek_copy(&dek)?, ro) {
        Ok(v) => v,
        Err(VolumeError::InUse { path }) => return Err(OpsError::VolumeServed { path }),
        Err(e) => return Err(e.into()),
    };
    let progress = Progress::new(format!("snapshot {}", path.display()), header.size);
    let vk = VolumeKeys {
        uuid: header.uuid,
        keyslots: header.keyslots.clone(),
    };
    Ok(snapshot::create_snapshot(store, Arc::new(vol), &dek, &vk, opts, &progress).await?)
}

/// Takes a snapshot of a served volume from its point-in-time `view` (the daemon's
/// `snapshot` control request). The parent is the newest snapshot of the volume in the
/// store (or `parent`: an id, or "none"); when the volume's changed-chunk tracking is
/// relative to that parent, only the changed chunks are read. On success the tracking
/// restarts from this snapshot.
pub async fn snapshot_served(
    volume: &Volume,
    view: SnapshotView,
    store: &str,
    description: &str,
    parent: Option<&str>,
    progress: &Progress,
) -> Result<CreateStats, OpsError> {
    let store = Store::open(store, true)?;
    let dek = volume.data_key()?;
    let path = Path::new(volume.path());
    let (header, _) = volume::read_header(path)?;
    let choice = match parent {
        None => snapshot::Parent::Auto,
        Some("none") => snapshot::Parent::None,
        Some(id) => snapshot::Parent::Id(SnapshotId::parse(id)?),
    };
    let found = snapshot::resolve_parent(
        &store,
        &choice,
        &dek,
        header.uuid,
        volume.size(),
        volume.sector_size(),
    )
    .await?;
    let (parent, changed) = parent_and_changes(found.as_ref(), &view, path);
    let view = Arc::new(view);
    let keys = VolumeKeys {
        uuid: header.uuid,
        keyslots: header.keyslots.clone(),
    };
    let opts = snapshot::CreateOptions {
        parent,
        changed,
        description: description.to_string(),
    };
    let stats =
        snapshot::create_snapshot(&store, view.clone(), &dek, &keys, &opts, progress).await?;
    view.completed(&stats.id)?;
    Ok(stats)
}

/// The parent of a served volume's snapshot (the one found, else none) and, when the
/// volume's changed-chunk tracking is relative to that parent, the chunks changed since.
fn parent_and_changes(
    found: Option<&Manifest>,
    view: &SnapshotView,
    path: &Path,
) -> (snapshot::Parent, Option<snapshot::ChunkSet>) {
    let Some(m) = found else {
        return (snapshot::Parent::None, None);
    };
    let changed = view
        .changed_since(&m.id.to_string())
        .map(|v| v.into_iter().collect::<snapshot::ChunkSet>());
    match &changed {
        Some(c) => {
            tracing::info!(path = %path.display(), parent = %m.id, changed = c.len(), "incremental snapshot from changed-chunk tracking")
        }
        None => {
            tracing::info!(path = %path.display(), parent = %m.id, "no changed-chunk tracking relative to the parent: reading every chunk (only changed ones are uploaded)")
        }
    }
    (snapshot::Parent::Id(m.id.clone()), changed)
}

/// Copies snapshot `id` from `from` to `to`. Without `target` (or with the snapshot's own
/// master key) the snapshot is copied as it is: same id, same keyslots, no key needed
/// without `target`. With another key the copy is a new snapshot (new id, no parent)
/// under a new DEK wrapped by that key and bound to the copy's own encryption context
/// (`cryptvol:snapshot-id`), every chunk re-encrypted.
pub async fn snapshot_copy(
    from: &Store,
    id: &SnapshotId,
    to: &Store,
    keys: &KeyOptions,
    target: Option<NewKey<'_>>,
) -> Result<CopyStats, OpsError> {
    let m = snapshot::restore::load_manifest(from, id).await?;
    let total: u64 = m.chunks.keys().map(|&i| m.chunk_len(i) as u64).sum();
    let progress = Progress::new(format!("copy {id}"), total);
    let Some(target) = target else {
        return Ok(snapshot::copy_as_is(from, to, id, &progress).await?);
    };
    let (dek, slot) = unlock_snapshot(&m, keys).await?;
    if same_master_key(&target, &m.keyslots[slot], keys) {
        return Ok(snapshot::copy_as_is(from, to, id, &progress).await?);
    }
    let new_id = SnapshotId::generate()?;
    let ctx = snapshot::manifest::snapshot_context(&new_id);
    let svc = keys.service();
    let (new_dek, wrapped) = generate_for(keys, &svc, &target, &ctx).await?;
    let new = snapshot::NewSnapshotKey {
        id: new_id,
        dek: &new_dek,
        keyslots: vec![wrapped],
    };
    Ok(snapshot::copy_reencrypt(from, &m, &dek, to, new, &progress).await?)
}
