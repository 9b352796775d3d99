//! Re-encryption under a new data key, online: the progress state (in progress or not,
//! both keys, a zone whose step failed), the steps that convert one zone at a time
//! behind a watermark with a crash-safe hotzone in the header, the recovery of an
//! interrupted step at open, and the final switch to the new keyslots.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::header::{compute_kcv, fits_metadata};
use super::io::lock_ignoring_poison;
use super::sectors::Span;
use super::{
    crash_point, crash_point_active, read_header, write_header, Header, Hotzone, Reencryption,
    Volume, VolumeError, REENCRYPT_FEATURE,
};
use crate::crypto::{Dek, SectorSize, XtsEngine};
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

/// Keys a volume keeps beyond its engines (only re-encryption needs them).
pub(super) struct Ctl {
    /// The DEK of the header's keyslots (the old one during a re-encryption).
    pub dek: Dek,
    /// The new DEK while re-encrypting.
    pub next: Option<Dek>,
}

/// Re-encryption progress of an open volume.
pub(super) struct ReencryptState {
    /// A re-encryption is in progress: reads take range locks (a zone being converted
    /// must not be read half-way).
    pub(super) active: AtomicBool,
    /// The DEK(s), kept for header updates during re-encryption; the mutex also
    /// serialises re-encryption steps.
    pub(super) ctl: Mutex<Ctl>,
    /// A re-encryption zone whose step failed half-way and could not be finished: I/O to
    /// it is refused until the volume is opened again.
    pub(super) broken_zone: Mutex<Option<Span>>,
}

impl ReencryptState {
    /// The state at open: `active` when the header records a re-encryption (whose new
    /// DEK is then `next`).
    pub(super) fn new(active: bool, dek: Dek, next: Option<Dek>) -> Self {
        Self {
            active: AtomicBool::new(active),
            ctl: Mutex::new(Ctl { dek, next }),
            broken_zone: Mutex::new(None),
        }
    }
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
        if !self.reenc.active.load(Ordering::Acquire) {
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
        let mut ctl = lock_ignoring_poison(&self.reenc.ctl);
        if ctl.next.is_some() || self.reenc.active.load(Ordering::Acquire) {
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
        let engine = XtsEngine::new(&new_dek, SectorSize::try_from(self.sector_size())?)?;
        // Snapshot views and re-encryption exclude each other: a view's preserved chunks
        // are ciphertext under the current key. Checked and set under the view mutex,
        // which `snapshot_view` holds while it checks `reencrypting`.
        let cow = lock_ignoring_poison(&self.cow.view);
        if cow.is_some() {
            return Err(self.reenc_err(
                "a snapshot of this volume is being taken; re-encrypt after it finishes",
            ));
        }
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
        self.reenc.active.store(true, Ordering::Release);
        drop(cow);
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
        let mut ctl = lock_ignoring_poison(&self.reenc.ctl);
        if !self.reenc.active.load(Ordering::Acquire) {
            return Ok(None);
        }
        if self.read_only() {
            return Err(VolumeError::ReadOnly);
        }
        if let Some(z) = *lock_ignoring_poison(&self.reenc.broken_zone) {
            return Err(self.broken_zone_err(z));
        }
        let ss = u64::from(self.sector_size());
        let total = self.size() / ss;
        let first = self.keys_read().wm;
        if first < total {
            let end = (first + ZONE_SECTORS).min(total);
            let span = Span { first, end };
            let _zone = self.locks.lock(span);
            if let Err((e, recorded)) = self.convert_zone(&ctl, first, end) {
                // Nothing changed on disk before the zone was recorded: a retry is safe.
                let Some(zone) = recorded else {
                    return Err(e);
                };
                // Part of the zone may be under the new key already: finish it from the
                // recorded hashes now, while it is still locked.
                tracing::error!(path = %self.path(), "re-encryption step failed after recording its zone ({e}); finishing the zone from the recorded hashes");
                if let Err(e2) = self.finish_zone(&ctl, &zone) {
                    *lock_ignoring_poison(&self.reenc.broken_zone) = Some(span);
                    tracing::error!(path = %self.path(), "{}", self.broken_zone_err(span));
                    return Err(self.reenc_err(format!(
                        "a re-encryption step failed ({e}) and could not be finished ({e2}); \
                         I/O to that zone is refused until the volume is opened again \
                         (restart the daemon), which finishes the step from the header"
                    )));
                }
            }
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

    fn broken_zone_err(&self, z: Span) -> VolumeError {
        let ss = u64::from(self.sector_size());
        self.reenc_err(format!(
            "bytes [{}, {}) are in a re-encryption zone whose step failed; they cannot be read \
             or written until the volume is opened again (restart the daemon), which finishes \
             the step from the header",
            z.first * ss,
            z.end * ss
        ))
    }

    /// Refuses I/O overlapping a zone whose re-encryption step failed half-way.
    pub(super) fn check_broken_zone(&self, span: Span) -> Result<(), VolumeError> {
        match *lock_ignoring_poison(&self.reenc.broken_zone) {
            Some(z) if z.first < span.end && span.first < z.end => Err(self.broken_zone_err(z)),
            _ => Ok(()),
        }
    }

    /// One step over sectors `[first, end)`, whose range lock the caller holds. On error,
    /// the hotzone when it had been recorded (the zone may then be partly converted).
    fn convert_zone(
        &self,
        ctl: &Ctl,
        first: u64,
        end: u64,
    ) -> Result<(), (VolumeError, Option<Hotzone>)> {
        let before = |e: VolumeError| (e, None);
        let ss = self.sector_size() as usize;
        let n = (end - first) as usize;
        // The allocation map on disk must agree with memory for this zone (which chunks
        // hold data is what decides which sectors are converted).
        self.flush().map_err(before)?;
        let mut buf = vec![0u8; n * ss];
        self.pread_sectors(&mut buf, first).map_err(before)?;
        let convert: Vec<bool> = (0..n as u64)
            .map(|i| self.sector_allocated(first + i))
            .collect();
        let mut hashes = vec![[0u8; 16]; n];
        {
            let keys = self.keys_read();
            let next = keys
                .next
                .as_ref()
                .ok_or_else(|| before(self.reenc_err("the new key is not loaded")))?;
            for (i, c) in buf.chunks_exact_mut(ss).enumerate() {
                if convert[i] {
                    let sector = first + i as u64;
                    keys.cur
                        .decrypt_sectors(c, sector)
                        .map_err(|e| before(e.into()))?;
                    next.encrypt_sectors(c, sector)
                        .map_err(|e| before(e.into()))?;
                    hashes[i] = sector_hash(c);
                }
            }
        }
        let path = Path::new(self.path());
        let mut h = self.header_now().map_err(before)?;
        let zone = Hotzone {
            offset: first * ss as u64,
            len: (n * ss) as u64,
            hashes,
        };
        let r = h.reencrypt.as_mut().ok_or_else(|| {
            before(self.reenc_err("the header no longer records the re-encryption"))
        })?;
        r.watermark = first * ss as u64;
        r.hotzone = Some(zone.clone());
        write_header(path, &mut h, &ctl.dek).map_err(before)?;
        crash_point("reencrypt-after-hotzone");
        let after = |e: VolumeError| (e, Some(zone.clone()));
        let runs = runs_of(&convert);
        for (k, (a, b)) in runs.iter().enumerate() {
            if k == runs.len() / 2 && crash_point_active("reencrypt-mid-zone") {
                let _ = self.sync_data();
                crash_point("reencrypt-mid-zone");
            }
            #[cfg(test)]
            if k == runs.len() / 2 && tests::INTERRUPT.with(std::cell::Cell::get) {
                return Err(after(
                    self.reenc_err("test: interrupted in the middle of a zone"),
                ));
            }
            self.pwrite_sectors(&buf[a * ss..b * ss], first + *a as u64)
                .map_err(after)?;
        }
        self.sync_data().map_err(after)?;
        crash_point("reencrypt-after-zone-data");
        // Record the new watermark with no hotzone, so that writes to this zone from now
        // on (under the new key) are never mistaken for unconverted sectors; only then
        // does the watermark move in memory (the zone is still locked).
        if let Some(r) = h.reencrypt.as_mut() {
            r.watermark = end * ss as u64;
            r.hotzone = None;
        }
        write_header(path, &mut h, &ctl.dek).map_err(after)?;
        self.with_keys_mut(|k| k.wm = end);
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
        self.reenc.active.store(false, Ordering::Release);
        tracing::info!(path = %self.path(), "re-encryption finished; the old data key is destroyed");
        Ok(())
    }

    /// Finishes a step interrupted by a crash (called by open, before any I/O).
    pub(super) fn recover_hotzone(&self, zone: &Hotzone) -> Result<(), VolumeError> {
        let ctl = lock_ignoring_poison(&self.reenc.ctl);
        let converted = self.finish_zone(&ctl, zone)?;
        tracing::warn!(path = %self.path(), converted, "finished a re-encryption step interrupted by a crash");
        Ok(())
    }

    /// Finishes the recorded zone: every sector whose ciphertext is not the recorded new
    /// one still holds the old ciphertext and is converted now; then the watermark moves
    /// past the zone (header first). Returns the number of sectors converted. The caller
    /// holds the control mutex and, unless the volume is being opened, the zone's lock.
    fn finish_zone(&self, ctl: &Ctl, zone: &Hotzone) -> Result<usize, VolumeError> {
        #[cfg(test)]
        if tests::FAIL_FINISH.with(std::cell::Cell::get) {
            return Err(self.reenc_err("test: finishing the zone fails too"));
        }
        let ss = self.sector_size() as usize;
        let first = zone.offset / ss as u64;
        let n = zone.hashes.len();
        let mut buf = vec![0u8; n * ss];
        self.pread_sectors(&mut buf, first)?;
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
            self.pwrite_sectors(&buf[a * ss..b * ss], first + a as u64)?;
        }
        self.sync_data()?;
        let end = first + n as u64;
        let mut h = self.header_now()?;
        if let Some(r) = h.reencrypt.as_mut() {
            r.watermark = end * ss as u64;
            r.hotzone = None;
        }
        write_header(Path::new(self.path()), &mut h, &ctl.dek)?;
        self.with_keys_mut(|k| k.wm = end);
        Ok(fixed.iter().filter(|&&f| f).count())
    }

    /// A copy of the volume's data key, in locked memory (wiped on drop), for the
    /// snapshot manifest's MAC. Refused while a re-encryption is in progress (two keys).
    pub fn data_key(&self) -> Result<Dek, VolumeError> {
        if self.reenc.active.load(Ordering::Acquire) {
            return Err(VolumeError::Snapshot {
                path: self.path().to_string(),
                detail: "a re-encryption is in progress; snapshot after it finishes".into(),
            });
        }
        let ctl = lock_ignoring_poison(&self.reenc.ctl);
        Ok(Dek::from_slice(ctl.dek.expose())?)
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

#[cfg(test)]
pub(super) mod tests;
