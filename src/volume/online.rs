//! Online operations on an open volume: re-encryption under a new DEK (watermark,
//! hotzone) and point-in-time snapshot views (copy-before-write, changed-chunk
//! tracking). API first; the implementation lands with issue 8/9 work.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::header::{compute_kcv, fits_metadata};
use super::io::{lock_ignoring_poison, Ctl};
use super::sectors::Span;
use super::{
    crash_point, crash_point_active, read_header, write_header, Header, Hotzone, Reencryption,
    Volume, VolumeError, REENCRYPT_FEATURE,
};
use crate::crypto::{Dek, XtsEngine};
use crate::keys::{EncryptionContext, WrappedDek};

/// Sectors converted per re-encryption step (4 MiB at 4096-byte sectors, 512 KiB at
/// 512): each step records one 16-byte hash per sector in the header.
pub const ZONE_SECTORS: u64 = 1024;

/// Progress of a re-encryption in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReencryptStatus {
    /// Bytes of the data area already under the new key (`[0, watermark)`).
    pub watermark: u64,
    /// Size of the data area.
    pub size: u64,
}

/// Truncated SHA-256 of a sector's new ciphertext; never all zeros (that value marks
/// "sector not converted").
fn sector_hash(sector: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(sector);
    let mut h = [0u8; 16];
    h.copy_from_slice(&d[..16]);
    if h == [0u8; 16] {
        h[15] = 1;
    }
    h
}

impl Volume {
    fn reenc_err(&self, detail: impl Into<String>) -> VolumeError {
        VolumeError::Reencrypt {
            path: self.path().to_string(),
            detail: detail.into(),
        }
    }

    /// The header as it is on disk now (other tools may have updated it).
    fn header_now(&self) -> Result<Header, VolumeError> {
        let (h, _) = read_header(Path::new(self.path()))?;
        if h.uuid != self.uuid() {
            return Err(self.reenc_err(format!(
                "the file now holds volume {}, not {}",
                h.uuid,
                self.uuid()
            )));
        }
        Ok(h)
    }

    fn sector_allocated(&self, sector: u64) -> bool {
        match &self.map {
            Some(m) => m.is_allocated(sector * u64::from(self.sector_size()) / m.chunk_size()),
            None => true,
        }
    }

    /// `Some` while a re-encryption is in progress (also after a restart, until done).
    pub fn reencrypt_status(&self) -> Option<ReencryptStatus> {
        if !self.reencrypting.load(Ordering::Acquire) {
            return None;
        }
        let wm = self.keys_read().wm;
        Some(ReencryptStatus {
            watermark: wm * u64::from(self.sector_size()),
            size: self.size(),
        })
    }

    /// Starts re-encrypting the volume under `new_dek`, whose wrapped copies (bound to
    /// this volume's encryption context) are `new_keyslots`. Crash-safe header update;
    /// refuses when one is already in progress or the volume is read-only.
    pub fn reencrypt_begin(
        &self,
        new_dek: Dek,
        new_keyslots: Vec<WrappedDek>,
    ) -> Result<(), VolumeError> {
        if self.read_only() {
            return Err(VolumeError::ReadOnly);
        }
        let mut ctl = lock_ignoring_poison(&self.ctl);
        if ctl.next.is_some() || self.reencrypting.load(Ordering::Acquire) {
            return Err(self.reenc_err("a re-encryption is already in progress"));
        }
        let ctx = EncryptionContext::for_volume(&self.uuid());
        if new_keyslots.is_empty() || new_keyslots.iter().any(|s| s.context != ctx) {
            return Err(self
                .reenc_err("the new keyslots must be bound to this volume's encryption context"));
        }
        let uuid = self.uuid();
        let new_kcv = compute_kcv(&new_dek, &uuid)?;
        if new_kcv == compute_kcv(&ctl.dek, &uuid)? {
            return Err(self.reenc_err("the new data key is the current one"));
        }
        let engine = XtsEngine::new(&new_dek, self.sector_size() as usize)?;
        let mut h = self.header_now()?;
        if h.reencrypt.is_some() {
            return Err(self.reenc_err("the header already records a re-encryption"));
        }
        h.reencrypt = Some(Reencryption {
            watermark: 0,
            keyslots: new_keyslots,
            key_check: new_kcv,
            hotzone: None,
        });
        h.required_features.push(REENCRYPT_FEATURE.to_string());
        // Every step stores a full hotzone: make sure that will fit.
        let mut probe = h.clone();
        let ss = u64::from(self.sector_size());
        let zone = ZONE_SECTORS.min(self.size() / ss);
        if let Some(r) = probe.reencrypt.as_mut() {
            r.hotzone = Some(Hotzone {
                offset: 0,
                len: zone * ss,
                hashes: vec![[0xA5; 16]; zone as usize],
            });
        }
        fits_metadata(&probe).map_err(|e| {
            self.reenc_err(format!(
                "{e} (during re-encryption the header holds both sets of keyslots)"
            ))
        })?;
        write_header(Path::new(self.path()), &mut h, &ctl.dek)?;
        self.with_keys_mut(|k| {
            k.next = Some(engine);
            k.wm = 0;
        });
        ctl.next = Some(new_dek);
        self.reencrypting.store(true, Ordering::Release);
        tracing::info!(path = %self.path(), "re-encryption under a new data key started");
        Ok(())
    }

    /// Re-encrypts the next zone and returns the status after it (the step that reaches
    /// the end also finalizes the header: the new keyslots replace the old ones and the
    /// old DEK is wiped from memory). `Ok(None)` once no re-encryption is in progress.
    /// Safe to interrupt between steps, and to crash during one: the header records a
    /// hotzone with a hash of each sector's new ciphertext, from which opening the
    /// volume finishes the step.
    pub fn reencrypt_step(&self) -> Result<Option<ReencryptStatus>, VolumeError> {
        let mut ctl = lock_ignoring_poison(&self.ctl);
        if !self.reencrypting.load(Ordering::Acquire) {
            return Ok(None);
        }
        if self.read_only() {
            return Err(VolumeError::ReadOnly);
        }
        let ss = u64::from(self.sector_size());
        let total = self.size() / ss;
        let first = self.keys_read().wm;
        if first < total {
            let end = (first + ZONE_SECTORS).min(total);
            self.convert_zone(&ctl, first, end)?;
        }
        let wm = self.keys_read().wm;
        if wm >= total {
            self.finalize(&mut ctl)?;
        }
        Ok(Some(ReencryptStatus {
            watermark: wm * ss,
            size: self.size(),
        }))
    }

    /// One step over sectors `[first, end)`.
    fn convert_zone(&self, ctl: &Ctl, first: u64, end: u64) -> Result<(), VolumeError> {
        let ss = self.sector_size() as usize;
        let n = (end - first) as usize;
        let _zone = self.locks.lock(Span { first, end });
        // The allocation map on disk must agree with memory for this zone (which chunks
        // hold data is what decides which sectors are converted).
        self.flush()?;
        let mut buf = vec![0u8; n * ss];
        self.read_sectors_raw(&mut buf, first)?;
        let convert: Vec<bool> = (0..n as u64)
            .map(|i| self.sector_allocated(first + i))
            .collect();
        let mut hashes = vec![[0u8; 16]; n];
        {
            let keys = self.keys_read();
            let next = keys
                .next
                .as_ref()
                .ok_or_else(|| self.reenc_err("the new key is not loaded"))?;
            for (i, c) in buf.chunks_exact_mut(ss).enumerate() {
                if convert[i] {
                    let sector = first + i as u64;
                    keys.cur.decrypt_sectors(c, sector)?;
                    next.encrypt_sectors(c, sector)?;
                    hashes[i] = sector_hash(c);
                }
            }
        }
        let path = Path::new(self.path());
        let mut h = self.header_now()?;
        let r = h
            .reencrypt
            .as_mut()
            .ok_or_else(|| self.reenc_err("the header no longer records the re-encryption"))?;
        r.watermark = first * ss as u64;
        r.hotzone = Some(Hotzone {
            offset: first * ss as u64,
            len: (n * ss) as u64,
            hashes,
        });
        write_header(path, &mut h, &ctl.dek)?;
        crash_point("reencrypt-after-hotzone");
        let runs = runs_of(&convert);
        for (k, (a, b)) in runs.iter().enumerate() {
            if k == runs.len() / 2 && crash_point_active("reencrypt-mid-zone") {
                let _ = self.sync_data();
                crash_point("reencrypt-mid-zone");
            }
            self.write_sectors_raw(&buf[a * ss..b * ss], first + *a as u64)?;
        }
        self.sync_data()?;
        crash_point("reencrypt-after-zone-data");
        self.with_keys_mut(|k| k.wm = end);
        // Record the new watermark with no hotzone, so that writes to this zone from now
        // on (under the new key) are never mistaken for unconverted sectors.
        if let Some(r) = h.reencrypt.as_mut() {
            r.watermark = end * ss as u64;
            r.hotzone = None;
        }
        write_header(path, &mut h, &ctl.dek)?;
        Ok(())
    }

    /// The last step: the new keyslots become the keyslots, the old DEK and its key
    /// schedules are dropped (wiped).
    fn finalize(&self, ctl: &mut Ctl) -> Result<(), VolumeError> {
        let mut h = self.header_now()?;
        let r = h
            .reencrypt
            .take()
            .ok_or_else(|| self.reenc_err("the header no longer records the re-encryption"))?;
        h.keyslots = r.keyslots;
        h.key_check = r.key_check;
        h.required_features.retain(|f| f != REENCRYPT_FEATURE);
        let new = ctl
            .next
            .as_ref()
            .ok_or_else(|| self.reenc_err("the new key is not loaded"))?;
        crash_point("reencrypt-before-finalize");
        write_header(Path::new(self.path()), &mut h, new)?;
        self.with_keys_mut(|k| {
            if let Some(n) = k.next.take() {
                k.cur = n; // the old engine is dropped here: its key schedules are wiped
            }
            k.wm = 0;
        });
        if let Some(n) = ctl.next.take() {
            ctl.dek = n; // the old DEK is dropped (zeroized) here
        }
        self.reencrypting.store(false, Ordering::Release);
        tracing::info!(path = %self.path(), "re-encryption finished; the old data key is destroyed");
        Ok(())
    }

    /// Finishes a step interrupted by a crash (called by open, before any I/O): every
    /// sector of the hotzone whose ciphertext is not the recorded new one still holds
    /// the old ciphertext, and is converted now.
    pub(super) fn recover_hotzone(&self, zone: &Hotzone) -> Result<(), VolumeError> {
        let ctl = lock_ignoring_poison(&self.ctl);
        let ss = self.sector_size() as usize;
        let first = zone.offset / ss as u64;
        let n = zone.hashes.len();
        let mut buf = vec![0u8; n * ss];
        self.read_sectors_raw(&mut buf, first)?;
        let mut fixed = vec![false; n];
        {
            let keys = self.keys_read();
            let next = keys
                .next
                .as_ref()
                .ok_or_else(|| self.reenc_err("the new key is not loaded"))?;
            for (i, c) in buf.chunks_exact_mut(ss).enumerate() {
                let sector = first + i as u64;
                let want = zone.hashes[i];
                if want == [0u8; 16] || !self.sector_allocated(sector) || sector_hash(c) == want {
                    continue;
                }
                keys.cur.decrypt_sectors(c, sector)?;
                next.encrypt_sectors(c, sector)?;
                if sector_hash(c) != want {
                    tracing::warn!(path = %self.path(), sector, "re-encryption recovery: this sector held neither the old nor the new ciphertext (torn write); its contents are lost");
                }
                fixed[i] = true;
            }
        }
        for (a, b) in runs_of(&fixed) {
            self.write_sectors_raw(&buf[a * ss..b * ss], first + a as u64)?;
        }
        self.sync_data()?;
        let end = first + n as u64;
        self.with_keys_mut(|k| k.wm = end);
        let mut h = self.header_now()?;
        if let Some(r) = h.reencrypt.as_mut() {
            r.watermark = end * ss as u64;
            r.hotzone = None;
        }
        write_header(Path::new(self.path()), &mut h, &ctl.dek)?;
        tracing::warn!(path = %self.path(), converted = fixed.iter().filter(|&&f| f).count(), "finished a re-encryption step interrupted by a crash");
        Ok(())
    }
}

/// Maximal runs `[a, b)` of `true`.
fn runs_of(v: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if v[i] {
            let a = i;
            while i < v.len() && v[i] {
                i += 1;
            }
            out.push((a, i));
        } else {
            i += 1;
        }
    }
    out
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
