//! Snapshots that stay encrypted: a volume's data area cut into fixed-size chunks, each
//! stored **still encrypted under the volume's DEK** (the XTS ciphertext the volume file
//! holds for it) in an object store and named by the SHA-256 of its bytes, plus a
//! manifest (geometry, chunk list, parent, wrapped DEK keyslots) authenticated with a
//! DEK-derived MAC. See docs/format.md ("Snapshots") for the byte-level format.
//!
//! - [`store`]: the object store (`file:///path`, a plain path, or `s3://bucket/prefix`)
//!   and the object layout (`chunks/<aa>/<sha256>`, `snapshots/<id>.json`).
//! - [`manifest`]: the manifest, its canonical MAC input, key check value and verification.
//! - [`create`]: [`create_snapshot`] over any [`ChunkSource`] (an offline [`Volume`], or a
//!   daemon's copy-before-write view of a served one), incremental against a parent.
//! - [`restore`]: writing a snapshot into a new volume, copying a snapshot between stores
//!   (as is, or re-encrypted under another DEK), deleting with reference counting.
//!
//! This module never sees master keys: callers (`ops/snapshots.rs`, `ops/restore.rs`) unwrap the DEK from the
//! manifest's keyslots and hand it in.

use std::collections::BTreeSet;

use crate::crypto::CryptoError;
use crate::volume::{Volume, VolumeError};

pub mod create;
pub mod manifest;
pub mod restore;
pub mod store;

pub use create::{create_snapshot, resolve_parent, CreateOptions, CreateStats, Parent, VolumeKeys};
pub use manifest::{Manifest, SnapshotId, CONTEXT_SNAPSHOT_ID, MANIFEST_VERSION};
pub use restore::{
    collect_garbage, copy_as_is, copy_reencrypt, delete_snapshot, list_snapshots, load_manifest,
    restore_into, CopyStats, DeleteStats, NewSnapshotKey, RestoreStats,
};
pub use store::{default_store, Store};

/// Bytes of volume data per chunk (as EBS: 512 KiB).
pub const CHUNK_SIZE: u32 = 512 * 1024;

/// Chunks read, encrypted and uploaded (or downloaded) at once.
pub(crate) const PARALLEL_CHUNKS: usize = 4;

/// What a chunk of the volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Never written (unallocated): reads as zeros; recorded as a hole, not stored.
    Hole,
    /// The buffer holds the chunk's plaintext.
    Data,
}

/// Where a snapshot's data comes from: an offline [`Volume`] (this module), or the
/// daemon's view of a served volume at the snapshot's point in time (copy-before-write).
/// Called from blocking threads, several chunks at once.
pub trait ChunkSource: Send + Sync {
    /// Volume size in bytes.
    fn size(&self) -> u64;
    /// Sector size (the XTS data unit) in bytes.
    fn sector_size(&self) -> u32;
    /// Reads chunk `index` (volume bytes `index × CHUNK_SIZE ..`, `buf.len()` bytes: the
    /// chunk size, shorter for the last chunk) as plaintext into `buf`, or reports that
    /// it is wholly unallocated ([`ChunkState::Hole`], `buf` then unspecified).
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<ChunkState, SnapshotError>;
}

impl ChunkSource for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn sector_size(&self) -> u32 {
        Volume::sector_size(self)
    }
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<ChunkState, SnapshotError> {
        crate::volume::snapshot_test_delay();
        let offset = index
            .checked_mul(u64::from(CHUNK_SIZE))
            .ok_or(SnapshotError::Internal("chunk offset overflows".into()))?;
        let extents = self.extents(offset, buf.len() as u64)?;
        if !extents.is_empty() && extents.iter().all(|e| !e.allocated) {
            return Ok(ChunkState::Hole);
        }
        self.read_at(buf, offset)?;
        Ok(ChunkState::Data)
    }
}

/// A served volume's point-in-time view (copy-before-write) as a snapshot source.
impl ChunkSource for crate::volume::SnapshotView {
    fn size(&self) -> u64 {
        crate::volume::SnapshotView::size(self)
    }
    fn sector_size(&self) -> u32 {
        crate::volume::SnapshotView::sector_size(self)
    }
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<ChunkState, SnapshotError> {
        if crate::volume::SnapshotView::read_chunk(self, index, buf)? {
            Ok(ChunkState::Data)
        } else {
            Ok(ChunkState::Hole)
        }
    }
}

/// Number of chunks of a volume of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size.max(1)))
}

/// Length of chunk `index` (the last one may be shorter).
pub fn chunk_len(size: u64, chunk_size: u32, index: u64) -> usize {
    let cs = u64::from(chunk_size);
    let start = index.saturating_mul(cs);
    size.saturating_sub(start).min(cs) as usize
}

/// A set of chunk indexes (changed chunks, as the daemon tracks them).
pub type ChunkSet = BTreeSet<u64>;

/// Errors of the snapshot layer.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid snapshot store {spec:?}: {reason}")]
    BadStore { spec: String, reason: String },
    #[error("snapshot store {store}: {op}: {source}")]
    Store {
        store: String,
        op: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "invalid snapshot id {0:?}: snapshot ids look like snap-0123456789abcdef0 (17 hex digits)"
    )]
    BadId(String),
    #[error("snapshot store {store}: object {object} is {len} bytes, more than any {what} can be ({max} bytes): it is not one cryptvol wrote (damage or tampering)")]
    ObjectTooLarge {
        store: String,
        object: String,
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("snapshot {id} not found in store {store} (cryptvol snapshot list --store {store})")]
    NotFound { id: String, store: String },
    #[error("snapshot {id}: invalid manifest: {reason}")]
    BadManifest { id: String, reason: String },
    #[error("snapshot {id}: wrong key: the data key unwrapped from the manifest's keyslot is not this snapshot's (key check failed)")]
    WrongKey { id: String },
    #[error("snapshot {id}: manifest authentication failed: the manifest was modified after it was written (tampering or corruption); do not restore from it")]
    ManifestTampered { id: String },
    #[error("snapshot {id}: chunk {index} (object {object}) is missing from store {store}; the snapshot cannot be restored from this store")]
    ChunkMissing {
        id: String,
        index: u64,
        object: String,
        store: String,
    },
    #[error("snapshot {id}: chunk {index} (object {object}) does not match its SHA-256 name: it was modified in the store (tampering or corruption)")]
    ChunkCorrupt {
        id: String,
        index: u64,
        object: String,
    },
    #[error("parent snapshot {parent} cannot be used for {volume}: {reason}")]
    BadParent {
        parent: String,
        volume: String,
        reason: String,
    },
    #[error("snapshot source: {0}")]
    Source(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("internal error: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_arithmetic() {
        assert_eq!(chunk_count(0, CHUNK_SIZE), 0);
        assert_eq!(chunk_count(1 << 20, CHUNK_SIZE), 2);
        assert_eq!(chunk_count((1 << 20) + 4096, CHUNK_SIZE), 3);
        assert_eq!(chunk_len((1 << 20) + 4096, CHUNK_SIZE, 2), 4096);
        assert_eq!(
            chunk_len((1 << 20) + 4096, CHUNK_SIZE, 1),
            CHUNK_SIZE as usize
        );
        assert_eq!(chunk_len(1 << 20, CHUNK_SIZE, 2), 0);
    }
}
