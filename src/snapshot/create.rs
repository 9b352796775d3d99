//! Taking a snapshot: read each chunk from a [`ChunkSource`], encrypt it under the
//! volume's DEK at its own sector numbers (exactly the ciphertext the volume file holds
//! for it), upload what the store does not already hold, and write the manifest last.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::manifest::{self, chunk_hash, Manifest, SnapshotId, MANIFEST_VERSION};
use super::store::Store;
use super::{chunk_count, chunk_len, ChunkSet, ChunkSource, ChunkState, SnapshotError};
use super::{CHUNK_SIZE, PARALLEL_CHUNKS};
use crate::crypto::{Dek, SectorSize, XtsEngine};
use crate::keys::{EncryptionContext, WrappedDek};
use crate::progress::Progress;
use crate::volume::CIPHER;

/// Which snapshot a new one is incremental to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    /// The newest snapshot in the store of the same volume under the same data key.
    Auto,
    /// No parent (a full snapshot; chunks already in the store are still not re-uploaded).
    None,
    /// This snapshot (must be of the same volume geometry and data key).
    Id(SnapshotId),
}

/// Options of [`create_snapshot`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub parent: Parent,
    /// The chunks changed since the parent, as the daemon tracks them: chunks **not** in
    /// the set are taken from the parent's manifest without being read. `None`: every
    /// chunk is read (offline snapshots). Ignored (everything is read) without a usable
    /// parent.
    pub changed: Option<ChunkSet>,
    pub description: String,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            parent: Parent::Auto,
            changed: None,
            description: String::new(),
        }
    }
}

/// The volume a snapshot is taken of: its UUID and its header's keyslots, copied into the
/// manifest as they are (bound to the volume's encryption context).
#[derive(Debug, Clone)]
pub struct VolumeKeys {
    pub uuid: uuid::Uuid,
    pub keyslots: Vec<WrappedDek>,
}

/// What [`create_snapshot`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreateStats {
    pub id: String,
    pub parent: Option<String>,
    /// Chunks of the volume.
    pub chunks: u64,
    /// Chunks holding data (the rest are holes).
    pub data_chunks: u64,
    /// Chunks read from the source.
    pub read: u64,
    /// Chunks taken from the parent's manifest without reading.
    pub from_parent: u64,
    /// Chunks uploaded (the store did not have them).
    pub uploaded: u64,
    pub uploaded_bytes: u64,
}

/// One chunk's outcome.
enum Entry {
    Hole,
    Data {
        hash: String,
        uploaded: bool,
        read: bool,
    },
}

/// Reads chunk `index`, and encrypts it: `None` for a hole (unallocated or all-zero).
async fn read_encrypted(
    source: &Arc<dyn ChunkSource>,
    engine: &Arc<XtsEngine>,
    index: u64,
    len: usize,
    first_sector: u64,
) -> Result<Option<Vec<u8>>, SnapshotError> {
    let src = Arc::clone(source);
    let eng = Arc::clone(engine);
    tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, SnapshotError> {
        let mut buf = vec![0u8; len];
        match src.read_chunk(index, &mut buf)? {
            ChunkState::Hole => Ok(None),
            ChunkState::Data if buf.iter().all(|&b| b == 0) => Ok(None),
            ChunkState::Data => {
                eng.encrypt_sectors(&mut buf, first_sector)?;
                Ok(Some(buf))
            }
        }
    })
    .await
    .map_err(|e| SnapshotError::Internal(format!("chunk reader: {e}")))?
}

/// Uploads `data` as `hash` unless the store has it or this run already uploads it
/// (`seen`); returns whether it uploaded.
async fn upload_if_absent(
    store: &Store,
    hash: &str,
    data: Vec<u8>,
    seen: &Mutex<HashSet<String>>,
) -> Result<bool, SnapshotError> {
    let first = match seen.lock() {
        Ok(mut s) => s.insert(hash.to_string()),
        Err(p) => p.into_inner().insert(hash.to_string()),
    };
    if !first || store.has_chunk(hash).await? {
        return Ok(false);
    }
    store.put_chunk(hash, Bytes::from(data)).await?;
    Ok(true)
}

/// Loads and verifies snapshot `id` with `dek`.
#[cfg(test)]
pub(crate) async fn load_verified(
    store: &Store,
    id: &SnapshotId,
    dek: &Dek,
) -> Result<Manifest, SnapshotError> {
    let m = super::restore::load_manifest(store, id).await?;
    m.verify(dek)?;
    Ok(m)
}

/// The parent to use, verified with `dek`.
pub async fn resolve_parent(
    store: &Store,
    choice: &Parent,
    dek: &Dek,
    uuid: uuid::Uuid,
    size: u64,
    sector_size: u32,
) -> Result<Option<Manifest>, SnapshotError> {
    let same_geometry = |m: &Manifest| {
        m.volume_size == size && m.sector_size == sector_size && m.chunk_size == CHUNK_SIZE
    };
    match choice {
        Parent::None => Ok(None),
        Parent::Id(id) => {
            let m = super::restore::load_manifest(store, id).await?;
            let bad = |reason: &str| SnapshotError::BadParent {
                parent: id.to_string(),
                volume: uuid.to_string(),
                reason: reason.to_string(),
            };
            if !m.is_key(dek)? {
                return Err(bad("it is encrypted under another data key (a different volume, or a copy re-encrypted under another key)"));
            }
            m.verify(dek)?;
            if !same_geometry(&m) {
                return Err(bad(
                    "its size, sector size or chunk size differs from the volume's",
                ));
            }
            Ok(Some(m))
        }
        Parent::Auto => {
            let mut best: Option<Manifest> = None;
            for id in store.list_ids().await? {
                let m = match super::restore::load_manifest(store, &id).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("ignoring snapshot {id} as a parent: {e}");
                        continue;
                    }
                };
                if m.volume_uuid != uuid || !same_geometry(&m) || !m.is_key(dek)? {
                    continue;
                }
                if let Err(e) = m.verify(dek) {
                    tracing::warn!("ignoring snapshot {id} as a parent: {e}");
                    continue;
                }
                if best.as_ref().is_none_or(|b| m.created_at > b.created_at) {
                    best = Some(m);
                }
            }
            Ok(best)
        }
    }
}

/// Takes a snapshot of `source` into `store` and returns what it did. `dek` is the
/// volume's data key (the caller verified it against the volume's header) and `volume`
/// the volume's UUID and keyslots. Chunks the store already holds are not uploaded again
/// (so an interrupted run resumes where it stopped); with `opts.changed`, chunks outside
/// the set are taken from the parent without reading them. The manifest is written last:
/// until then the snapshot does not exist.
pub async fn create_snapshot(
    store: &Store,
    source: Arc<dyn ChunkSource>,
    dek: &Dek,
    volume: &VolumeKeys,
    opts: &CreateOptions,
    progress: &Progress,
) -> Result<CreateStats, SnapshotError> {
    let size = source.size();
    let sector_size = source.sector_size();
    check_description(&opts.description)?;
    let engine = Arc::new(XtsEngine::new(dek, SectorSize::try_from(sector_size)?)?);
    let parent = resolve_parent(store, &opts.parent, dek, volume.uuid, size, sector_size).await?;
    let id = SnapshotId::generate()?;
    // The snapshot's point in time: when it starts.
    let created_at = manifest::now();
    if let Some(p) = &parent {
        log_incremental(&id, volume, p, opts.changed.as_ref());
    }
    let run = ChunkRun {
        store,
        source,
        engine,
        size,
        sectors_per_chunk: u64::from(CHUNK_SIZE / sector_size.max(1)),
        changed: opts.changed.as_ref(),
        parent: parent.as_ref(),
    };
    let entries = run.entries(progress).await?;
    // Chunks this snapshot relies on without having uploaded them may have been removed
    // meanwhile by a `snapshot delete` of their last other user: check them (and the
    // parent's chunks if the parent itself is gone) and upload any that vanished.
    let parent_gone = match &parent {
        Some(p) => store.get_manifest(&p.id).await?.is_none(),
        None => false,
    };
    let mut stats = CreateStats {
        id: id.to_string(),
        parent: parent.as_ref().map(|p| p.id.to_string()),
        chunks: chunk_count(size, CHUNK_SIZE),
        data_chunks: 0,
        read: 0,
        from_parent: 0,
        uploaded: 0,
        uploaded_bytes: 0,
    };
    let chunks = run.chunk_list(entries, parent_gone, &mut stats).await?;
    let mut m = Manifest {
        version: MANIFEST_VERSION,
        id: id.clone(),
        volume_uuid: volume.uuid,
        volume_size: size,
        sector_size,
        chunk_size: CHUNK_SIZE,
        cipher: CIPHER.to_string(),
        chunks,
        parent: parent.map(|p| p.id),
        created_at,
        description: opts.description.clone(),
        encryption_context: EncryptionContext::for_volume(&volume.uuid),
        keyslots: volume.keyslots.clone(),
        key_check: [0; 32],
        mac: [0; 32],
    };
    m.seal(dek)?;
    store.put_manifest(&id, m.to_json()?).await?;
    progress.finish();
    Ok(stats)
}

/// Refuses a description longer than a manifest may hold.
fn check_description(description: &str) -> Result<(), SnapshotError> {
    if description.len() > manifest::MAX_DESCRIPTION {
        return Err(SnapshotError::Source(format!(
            "the description is longer than {} bytes",
            manifest::MAX_DESCRIPTION
        )));
    }
    Ok(())
}

/// Logs that snapshot `id` is incremental to `parent`.
fn log_incremental(
    id: &SnapshotId,
    volume: &VolumeKeys,
    parent: &Manifest,
    changed: Option<&ChunkSet>,
) {
    tracing::info!(
        "snapshot {id} of volume {}: incremental to {}{}",
        volume.uuid,
        parent.id,
        match changed {
            Some(c) => format!(" ({} changed chunks)", c.len()),
            None => String::new(),
        }
    );
}

/// One snapshot run's chunks: where they are read from, how they are encrypted, and
/// which ones come from the parent instead.
struct ChunkRun<'a> {
    store: &'a Store,
    source: Arc<dyn ChunkSource>,
    engine: Arc<XtsEngine>,
    size: u64,
    sectors_per_chunk: u64,
    changed: Option<&'a ChunkSet>,
    parent: Option<&'a Manifest>,
}

impl ChunkRun<'_> {
    /// Chunks not in the changed set come from the parent (when there is one): the
    /// parent's entry for chunk `i` (`None` inside for a hole), or `None` if it is read.
    fn inherited(&self, i: u64) -> Option<Option<[u8; 32]>> {
        match (self.changed, self.parent) {
            (Some(changed), Some(p)) if !changed.contains(&i) => Some(p.chunks.get(&i).copied()),
            _ => None,
        }
    }

    /// Reads and encrypts chunk `i`: `None` for a hole.
    async fn read(&self, i: u64) -> Result<Option<Vec<u8>>, SnapshotError> {
        let len = chunk_len(self.size, CHUNK_SIZE, i);
        read_encrypted(
            &self.source,
            &self.engine,
            i,
            len,
            i * self.sectors_per_chunk,
        )
        .await
    }

    /// Chunk `i`'s entry: taken from the parent, or read, encrypted and uploaded unless
    /// the store (or this run, `seen`) already has it.
    async fn entry(&self, i: u64, seen: &Mutex<HashSet<String>>) -> Result<Entry, SnapshotError> {
        Ok(match self.inherited(i) {
            Some(None) => Entry::Hole,
            Some(Some(h)) => Entry::Data {
                hash: hex::encode(h),
                uploaded: false,
                read: false,
            },
            None => match self.read(i).await? {
                None => Entry::Hole,
                Some(data) => {
                    let hash = chunk_hash(&data);
                    let uploaded = upload_if_absent(self.store, &hash, data, seen).await?;
                    Entry::Data {
                        hash,
                        uploaded,
                        read: true,
                    }
                }
            },
        })
    }

    /// Every chunk's entry in index order, [`PARALLEL_CHUNKS`] chunks at once.
    async fn entries(&self, progress: &Progress) -> Result<Vec<(u64, Entry)>, SnapshotError> {
        let seen = Mutex::new(HashSet::new());
        let seen = &seen;
        futures::stream::iter(0..chunk_count(self.size, CHUNK_SIZE))
            .map(|i| async move {
                let entry = self.entry(i, seen).await?;
                progress.advance(chunk_len(self.size, CHUNK_SIZE, i) as u64);
                Ok::<_, SnapshotError>((i, entry))
            })
            .buffered(PARALLEL_CHUNKS)
            .try_collect()
            .await
    }

    /// The manifest's chunk list from the entries, counted into `stats`; chunks that
    /// vanished from the store meanwhile are uploaded again ([`ChunkRun::ensure_stored`]).
    async fn chunk_list(
        &self,
        entries: Vec<(u64, Entry)>,
        parent_gone: bool,
        stats: &mut CreateStats,
    ) -> Result<BTreeMap<u64, [u8; 32]>, SnapshotError> {
        let mut chunks = BTreeMap::new();
        for (i, entry) in entries {
            let Entry::Data {
                hash,
                uploaded,
                read,
            } = entry
            else {
                if self.inherited(i).is_none() {
                    stats.read += 1;
                } else {
                    stats.from_parent += 1;
                }
                continue;
            };
            if read {
                stats.read += 1;
            } else {
                stats.from_parent += 1;
            }
            let Some((hash, uploaded)) = self
                .ensure_stored(i, hash, uploaded, read || parent_gone)
                .await?
            else {
                continue;
            };
            if uploaded {
                stats.uploaded += 1;
                stats.uploaded_bytes += chunk_len(self.size, CHUNK_SIZE, i) as u64;
            }
            stats.data_chunks += 1;
            let raw = manifest::from_hex32(&hash)
                .ok_or_else(|| SnapshotError::Internal(format!("bad hash {hash}")))?;
            chunks.insert(i, raw);
        }
        Ok(chunks)
    }

    /// Makes sure chunk `i` (named `hash`) is in the store: one this run did not upload
    /// may have been deleted meanwhile, so with `recheck` it is looked up and, if it
    /// vanished, read, encrypted and uploaded again. Returns its hash and whether it was
    /// uploaded, or `None` if it now reads as a hole.
    async fn ensure_stored(
        &self,
        i: u64,
        hash: String,
        uploaded: bool,
        recheck: bool,
    ) -> Result<Option<(String, bool)>, SnapshotError> {
        if uploaded || !recheck || self.store.has_chunk(&hash).await? {
            return Ok(Some((hash, uploaded)));
        }
        tracing::warn!(
            "chunk {i} ({hash}) vanished from the store during the snapshot; uploading it again"
        );
        let Some(data) = self.read(i).await? else {
            return Ok(None);
        };
        let hash = chunk_hash(&data);
        self.store.put_chunk(&hash, Bytes::from(data)).await?;
        Ok(Some((hash, true)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifest::tests::dek;
    use super::*;
    use std::sync::Mutex;

    /// An in-memory source that records which chunks were read.
    pub(crate) struct MemSource {
        pub data: Mutex<Vec<u8>>,
        pub reads: Mutex<Vec<u64>>,
        pub unallocated: Vec<u64>,
    }

    impl ChunkSource for MemSource {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn sector_size(&self) -> u32 {
            4096
        }
        fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<ChunkState, SnapshotError> {
            self.reads.lock().unwrap().push(index);
            if self.unallocated.contains(&index) {
                return Ok(ChunkState::Hole);
            }
            let d = self.data.lock().unwrap();
            let start = (index * u64::from(CHUNK_SIZE)) as usize;
            buf.copy_from_slice(&d[start..start + buf.len()]);
            Ok(ChunkState::Data)
        }
    }

    fn keys() -> VolumeKeys {
        VolumeKeys {
            uuid: uuid::Uuid::from_bytes([3; 16]),
            keyslots: vec![WrappedDek {
                backend: "local".into(),
                key_id: "mk-x".into(),
                blob: vec![9; 8],
                context: EncryptionContext::for_volume(&uuid::Uuid::from_bytes([3; 16])),
                params: Default::default(),
            }],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn incremental_with_a_changed_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), true).unwrap();
        let k = dek(5);
        // 8 chunks: chunk 2 all zero, chunk 6 unallocated, the rest data.
        let cs = CHUNK_SIZE as usize;
        let mut data = vec![0u8; 8 * cs];
        for (i, b) in data.iter_mut().enumerate() {
            if i / cs != 2 {
                *b = (i % 251) as u8 + 1;
            }
        }
        let src = Arc::new(MemSource {
            data: Mutex::new(data),
            reads: Mutex::new(Vec::new()),
            unallocated: vec![6],
        });
        let s1 = create_snapshot(
            &store,
            src.clone(),
            &k,
            &keys(),
            &CreateOptions::default(),
            &Progress::hidden(0),
        )
        .await
        .unwrap();
        assert_eq!(s1.parent, None);
        assert_eq!(
            (s1.chunks, s1.data_chunks, s1.uploaded, s1.read),
            (8, 6, 6, 8)
        );
        assert_eq!(store.list_chunks().await.unwrap().len(), 6);
        // The stored bytes are the XTS ciphertext at the chunk's own sectors.
        let id1 = SnapshotId::parse(&s1.id).unwrap();
        let m1 = load_verified(&store, &id1, &k).await.unwrap();
        let c3 = store
            .get_chunk(&m1.chunk_name(3).unwrap())
            .await
            .unwrap()
            .unwrap();
        let mut expect = src.data.lock().unwrap()[3 * cs..4 * cs].to_vec();
        XtsEngine::new(&k, SectorSize::S4096)
            .unwrap()
            .encrypt_sectors(&mut expect, 3 * 128)
            .unwrap();
        assert_eq!(&c3[..], &expect[..]);
        assert!(m1.chunk_name(2).is_none() && m1.chunk_name(6).is_none());

        // Change chunk 1 and 4, tell the snapshot only about chunk 1 and 2: chunk 4 is
        // taken from the parent (not read), chunk 2 is read (still zero: a hole).
        {
            let mut d = src.data.lock().unwrap();
            d[cs + 7] ^= 0xff;
            d[4 * cs] ^= 0xff;
        }
        src.reads.lock().unwrap().clear();
        let opts = CreateOptions {
            changed: Some([1u64, 2].into_iter().collect()),
            ..Default::default()
        };
        let s2 = create_snapshot(
            &store,
            src.clone(),
            &k,
            &keys(),
            &opts,
            &Progress::hidden(0),
        )
        .await
        .unwrap();
        assert_eq!(s2.parent.as_deref(), Some(s1.id.as_str()));
        let mut reads = src.reads.lock().unwrap().clone();
        reads.sort();
        assert_eq!(reads, vec![1, 2]);
        assert_eq!((s2.read, s2.from_parent, s2.uploaded), (2, 6, 1));
        let m2 = load_verified(&store, &SnapshotId::parse(&s2.id).unwrap(), &k)
            .await
            .unwrap();
        assert_ne!(m2.chunks[&1], m1.chunks[&1]);
        assert_eq!(m2.chunks[&4], m1.chunks[&4]);
        assert_eq!(m2.parent.as_ref(), Some(&id1));

        // A full re-read finds chunk 4 changed too; only changed chunks are uploaded.
        src.reads.lock().unwrap().clear();
        let s3 = create_snapshot(
            &store,
            src.clone(),
            &k,
            &keys(),
            &CreateOptions::default(),
            &Progress::hidden(0),
        )
        .await
        .unwrap();
        assert_eq!(s3.parent.as_deref(), Some(s2.id.as_str()));
        assert_eq!((s3.read, s3.uploaded), (8, 1));
        assert_eq!(store.list_chunks().await.unwrap().len(), 8);

        // Another key cannot be a parent.
        let bad = CreateOptions {
            parent: Parent::Id(id1.clone()),
            ..Default::default()
        };
        let e = create_snapshot(
            &store,
            src.clone(),
            &dek(9),
            &keys(),
            &bad,
            &Progress::hidden(0),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, SnapshotError::BadParent { .. }), "{e}");
    }
}
