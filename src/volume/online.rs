//! Online operations on an open volume: re-encryption under a new DEK (watermark,
//! hotzone) and point-in-time snapshot views (copy-before-write, changed-chunk
//! tracking). API first; the implementation lands with issue 8/9 work.

use std::sync::Arc;

use super::{Volume, VolumeError};
use crate::crypto::Dek;
use crate::keys::WrappedDek;

/// Progress of a re-encryption in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReencryptStatus {
    /// Bytes of the data area already under the new key (`[0, watermark)`).
    pub watermark: u64,
    /// Size of the data area.
    pub size: u64,
}

impl Volume {
    /// `Some` while a re-encryption is in progress (also after a restart, until done).
    pub fn reencrypt_status(&self) -> Option<ReencryptStatus> {
        None
    }

    /// Starts re-encrypting the volume under `new_dek`, whose wrapped copies (bound to
    /// this volume's encryption context) are `new_keyslots`. Crash-safe header update;
    /// refuses when one is already in progress or the volume is read-only.
    pub fn reencrypt_begin(
        &self,
        new_dek: Dek,
        new_keyslots: Vec<WrappedDek>,
    ) -> Result<(), VolumeError> {
        drop((new_dek, new_keyslots));
        Err(VolumeError::ReadOnly)
    }

    /// Re-encrypts the next hotzone and returns the status after it; `Ok(None)` once no
    /// re-encryption is in progress (the last step finalizes the header, drops the old
    /// keyslots and wipes the old DEK). Safe to interrupt between steps (and to crash
    /// during one): the header records where to resume.
    pub fn reencrypt_step(&self) -> Result<Option<ReencryptStatus>, VolumeError> {
        Ok(None)
    }
}

/// A point-in-time view of a volume being served: flushed at creation; afterwards,
/// the first write that would change a chunk of the view first preserves the chunk's
/// old contents (copy-before-write), so [`SnapshotView::read_chunk`] always returns the
/// contents as of the view's creation. Dropping the view ends copy-before-write.
pub struct SnapshotView {
    _volume: Arc<Volume>,
    chunk_size: u64,
}

impl SnapshotView {
    pub fn size(&self) -> u64 {
        self._volume.size()
    }
    pub fn sector_size(&self) -> u32 {
        self._volume.sector_size()
    }
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
    /// Plaintext of chunk `index` (`chunk_size` bytes, the last chunk may be short:
    /// only `buf[..len]` is filled) as of the view's creation. `Ok(false)`: the chunk was
    /// wholly unallocated (reads as zeros; `buf` is zero-filled).
    pub fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        let off = index.saturating_mul(self.chunk_size);
        let len = self.chunk_size.min(self.size().saturating_sub(off)) as usize;
        self._volume.read_at(&mut buf[..len], off)?;
        Ok(true)
    }
    /// Chunk indexes changed since the snapshot named by `base` was completed from this
    /// volume (changed-chunk tracking, persisted across clean restarts); `None` when
    /// unknown (no tracking for that base, or an unclean shutdown since): read everything.
    pub fn changed_since(&self, base: &str) -> Option<Vec<u64>> {
        let _ = base;
        None
    }
    /// Records that snapshot `id` was completed from this view: tracking restarts from
    /// this point in time.
    pub fn completed(&self, id: &str) -> Result<(), VolumeError> {
        let _ = id;
        Ok(())
    }
}

impl Volume {
    /// Flushes and starts a point-in-time view with copy-before-write at `chunk_size`
    /// granularity (a multiple of the allocation chunk, e.g. 512 KiB). One view at a time.
    pub fn snapshot_view(self: &Arc<Self>, chunk_size: u64) -> Result<SnapshotView, VolumeError> {
        self.flush()?;
        Ok(SnapshotView {
            _volume: self.clone(),
            chunk_size,
        })
    }
}
