//! Reading snapshots back: listing, restoring into a volume, copying between stores (as
//! is, or re-encrypted under another data key), and deleting with reference counting.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::manifest::{self, chunk_hash, snapshot_context, Manifest, SnapshotId};
use super::store::Store;
use super::{SnapshotError, PARALLEL_CHUNKS};
use crate::crypto::{Dek, SectorSize, XtsEngine};
use crate::keys::{EncryptionContext, WrappedDek};
use crate::progress::Progress;
use crate::volume::Volume;

/// Loads and structurally validates snapshot `id` (no key needed).
pub async fn load_manifest(store: &Store, id: &SnapshotId) -> Result<Manifest, SnapshotError> {
    let bytes = store
        .get_manifest(id)
        .await?
        .ok_or_else(|| SnapshotError::NotFound {
            id: id.to_string(),
            store: store.url().to_string(),
        })?;
    Manifest::parse(id, &bytes)
}

/// Every readable snapshot of the store, oldest first. Unreadable manifests are logged
/// and skipped.
pub async fn list_snapshots(store: &Store) -> Result<Vec<Manifest>, SnapshotError> {
    let mut out = Vec::new();
    for id in store.list_ids().await? {
        match load_manifest(store, &id).await {
            Ok(m) => out.push(m),
            Err(SnapshotError::NotFound { .. }) => {}
            Err(e) => tracing::warn!("skipping snapshot {id}: {e}"),
        }
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Fetches chunk `index` of `m` from `store` and checks it against its SHA-256 name.
async fn fetch_verified(
    store: &Store,
    m: &Manifest,
    index: u64,
) -> Result<Option<Bytes>, SnapshotError> {
    let Some(name) = m.chunk_name(index) else {
        return Ok(None);
    };
    let data = store
        .get_chunk(&name)
        .await?
        .ok_or_else(|| SnapshotError::ChunkMissing {
            id: m.id.to_string(),
            index,
            object: Store::chunk_object(&name),
            store: store.url().to_string(),
        })?;
    if data.len() != m.chunk_len(index) || chunk_hash(&data) != name {
        return Err(SnapshotError::ChunkCorrupt {
            id: m.id.to_string(),
            index,
            object: Store::chunk_object(&name),
        });
    }
    Ok(Some(data))
}

/// What a restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreStats {
    pub chunks: u64,
    pub data_chunks: u64,
    pub bytes_written: u64,
}

/// Writes snapshot `m` (verified with `dek`, its data key) into `target`, a freshly
/// created volume of the same size and sector size: every chunk is fetched, checked
/// against its hash, decrypted and written through the volume (so it is encrypted under
/// the volume's own DEK, whichever it is). Holes are left unwritten where the volume
/// already reads them as zeros (unallocated), and zeroed otherwise.
pub async fn restore_into(
    store: &Store,
    m: &Manifest,
    dek: &Dek,
    target: Arc<Volume>,
    progress: &Progress,
) -> Result<RestoreStats, SnapshotError> {
    if target.size() != m.volume_size || target.sector_size() != m.sector_size {
        return Err(SnapshotError::Source(format!(
            "the target volume ({} bytes, {}-byte sectors) does not match snapshot {} ({} bytes, {}-byte sectors)",
            target.size(),
            target.sector_size(),
            m.id,
            m.volume_size,
            m.sector_size
        )));
    }
    let engine = Arc::new(XtsEngine::new(dek, SectorSize::try_from(m.sector_size)?)?);
    let cs = u64::from(m.chunk_size);
    let stats: Vec<u64> = futures::stream::iter(0..m.chunk_count())
        .map(|i| {
            let engine = Arc::clone(&engine);
            let target = Arc::clone(&target);
            async move {
                let len = m.chunk_len(i);
                let offset = i * cs;
                let data = fetch_verified(store, m, i).await?;
                let first = m.first_sector(i);
                let written = tokio::task::spawn_blocking(move || -> Result<u64, SnapshotError> {
                    crate::volume::snapshot_test_delay();
                    match data {
                        Some(cipher) => {
                            let mut buf = cipher.to_vec();
                            engine.decrypt_sectors(&mut buf, first)?;
                            target.write_at(&buf, offset, false)?;
                            Ok(1)
                        }
                        None => {
                            let ext = target.extents(offset, len as u64)?;
                            for e in ext.iter().filter(|e| e.allocated) {
                                target.write_zeroes(e.offset, e.len, false)?;
                            }
                            Ok(0)
                        }
                    }
                })
                .await
                .map_err(|e| SnapshotError::Internal(format!("chunk writer: {e}")))??;
                progress.advance(len as u64);
                Ok::<_, SnapshotError>(written)
            }
        })
        .buffer_unordered(PARALLEL_CHUNKS)
        .try_collect()
        .await?;
    let t = Arc::clone(&target);
    tokio::task::spawn_blocking(move || t.flush())
        .await
        .map_err(|e| SnapshotError::Internal(format!("flush: {e}")))??;
    progress.finish();
    let data_chunks = stats.iter().sum::<u64>();
    Ok(RestoreStats {
        chunks: m.chunk_count(),
        data_chunks,
        bytes_written: m.chunks.keys().map(|&i| m.chunk_len(i) as u64).sum(),
    })
}

/// What a copy did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyStats {
    pub id: String,
    pub chunks_copied: u64,
    pub chunks_present: u64,
    pub reencrypted: bool,
}

/// Copies snapshot `id` from `from` to `to` as it is (same id, same keyslots, same
/// bytes): only chunks the target lacks are transferred, each checked against its hash.
/// No key is needed. The manifest is written last.
pub async fn copy_as_is(
    from: &Store,
    to: &Store,
    id: &SnapshotId,
    progress: &Progress,
) -> Result<CopyStats, SnapshotError> {
    let raw = from
        .get_manifest(id)
        .await?
        .ok_or_else(|| SnapshotError::NotFound {
            id: id.to_string(),
            store: from.url().to_string(),
        })?;
    let m = Manifest::parse(id, &raw)?;
    let copied: Vec<bool> = futures::stream::iter(m.chunks.keys().copied())
        .map(|i| {
            let m = &m;
            async move {
                let len = m.chunk_len(i) as u64;
                let name = m.chunk_name(i).unwrap_or_default();
                let copied = if to.has_chunk(&name).await? {
                    false
                } else {
                    let data = fetch_verified(from, m, i).await?.unwrap_or_default();
                    to.put_chunk(&name, data).await?;
                    true
                };
                progress.advance(len);
                Ok::<_, SnapshotError>(copied)
            }
        })
        .buffer_unordered(PARALLEL_CHUNKS)
        .try_collect()
        .await?;
    to.put_manifest(id, raw.to_vec()).await?;
    progress.finish();
    let n = copied.iter().filter(|c| **c).count() as u64;
    Ok(CopyStats {
        id: id.to_string(),
        chunks_copied: n,
        chunks_present: copied.len() as u64 - n,
        reencrypted: false,
    })
}

/// The identity and key of a re-encrypted copy (Debug leaves the key out).
pub struct NewSnapshotKey<'a> {
    /// The copy's id (chosen first: the keyslots are bound to it).
    pub id: SnapshotId,
    /// The copy's data key.
    pub dek: &'a Dek,
    /// `dek` wrapped, bound to [`snapshot_context`]`(id)`.
    pub keyslots: Vec<WrappedDek>,
}

impl std::fmt::Debug for NewSnapshotKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSnapshotKey")
            .field("id", &self.id)
            .field("keyslots", &self.keyslots)
            .finish_non_exhaustive()
    }
}

/// Copies snapshot `m` (verified with `old_dek`) from `from` to `to` as a new snapshot
/// `new.id` under another data key `new.dek`: every chunk is fetched, checked, decrypted
/// and encrypted again (at the same sector numbers). The keyslots must be bound to the
/// copy's own encryption context. The copy has no parent. The manifest is written last.
pub async fn copy_reencrypt(
    from: &Store,
    m: &Manifest,
    old_dek: &Dek,
    to: &Store,
    new: NewSnapshotKey<'_>,
    progress: &Progress,
) -> Result<CopyStats, SnapshotError> {
    let NewSnapshotKey {
        id: new_id,
        dek: new_dek,
        keyslots,
    } = new;
    let new_id = &new_id;
    let ctx = snapshot_context(new_id);
    check_copy_keyslots(&keyslots, &ctx)?;
    let sector_size = SectorSize::try_from(m.sector_size)?;
    let engines = Reencryption {
        old: Arc::new(XtsEngine::new(old_dek, sector_size)?),
        new: Arc::new(XtsEngine::new(new_dek, sector_size)?),
    };
    let results: Vec<(u64, Option<String>, bool)> = futures::stream::iter(m.chunks.keys().copied())
        .map(|i| {
            let engines = &engines;
            async move {
                let res = engines.copy_chunk(from, m, i, to).await?;
                progress.advance(m.chunk_len(i) as u64);
                Ok::<_, SnapshotError>(res)
            }
        })
        .buffer_unordered(PARALLEL_CHUNKS)
        .try_collect()
        .await?;
    let (chunks, copied) = reencrypted_chunk_list(&results)?;
    let mut copy = Manifest {
        id: new_id.clone(),
        chunks,
        parent: None,
        created_at: manifest::now(),
        encryption_context: ctx,
        keyslots,
        key_check: [0; 32],
        mac: [0; 32],
        ..m.clone()
    };
    copy.seal(new_dek)?;
    to.put_manifest(new_id, copy.to_json()?).await?;
    progress.finish();
    Ok(CopyStats {
        id: new_id.to_string(),
        chunks_copied: copied,
        chunks_present: results.len() as u64 - copied,
        reencrypted: true,
    })
}

/// Refuses keyslots of a re-encrypted copy that are missing or not bound to the copy's
/// own context `ctx`.
fn check_copy_keyslots(
    keyslots: &[WrappedDek],
    ctx: &EncryptionContext,
) -> Result<(), SnapshotError> {
    if keyslots.is_empty() || keyslots.iter().any(|s| s.context != *ctx) {
        return Err(SnapshotError::Internal(
            "keyslots of a re-encrypted copy must be bound to the copy's context".into(),
        ));
    }
    Ok(())
}

/// The two ciphers of a re-encrypting copy.
struct Reencryption {
    old: Arc<XtsEngine>,
    new: Arc<XtsEngine>,
}

impl Reencryption {
    /// Copies chunk `i` of `m` from `from` to `to` under the new key: its index, its new
    /// hash (`None` if it decrypts to zeros: a hole), and whether it was uploaded (the
    /// store did not have it).
    async fn copy_chunk(
        &self,
        from: &Store,
        m: &Manifest,
        i: u64,
        to: &Store,
    ) -> Result<(u64, Option<String>, bool), SnapshotError> {
        let data = fetch_verified(from, m, i).await?.unwrap_or_default();
        let Some(buf) = self.reencrypt(data, m.first_sector(i)).await? else {
            return Ok((i, None, false));
        };
        let hash = chunk_hash(&buf);
        let uploaded = if to.has_chunk(&hash).await? {
            false
        } else {
            to.put_chunk(&hash, Bytes::from(buf)).await?;
            true
        };
        Ok((i, Some(hash), uploaded))
    }

    /// Decrypts a chunk's stored bytes with the old key and encrypts them with the new one
    /// at the same sector numbers (from `first`), on a blocking thread: `None` if the
    /// plaintext is all zeros.
    async fn reencrypt(&self, data: Bytes, first: u64) -> Result<Option<Vec<u8>>, SnapshotError> {
        let (old, new) = (Arc::clone(&self.old), Arc::clone(&self.new));
        tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, SnapshotError> {
            let mut buf = data.to_vec();
            old.decrypt_sectors(&mut buf, first)?;
            if buf.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            new.encrypt_sectors(&mut buf, first)?;
            Ok(Some(buf))
        })
        .await
        .map_err(|e| SnapshotError::Internal(format!("re-encryption: {e}")))?
    }
}

/// The copy's chunk list from the per-chunk results, and how many chunks were uploaded.
fn reencrypted_chunk_list(
    results: &[(u64, Option<String>, bool)],
) -> Result<(BTreeMap<u64, [u8; 32]>, u64), SnapshotError> {
    let mut chunks = BTreeMap::new();
    let mut copied = 0;
    for (i, hash, uploaded) in results {
        if let Some(h) = hash {
            let raw = manifest::from_hex32(h)
                .ok_or_else(|| SnapshotError::Internal(format!("bad hash {h}")))?;
            chunks.insert(*i, raw);
        }
        copied += u64::from(*uploaded);
    }
    Ok((chunks, copied))
}

/// What a delete did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeleteStats {
    pub chunks_deleted: u64,
    /// Chunks of the snapshot kept because another snapshot uses them.
    pub chunks_kept: u64,
}

/// Deletes snapshot `id`: its manifest first (the snapshot disappears at once), then
/// every chunk it references that no other snapshot in the store references. If another
/// manifest cannot be read, no chunk is deleted (they may be its), and the error is
/// returned after the manifest is gone.
pub async fn delete_snapshot(store: &Store, id: &SnapshotId) -> Result<DeleteStats, SnapshotError> {
    let m = load_manifest(store, id).await?;
    store.delete_manifest(id).await?;
    let mut used: HashSet<[u8; 32]> = HashSet::new();
    for other in store.list_ids().await? {
        if &other == id {
            continue;
        }
        match load_manifest(store, &other).await {
            Ok(o) => used.extend(o.chunks.values().copied()),
            Err(SnapshotError::NotFound { .. }) => {}
            Err(e) => {
                return Err(SnapshotError::BadManifest {
                    id: other.to_string(),
                    reason: format!(
                        "cannot tell which chunks it uses, so no chunk of deleted snapshot {id} was removed: {e}"
                    ),
                })
            }
        }
    }
    let mut stats = DeleteStats::default();
    let mut mine: Vec<[u8; 32]> = m.chunks.values().copied().collect();
    mine.sort();
    mine.dedup();
    for h in mine {
        if used.contains(&h) {
            stats.chunks_kept += 1;
        } else {
            store.delete_chunk(&hex::encode(h)).await?;
            stats.chunks_deleted += 1;
        }
    }
    Ok(stats)
}

/// Deletes every chunk no manifest references (left by interrupted snapshots, or by a
/// deleted manifest that could not be read). Refuses when a manifest cannot be read.
/// **Do not run it while a snapshot is being created or copied into the same store**:
/// that snapshot's chunks are unreferenced until its manifest is written.
pub async fn collect_garbage(store: &Store) -> Result<DeleteStats, SnapshotError> {
    let mut used: HashSet<String> = HashSet::new();
    for id in store.list_ids().await? {
        match load_manifest(store, &id).await {
            Ok(m) => used.extend(m.chunks.values().map(hex::encode)),
            Err(SnapshotError::NotFound { .. }) => {}
            Err(e) => {
                return Err(SnapshotError::BadManifest {
                    id: id.to_string(),
                    reason: format!(
                        "cannot tell which chunks it uses, so nothing was collected: {e}"
                    ),
                })
            }
        }
    }
    let mut stats = DeleteStats::default();
    for h in store.list_chunks().await? {
        if used.contains(&h) {
            stats.chunks_kept += 1;
        } else {
            store.delete_chunk(&h).await?;
            stats.chunks_deleted += 1;
        }
    }
    Ok(stats)
}
