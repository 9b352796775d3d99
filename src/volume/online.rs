//! Online operations on an open volume: re-encryption under a new DEK (watermark,
//! hotzone) and point-in-time snapshot views (copy-before-write, changed-chunk
//! tracking). API first; the implementation lands with issue 8/9 work.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::header::{compute_kcv, fits_metadata};
use super::io::{lock_ignoring_poison, Ctl};
use super::sectors::Span;
use super::{
    crash_point, crash_point_active, read_header, write_header, Header, Hotzone, Reencryption,
    Volume, VolumeError, REENCRYPT_FEATURE,
};
use crate::crypto::canonical::{CanonicalWriter, SIDECAR_V1};
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
        // Snapshot views and re-encryption exclude each other: a view's preserved chunks
        // are ciphertext under the current key. Checked and set under the view mutex,
        // which `snapshot_view` holds while it checks `reencrypting`.
        let cow = lock_ignoring_poison(&self.cow);
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
        self.reencrypting.store(true, Ordering::Release);
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
        let mut ctl = lock_ignoring_poison(&self.ctl);
        if !self.reencrypting.load(Ordering::Acquire) {
            return Ok(None);
        }
        if self.read_only() {
            return Err(VolumeError::ReadOnly);
        }
        if let Some(z) = *lock_ignoring_poison(&self.broken_zone) {
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
                    *lock_ignoring_poison(&self.broken_zone) = Some(span);
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
        match *lock_ignoring_poison(&self.broken_zone) {
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
        self.read_sectors_raw(&mut buf, first).map_err(before)?;
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
            self.write_sectors_raw(&buf[a * ss..b * ss], first + *a as u64)
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
        self.reencrypting.store(false, Ordering::Release);
        tracing::info!(path = %self.path(), "re-encryption finished; the old data key is destroyed");
        Ok(())
    }

    /// Finishes a step interrupted by a crash (called by open, before any I/O).
    pub(super) fn recover_hotzone(&self, zone: &Hotzone) -> Result<(), VolumeError> {
        let ctl = lock_ignoring_poison(&self.ctl);
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
        let mut h = self.header_now()?;
        if let Some(r) = h.reencrypt.as_mut() {
            r.watermark = end * ss as u64;
            r.hotzone = None;
        }
        write_header(Path::new(self.path()), &mut h, &ctl.dek)?;
        self.with_keys_mut(|k| k.wm = end);
        Ok(fixed.iter().filter(|&&f| f).count())
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

/// Granularity of snapshot chunks and of changed-chunk tracking (as EBS: 512 KiB).
pub const SNAPSHOT_CHUNK: u64 = 512 * 1024;

/// Changed-chunk tracking of a served volume: one bit per snapshot chunk written since
/// the base snapshot, persisted in a sidecar file `<volume>.cbt` on clean close. The
/// sidecar says "in use" while the volume is open, so after a crash the tracking is
/// known to be incomplete and the next snapshot reads everything.
pub(super) struct Tracking {
    words: Vec<AtomicU64>,
    meta: Mutex<TrackMeta>,
    sidecar: PathBuf,
}

struct TrackMeta {
    /// The snapshot the bits are relative to; `None`: unknown (read everything).
    base: Option<String>,
}

const CBT_MAGIC: &[u8; 8] = b"CVCBT001";

/// The sidecar's bytes: the fields in the canonical encoding (profile
/// [`SIDECAR_V1`]: a `u16` base-id length, a `u64` word count), then their SHA-256.
/// A base id longer than `u16::MAX` bytes is an error, never truncated.
fn cbt_encode(
    uuid: &uuid::Uuid,
    in_use: bool,
    base: Option<&str>,
    words: &[u64],
) -> std::io::Result<Vec<u8>> {
    let mut w = CanonicalWriter::with_capacity(SIDECAR_V1, 64 + words.len() * 8);
    w.raw(CBT_MAGIC)
        .raw(uuid.as_bytes())
        .flag(in_use)
        .str(base.unwrap_or(""))
        .u64(SNAPSHOT_CHUNK)
        .count(words.len());
    for &word in words {
        w.u64(word);
    }
    let mut b = w
        .finish()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let sum = Sha256::digest(&b);
    b.extend_from_slice(&sum);
    Ok(b)
}

/// Reads the sidecar at `path` if its length can be that of a sidecar with `nwords`
/// words (fixed fields, a base id of at most `u16::MAX` bytes, the words): a larger
/// file, a link or a file of another user is not read (it is not ours; tracking then
/// restarts).
fn read_sidecar(path: &Path, nwords: usize) -> std::io::Result<Vec<u8>> {
    let most = (8 + 16 + 1 + 2 + 8 + 8 + 32 + usize::from(u16::MAX) + nwords * 8) as u64;
    crate::fsutil::read_own_file_nofollow(path, most)
}

/// Parses a sidecar written cleanly for volume `uuid` with `nwords` words.
fn cbt_decode(b: &[u8], uuid: &uuid::Uuid, nwords: usize) -> Option<(String, Vec<u64>)> {
    let body = b.get(..b.len().checked_sub(32)?)?;
    if Sha256::digest(body)[..] != b[body.len()..] || body.get(..8)? != CBT_MAGIC {
        return None;
    }
    if body.get(8..24)? != uuid.as_bytes() || *body.get(24)? != 0 {
        return None; // another volume, or not closed cleanly
    }
    let blen = u16::from_le_bytes(body.get(25..27)?.try_into().ok()?) as usize;
    let base = std::str::from_utf8(body.get(27..27 + blen)?)
        .ok()?
        .to_string();
    let mut at = 27 + blen;
    let chunk = u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
    let n = u64::from_le_bytes(body.get(at + 8..at + 16)?.try_into().ok()?) as usize;
    at += 16;
    if chunk != SNAPSHOT_CHUNK || n != nwords || base.is_empty() || body.len() != at + n * 8 {
        return None;
    }
    let words = body[at..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Some((base, words))
}

/// Replaces the sidecar through `<volume>.cbt.tmp`. Both names are derived from the
/// volume's path, in a directory others may write to: the temporary is created with
/// `O_EXCL | O_NOFOLLOW` (a symlink planted there is removed, never written through) and
/// renamed over the sidecar (which replaces a symlink at `.cbt`, not its target).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("cbt.tmp");
    crate::fsutil::write_atomically_via(
        path,
        &tmp,
        bytes,
        0o600,
        crate::fsutil::Durability::DataOnly,
    )
}

impl Tracking {
    fn nwords(size: u64) -> usize {
        size.div_ceil(SNAPSHOT_CHUNK).div_ceil(64) as usize
    }

    fn mark(&self, first_byte: u64, end_byte: u64) {
        if end_byte <= first_byte {
            return;
        }
        for c in first_byte / SNAPSHOT_CHUNK..end_byte.div_ceil(SNAPSHOT_CHUNK) {
            if let Some(w) = self.words.get((c / 64) as usize) {
                let bit = 1u64 << (c % 64);
                if w.load(Ordering::Relaxed) & bit == 0 {
                    w.fetch_or(bit, Ordering::Relaxed);
                }
            }
        }
    }

    /// Takes the bits (they restart from zero) and the base.
    fn take(&self) -> (Option<String>, Vec<u64>) {
        let base = lock_ignoring_poison(&self.meta).base.clone();
        let words = self
            .words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        (base, words)
    }

    /// Puts taken bits back (a snapshot that did not complete).
    fn restore(&self, words: &[u64]) {
        for (w, &b) in self.words.iter().zip(words) {
            w.fetch_or(b, Ordering::AcqRel);
        }
    }

    fn save(&self, uuid: &uuid::Uuid, in_use: bool) -> std::io::Result<()> {
        let base = lock_ignoring_poison(&self.meta).base.clone();
        let words: Vec<u64> = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        write_atomically(
            &self.sidecar,
            &cbt_encode(uuid, in_use, base.as_deref(), &words)?,
        )
    }
}

/// Copy-before-write state of an active snapshot view.
pub(super) struct Cow {
    inner: Mutex<CowInner>,
}

struct CowInner {
    /// Chunks the view has read or preserved: writes to them need nothing more.
    done: HashSet<u64>,
    /// Preserved chunks: offset in `spill` of the raw ciphertext, and the allocation
    /// state of each allocation chunk inside it at the time.
    preserved: HashMap<u64, (u64, Vec<bool>)>,
    /// An unlinked temporary file next to the volume holding preserved ciphertext.
    spill: Option<File>,
    spill_len: u64,
}

fn spill_file(volume: &Path) -> std::io::Result<File> {
    let dir = match volume.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // O_TMPFILE: never visible in the directory, gone when closed.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(&dir)
    {
        Ok(f) => Ok(f),
        Err(_) => {
            let p = dir.join(format!(".cryptvol-cow-{}", uuid::Uuid::new_v4()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)?;
            std::fs::remove_file(&p)?;
            Ok(f)
        }
    }
}

impl Volume {
    /// Starts changed-chunk tracking (the server does, for every writable export):
    /// loads the sidecar `<volume>.cbt` if it was closed cleanly and marks it in use.
    /// When the sidecar cannot be written, tracking stays off (logged), never an error.
    pub fn enable_change_tracking(&self) -> Result<(), VolumeError> {
        if self.read_only() || self.tracking.get().is_some() {
            return Ok(());
        }
        let sidecar = PathBuf::from(format!("{}.cbt", self.path()));
        let n = Tracking::nwords(self.size());
        let (base, words) = match read_sidecar(&sidecar, n) {
            Ok(b) => match cbt_decode(&b, &self.uuid(), n) {
                Some((base, w)) => (Some(base), w),
                None => {
                    tracing::info!(path = %self.path(), "changed-chunk tracking restarts (the volume was not closed cleanly, or no snapshot was tracked yet): the next snapshot reads the whole volume");
                    (None, vec![0; n])
                }
            },
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path(), "changed-chunk tracking restarts: {e}");
                }
                (None, vec![0; n])
            }
        };
        let t = Tracking {
            words: words.into_iter().map(AtomicU64::new).collect(),
            meta: Mutex::new(TrackMeta { base }),
            sidecar,
        };
        // Tracking is an optimisation: without a writable sidecar (a read-only
        // directory, a filesystem without rename), snapshots simply read every chunk.
        if let Err(e) = t.save(&self.uuid(), true) {
            tracing::warn!(path = %self.path(), sidecar = %t.sidecar.display(), "changed-chunk tracking is off: cannot write its file ({e}); snapshots of this volume read every chunk (only changed ones are uploaded)");
            return Ok(());
        }
        let _ = self.tracking.set(t);
        Ok(())
    }

    /// Called by every write path right after it took the range lock over `span`,
    /// before it changes anything there: marks the chunks changed and, while a
    /// snapshot view is active, preserves their old contents first.
    pub(super) fn before_write(&self, span: Span) -> Result<(), VolumeError> {
        let ss = u64::from(self.sector_size());
        let (a, b) = (span.first * ss, span.end * ss);
        if let Some(t) = self.tracking.get() {
            t.mark(a, b);
        }
        if !self.snapshotting.load(Ordering::Acquire) || b <= a {
            return Ok(());
        }
        let cow = lock_ignoring_poison(&self.cow).clone();
        if let Some(cow) = cow {
            for c in a / SNAPSHOT_CHUNK..b.div_ceil(SNAPSHOT_CHUNK) {
                self.preserve(&cow, c)?;
            }
        }
        Ok(())
    }

    fn chunk_bounds(&self, c: u64) -> (u64, u64) {
        let a = c * SNAPSHOT_CHUNK;
        (a, (a + SNAPSHOT_CHUNK).min(self.size()))
    }

    /// Allocation state of each allocation chunk in snapshot chunk `c`.
    fn alloc_bits(&self, c: u64) -> Vec<bool> {
        let (a, b) = self.chunk_bounds(c);
        match &self.map {
            None => vec![true],
            Some(m) => {
                let cs = m.chunk_size();
                (a / cs..b.div_ceil(cs))
                    .map(|k| m.is_allocated(k))
                    .collect()
            }
        }
    }

    fn preserve(&self, cow: &Cow, c: u64) -> Result<(), VolumeError> {
        let mut inner = lock_ignoring_poison(&cow.inner);
        if inner.done.contains(&c) {
            return Ok(());
        }
        let (a, b) = self.chunk_bounds(c);
        let ss = u64::from(self.sector_size());
        let mut buf = vec![0u8; (b - a) as usize];
        self.read_sectors_raw(&mut buf, a / ss)?;
        let bits = self.alloc_bits(c);
        if inner.spill.is_none() {
            inner.spill = Some(spill_file(Path::new(self.path())).map_err(|e| self.io_error(e))?);
        }
        let off = inner.spill_len;
        if let Some(f) = &inner.spill {
            f.write_all_at(&buf, off).map_err(|e| self.io_error(e))?;
        }
        inner.spill_len += buf.len() as u64;
        inner.preserved.insert(c, (off, bits));
        inner.done.insert(c);
        Ok(())
    }

    /// Flushes and starts a point-in-time view with copy-before-write at
    /// [`SNAPSHOT_CHUNK`] granularity. One view at a time; not during a re-encryption.
    /// Waits for writes in flight, so the view holds every write completed before it.
    pub fn snapshot_view(self: &Arc<Self>, chunk_size: u64) -> Result<SnapshotView, VolumeError> {
        if chunk_size != SNAPSHOT_CHUNK {
            return Err(VolumeError::Snapshot {
                path: self.path().to_string(),
                detail: format!(
                    "snapshot views use {SNAPSHOT_CHUNK}-byte chunks, not {chunk_size}"
                ),
            });
        }
        let ss = u64::from(self.sector_size());
        // The whole volume, locked: no write is in flight while the view starts.
        let all = self.locks.lock(Span {
            first: 0,
            end: self.size() / ss,
        });
        {
            let mut cow = lock_ignoring_poison(&self.cow);
            if self.reencrypting.load(Ordering::Acquire) {
                return Err(VolumeError::Snapshot {
                    path: self.path().to_string(),
                    detail: "a re-encryption is in progress; snapshot after it finishes".into(),
                });
            }
            if cow.is_some() {
                return Err(VolumeError::Snapshot {
                    path: self.path().to_string(),
                    detail: "another snapshot of this volume is in progress".into(),
                });
            }
            *cow = Some(Arc::new(Cow {
                inner: Mutex::new(CowInner {
                    done: HashSet::new(),
                    preserved: HashMap::new(),
                    spill: None,
                    spill_len: 0,
                }),
            }));
        }
        self.snapshotting.store(true, Ordering::Release);
        let tracked = self.tracking.get().map(Tracking::take);
        let flushed = self.flush();
        drop(all);
        let view = SnapshotView {
            volume: self.clone(),
            tracked,
            completed: Mutex::new(false),
        };
        flushed?;
        Ok(view)
    }
}

/// A point-in-time view of a volume being served: created under a lock over the whole
/// volume (no write in flight) and flushed; afterwards, the first write that would
/// change a chunk not yet read by the view first preserves the chunk's old ciphertext
/// in an unlinked temporary file (copy-before-write), so [`SnapshotView::read_chunk`]
/// always returns the contents as of the view's creation. Dropping the view ends
/// copy-before-write and frees the preserved chunks.
pub struct SnapshotView {
    volume: Arc<Volume>,
    /// Changed-chunk bits taken when the view started, with their base snapshot.
    tracked: Option<(Option<String>, Vec<u64>)>,
    completed: Mutex<bool>,
}

impl SnapshotView {
    pub fn size(&self) -> u64 {
        self.volume.size()
    }
    pub fn sector_size(&self) -> u32 {
        self.volume.sector_size()
    }
    pub fn chunk_size(&self) -> u64 {
        SNAPSHOT_CHUNK
    }

    /// Plaintext of chunk `index` (`chunk_size` bytes; the last chunk may be short:
    /// only `buf[..len]` is filled) as of the view's creation. `Ok(false)`: the chunk was
    /// wholly unallocated (reads as zeros; `buf` is zero-filled).
    pub fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        let v = &*self.volume;
        let (a, b) = v.chunk_bounds(index);
        if a >= b || buf.len() < (b - a) as usize {
            return Err(VolumeError::OutOfRange {
                offset: a,
                len: buf.len() as u64,
                size: v.size(),
            });
        }
        let buf = &mut buf[..(b - a) as usize];
        test_delay();
        let cow = lock_ignoring_poison(&v.cow).clone();
        let Some(cow) = cow else {
            return Err(VolumeError::Snapshot {
                path: v.path().to_string(),
                detail: "the snapshot view has ended".into(),
            });
        };
        let mut inner = lock_ignoring_poison(&cow.inner);
        let ss = u64::from(v.sector_size());
        if let Some((off, bits)) = inner.preserved.remove(&index) {
            let f = inner.spill.as_ref().ok_or_else(|| VolumeError::Snapshot {
                path: v.path().to_string(),
                detail: "preserved chunk lost".into(),
            })?;
            f.read_exact_at(buf, off).map_err(|e| v.io_error(e))?;
            v.decrypt(buf, a / ss)?;
            return Ok(zero_unallocated(v, buf, &bits));
        }
        // Not written since the view started: read it live, holding the view's lock so
        // that no writer can pass its copy-before-write step for this chunk meanwhile.
        let bits = v.alloc_bits(index);
        if bits.iter().all(|&x| !x) {
            buf.fill(0);
        } else {
            v.read_at(buf, a)?;
        }
        inner.done.insert(index);
        Ok(bits.iter().any(|&x| x))
    }

    /// Chunk indexes changed between the snapshot `base` and this view's creation
    /// (changed-chunk tracking, kept across clean restarts); `None` when unknown
    /// (another base, no tracking, or an unclean shutdown since): read everything.
    pub fn changed_since(&self, base: &str) -> Option<Vec<u64>> {
        match &self.tracked {
            Some((Some(b), words)) if b == base => Some(
                words
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &w)| {
                        (0..64)
                            .filter(move |k| w & (1 << k) != 0)
                            .map(move |k| i as u64 * 64 + k)
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Records that snapshot `id` was completed from this view: tracking continues
    /// relative to it (the sidecar is updated).
    pub fn completed(&self, id: &str) -> Result<(), VolumeError> {
        let v = &*self.volume;
        if let Some(t) = v.tracking.get() {
            lock_ignoring_poison(&t.meta).base = Some(id.to_string());
            t.save(&v.uuid(), true).map_err(|e| v.io_error(e))?;
        }
        *lock_ignoring_poison(&self.completed) = true;
        Ok(())
    }
}

/// Test-only slow-down of each snapshot chunk read or restore write (so that tests can
/// write while a snapshot is read out, or interrupt one reliably however fast the build):
/// `CRYPTVOL_TEST_SNAPSHOT_DELAY_MS`, honoured only with `CRYPTVOL_FAULT_INJECTION=1`.
pub fn test_delay() {
    if std::env::var_os("CRYPTVOL_FAULT_INJECTION").is_some_and(|v| v == "1") {
        if let Some(ms) = std::env::var("CRYPTVOL_TEST_SNAPSHOT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
        }
    }
}

/// Zeroes the parts of a chunk's plaintext whose allocation chunks were unallocated;
/// returns whether any part was allocated.
fn zero_unallocated(v: &Volume, buf: &mut [u8], bits: &[bool]) -> bool {
    if let Some(m) = &v.map {
        let cs = m.chunk_size() as usize;
        for (k, part) in buf.chunks_mut(cs).enumerate() {
            if !bits.get(k).copied().unwrap_or(true) {
                part.fill(0);
            }
        }
    }
    bits.iter().any(|&x| x)
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        let v = &*self.volume;
        v.snapshotting.store(false, Ordering::Release);
        *lock_ignoring_poison(&v.cow) = None;
        if !*lock_ignoring_poison(&self.completed) {
            // The snapshot did not complete: its changes still count for the next one.
            if let (Some(t), Some((_, words))) = (v.tracking.get(), &self.tracked) {
                t.restore(words);
            }
        }
    }
}

impl Volume {
    /// A copy of the volume's data key, in locked memory (wiped on drop), for the
    /// snapshot manifest's MAC. Refused while a re-encryption is in progress (two keys).
    pub fn data_key(&self) -> Result<Dek, VolumeError> {
        if self.reencrypting.load(Ordering::Acquire) {
            return Err(VolumeError::Snapshot {
                path: self.path().to_string(),
                detail: "a re-encryption is in progress; snapshot after it finishes".into(),
            });
        }
        let ctl = lock_ignoring_poison(&self.ctl);
        Ok(Dek::from_slice(ctl.dek.expose())?)
    }

    /// Saves the changed-chunk tracking as cleanly closed (on drop, after the last flush).
    pub(super) fn close_tracking(&self) {
        if let Some(t) = self.tracking.get() {
            if let Err(e) = t.save(&self.uuid(), false) {
                tracing::warn!(path = %self.path(), "cannot save changed-chunk tracking: {e}");
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::volume::header::tests::{dummy_slot, new_legacy_volume, new_volume};
    use crate::volume::OpenOptions;
    use std::cell::Cell;

    #[test]
    fn a_sidecar_larger_than_its_format_allows_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img.cbt");
        let uuid = uuid::Uuid::new_v4();
        let good = cbt_encode(&uuid, false, Some("snap-1"), &[5, 6]).unwrap();
        std::fs::write(&p, &good).unwrap();
        assert_eq!(read_sidecar(&p, 2).unwrap(), good);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(1 << 40).unwrap(); // sparse 1 TiB
        let e = read_sidecar(&p, 2).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    /// The sidecar's bytes are part of the on-disk format: pinned here, byte for byte.
    #[test]
    fn the_sidecar_encoding_is_pinned() {
        let uuid = uuid::Uuid::from_bytes([
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ]);
        let b = cbt_encode(&uuid, true, Some("s1"), &[5, 1 << 63]).unwrap();
        assert_eq!(hex::encode(&b), "435643425430303100112233445566778899aabbccddeeff0102007331000008000000000002000000000000000500000000000000000000000000008099cf366baebff08a554e73e301a1ca8e8636a81438944651a9b200a823849bc1");
        let none = cbt_encode(&uuid, false, None, &[]).unwrap();
        assert_eq!(hex::encode(&none), "435643425430303100112233445566778899aabbccddeeff0000000000080000000000000000000000000022c3c3cca92a5ed127abfd2848b2503b5cac850905479f15b93f8afbcd121a7c");
    }

    thread_local! {
        /// Makes the next zone conversion stop half-way, as a crash would.
        pub(in crate::volume) static INTERRUPT: Cell<bool> = const { Cell::new(false) };
        /// Makes finishing an interrupted zone in-process fail too (as when the
        /// process dies: the zone is left for the next open).
        pub(in crate::volume) static FAIL_FINISH: Cell<bool> = const { Cell::new(false) };
    }

    fn copy(d: &Dek) -> Dek {
        Dek::from_slice(d.expose()).expect("dek")
    }

    fn image(v: &Volume) -> Vec<u8> {
        let mut b = vec![0u8; v.size() as usize];
        v.read_at(&mut b, 0).expect("read");
        b
    }

    /// Writes a pattern over parts of the volume (leaving some chunks unallocated).
    fn fill(v: &Volume, seed: u8) {
        let size = v.size();
        let mut off = 0;
        while off < size {
            let n = (size - off).min(40_000);
            let data: Vec<u8> = (0..n)
                .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
                .collect();
            v.write_at(&data, off, false).expect("write");
            off += 3 * 65536 + 4096; // skip some chunks
        }
        v.flush().expect("flush");
    }

    fn begin(v: &Volume) -> Dek {
        let new = Dek::generate().expect("dek");
        let slot = dummy_slot(&v.uuid(), "new");
        v.reencrypt_begin(copy(&new), vec![slot]).expect("begin");
        new
    }

    #[test]
    fn reencrypts_with_concurrent_writes_and_destroys_the_old_key() {
        for ss in [512u32, 4096] {
            let dir = tempfile::tempdir().expect("tempdir");
            let size = 3 * ZONE_SECTORS * u64::from(ss) + 5 * u64::from(ss);
            let (path, h, dek) = new_volume(dir.path(), size, ss);
            let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
            fill(&v, 3);
            let before = image(&v);
            let new = begin(&v);
            assert_eq!(
                v.reencrypt_status(),
                Some(ReencryptStatus { watermark: 0, size })
            );
            assert!(v
                .reencrypt_begin(
                    Dek::generate().expect("d"),
                    vec![dummy_slot(&v.uuid(), "x")]
                )
                .is_err());
            // Interleave steps with writes on both sides of the watermark.
            let mut model = before.clone();
            let mut steps = 0;
            while let Some(st) = v.reencrypt_step().expect("step") {
                steps += 1;
                assert!(st.watermark <= size);
                for off in [
                    0u64,
                    st.watermark.saturating_sub(700).min(size - 1500),
                    size - 3000,
                    size / 2,
                ] {
                    let data = vec![steps as u8; 1500];
                    v.write_at(&data, off, false).expect("write");
                    model[off as usize..off as usize + 1500].copy_from_slice(&data);
                }
                assert_eq!(image(&v), model, "after step {steps}");
            }
            assert_eq!(steps, 4, "3 full zones and a short one");
            assert!(v.reencrypt_status().is_none());
            v.flush().expect("flush");
            drop(v);
            let (h2, _) = crate::volume::read_header(&path).expect("header");
            assert!(
                h2.reencrypt.is_none()
                    && !h2.required_features.iter().any(|f| f == REENCRYPT_FEATURE)
            );
            assert_eq!(
                h2.keyslots[0].params.get("tag").map(String::as_str),
                Some("new")
            );
            // The old DEK no longer opens the volume; the new one does, with the data.
            assert!(matches!(
                Volume::open(&path, &h2, copy(&dek), OpenOptions::default()),
                Err(VolumeError::KeyCheckFailed { .. })
            ));
            let v = Volume::open(&path, &h2, copy(&new), OpenOptions::default()).expect("open new");
            assert_eq!(image(&v), model);
            drop(v);
            // Even with the old header put back, the old key decrypts only garbage.
            let mut old_h = h.clone();
            old_h.sequence = h2.sequence + 10;
            crate::volume::write_header(&path, &mut old_h, &dek).expect("restore old header");
            let v =
                Volume::open(&path, &old_h, copy(&dek), OpenOptions::default()).expect("open old");
            let img = image(&v);
            let written: Vec<usize> = (0..model.len()).filter(|&i| model[i] != 0).collect();
            let same = written.iter().filter(|&&i| img[i] == model[i]).count();
            assert!(
                same * 50 < written.len(),
                "old key still reads the data ({same}/{})",
                written.len()
            );
        }
    }

    #[test]
    fn an_interrupted_step_is_finished_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 2 * ZONE_SECTORS * 4096;
        let (path, h, dek) = new_volume(dir.path(), size, 4096);
        let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
        fill(&v, 9);
        let want = image(&v);
        let new = begin(&v);
        v.reencrypt_step().expect("first zone");
        INTERRUPT.with(|f| f.set(true));
        FAIL_FINISH.with(|f| f.set(true));
        assert!(
            v.reencrypt_step().is_err(),
            "interrupted half-way through zone 2"
        );
        INTERRUPT.with(|f| f.set(false));
        FAIL_FINISH.with(|f| f.set(false));
        // The zone is refused until the volume is opened again; the rest works.
        let mut b = vec![0u8; 4096];
        assert!(v.read_at(&mut b, ZONE_SECTORS * 4096 + 8192).is_err());
        assert!(v.write_at(&b, ZONE_SECTORS * 4096, false).is_err());
        assert!(v.reencrypt_step().is_err(), "no more steps until reopened");
        v.read_at(&mut b, 0).expect("outside the zone");
        drop(v);
        let (h2, _) = crate::volume::read_header(&path).expect("header");
        let r = h2.reencrypt.clone().expect("in progress");
        let zone = r.hotzone.clone().expect("hotzone recorded");
        assert_eq!(
            (r.watermark, zone.offset),
            (ZONE_SECTORS * 4096, ZONE_SECTORS * 4096)
        );
        // Without the new key the volume cannot be opened; read-only cannot recover.
        assert!(matches!(
            Volume::open(&path, &h2, copy(&dek), OpenOptions::default()),
            Err(VolumeError::ReencryptKeyNeeded { .. })
        ));
        let ro = OpenOptions {
            read_only: true,
            discard: false,
        };
        assert!(matches!(
            Volume::open_with_next(&path, &h2, copy(&dek), Some(copy(&new)), ro),
            Err(VolumeError::ReencryptInterrupted { .. })
        ));
        let v = Volume::open_with_next(
            &path,
            &h2,
            copy(&dek),
            Some(copy(&new)),
            OpenOptions::default(),
        )
        .expect("open recovers");
        assert_eq!(
            v.reencrypt_status().map(|s| s.watermark),
            Some(2 * ZONE_SECTORS * 4096)
        );
        assert_eq!(image(&v), want, "recovered data");
        while v.reencrypt_step().expect("step").is_some() {}
        assert_eq!(image(&v), want);
        drop(v);
        let (h3, _) = crate::volume::read_header(&path).expect("header");
        let v = Volume::open(&path, &h3, copy(&new), OpenOptions::default()).expect("open");
        assert_eq!(image(&v), want);
    }

    #[test]
    fn snapshot_view_preserves_old_contents_and_tracks_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 4 * SNAPSHOT_CHUNK + 8192;
        let (path, h, dek) = new_volume(dir.path(), size, 4096);
        let v =
            Arc::new(Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open"));
        v.enable_change_tracking().expect("tracking");
        v.write_at(&vec![0xAA; SNAPSHOT_CHUNK as usize], 0, false)
            .expect("w");
        v.write_at(&[0xBB; 4096], 2 * SNAPSHOT_CHUNK + 65536, false)
            .expect("w");
        let view = v.snapshot_view(SNAPSHOT_CHUNK).expect("view");
        assert!(
            v.snapshot_view(SNAPSHOT_CHUNK).is_err(),
            "one view at a time"
        );
        assert_eq!(view.changed_since("snap-x"), None, "no base yet");
        // Writes after the view: chunk 0 overwritten, chunk 1 newly written, chunk 2
        // zeroed, chunk 4 (short) written.
        v.write_at(&vec![0xCC; 100_000], 10, false).expect("w");
        v.write_at(&[0xDD; 4096], SNAPSHOT_CHUNK, false).expect("w");
        v.write_zeroes(2 * SNAPSHOT_CHUNK, SNAPSHOT_CHUNK, false)
            .expect("z");
        v.write_at(&[0xEE; 8192], 4 * SNAPSHOT_CHUNK, false)
            .expect("w");
        let mut buf = vec![0u8; SNAPSHOT_CHUNK as usize];
        assert!(view.read_chunk(0, &mut buf).expect("c0"));
        assert!(buf.iter().all(|&b| b == 0xAA), "chunk 0 as of the view");
        assert!(
            !view.read_chunk(1, &mut buf).expect("c1"),
            "chunk 1 was a hole"
        );
        assert!(buf.iter().all(|&b| b == 0));
        assert!(view.read_chunk(2, &mut buf).expect("c2"));
        let mut want = vec![0u8; SNAPSHOT_CHUNK as usize];
        want[65536..65536 + 4096].fill(0xBB);
        assert_eq!(buf, want, "chunk 2 as of the view (partially allocated)");
        assert!(!view.read_chunk(3, &mut buf).expect("c3"));
        assert!(!view.read_chunk(4, &mut buf[..8192]).expect("c4 short"));
        // After reading a chunk, writes to it need no preserving and the view keeps its
        // answer for the chunks it has not read yet.
        v.write_at(&[0x11; 4096], 0, false).expect("w");
        view.completed("snap-0000000000000000a").expect("completed");
        drop(view);
        // The changes after the view are what the next view reports against that base.
        v.write_at(&[0x22; 4096], 3 * SNAPSHOT_CHUNK, false)
            .expect("w");
        let view2 = v.snapshot_view(SNAPSHOT_CHUNK).expect("view2");
        let changed = view2
            .changed_since("snap-0000000000000000a")
            .expect("tracked");
        assert_eq!(changed, vec![0, 1, 2, 3, 4]);
        assert_eq!(view2.changed_since("snap-other"), None);
        drop(view2); // not completed: its bits go back
        let view3 = v.snapshot_view(SNAPSHOT_CHUNK).expect("view3");
        assert_eq!(
            view3
                .changed_since("snap-0000000000000000a")
                .expect("tracked"),
            vec![0, 1, 2, 3, 4]
        );
        view3
            .completed("snap-0000000000000000b")
            .expect("completed");
        drop(view3);
        v.write_at(&[0x33; 10], 5, false).expect("w");
        // A clean close keeps the tracking; a crash (sidecar left "in use") loses it.
        drop(v);
        let v =
            Arc::new(Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open"));
        v.enable_change_tracking().expect("tracking");
        let view = v.snapshot_view(SNAPSHOT_CHUNK).expect("view");
        assert_eq!(view.changed_since("snap-0000000000000000b"), Some(vec![0]));
        drop(view);
        std::mem::forget(v); // no clean close: like kill -9 (the sidecar stays "in use")
        let side = std::fs::read(format!("{}.cbt", path.display())).expect("sidecar");
        assert!(
            cbt_decode(&side, &h.uuid, Tracking::nwords(size)).is_none(),
            "an in-use sidecar is not trusted"
        );
    }

    /// A step that fails half-way while the process keeps running (EIO, ENOSPC) is
    /// finished in-process from the recorded hashes: no read ever sees a half-converted
    /// zone with the wrong key, and a retry converts nothing twice.
    #[test]
    fn a_failed_step_is_finished_in_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 2 * ZONE_SECTORS * 4096;
        let (path, h, dek) = new_volume(dir.path(), size, 4096);
        let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
        let mut data = vec![0u8; size as usize];
        for c in (0..size / 65536).step_by(2) {
            let o = (c * 65536) as usize;
            for (i, b) in data[o..o + 65536].iter_mut().enumerate() {
                *b = ((o + i) % 251) as u8 | 1;
            }
            v.write_at(&data[o..o + 65536], o as u64, false).expect("w");
        }
        v.flush().expect("flush");
        begin(&v);
        INTERRUPT.with(|f| f.set(true));
        let st = v.reencrypt_step();
        INTERRUPT.with(|f| f.set(false));
        assert!(st.is_ok(), "finished in-process: {st:?}");
        assert_eq!(image(&v), data, "no sector read with the wrong key");
        while v.reencrypt_step().expect("step").is_some() {}
        assert_eq!(image(&v), data, "nothing converted twice");
    }

    #[test]
    fn snapshot_views_and_reencryption_exclude_each_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), 2 << 20, 4096);
        let v =
            Arc::new(Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open"));
        let view = v.snapshot_view(SNAPSHOT_CHUNK).expect("view");
        let e = v.reencrypt_begin(
            Dek::generate().expect("d"),
            vec![dummy_slot(&v.uuid(), "n")],
        );
        assert!(matches!(e, Err(VolumeError::Reencrypt { .. })), "{e:?}");
        drop(view);
        begin(&v);
        assert!(matches!(
            v.snapshot_view(SNAPSHOT_CHUNK),
            Err(VolumeError::Snapshot { .. })
        ));
        assert!(matches!(v.data_key(), Err(VolumeError::Snapshot { .. })));
    }

    #[test]
    fn reencrypt_refusals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_legacy_volume(dir.path(), 1 << 20, 4096);
        let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
        // A slot bound to another volume is refused; so is the current key.
        let other = dummy_slot(&uuid::Uuid::new_v4(), "x");
        assert!(v
            .reencrypt_begin(Dek::generate().expect("d"), vec![other])
            .is_err());
        assert!(v
            .reencrypt_begin(copy(&dek), vec![dummy_slot(&v.uuid(), "same")])
            .is_err());
        assert_eq!(v.reencrypt_step().expect("none"), None);
        drop(v);
        let ro = OpenOptions {
            read_only: true,
            discard: false,
        };
        let v = Volume::open(&path, &h, copy(&dek), ro).expect("open ro");
        assert!(matches!(
            v.reencrypt_begin(Dek::generate().expect("d"), vec![dummy_slot(&h.uuid, "n")]),
            Err(VolumeError::ReadOnly)
        ));
        // A legacy volume (no map) re-encrypts every sector.
        drop(v);
        let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
        v.write_at(&[5u8; 4096], 8192, true).expect("w");
        let want = image(&v);
        begin(&v);
        while v.reencrypt_step().expect("step").is_some() {}
        assert_eq!(image(&v), want);
    }

    /// Issue 14 B6: root followed a symlink planted at `<volume>.cbt.tmp` and overwrote
    /// the file it pointed to. The temporary must be created afresh (O_EXCL|O_NOFOLLOW),
    /// the victim left alone, and tracking still work.
    #[test]
    fn cbt_temporary_never_written_through_a_planted_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victims = tempfile::tempdir().expect("tempdir");
        let victim = victims.path().join("shadow");
        std::fs::write(&victim, b"root:secret-hash:19000::::::\n").expect("victim");
        let (path, h, dek) = new_volume(dir.path(), 4 * SNAPSHOT_CHUNK, 4096);
        let tmp = PathBuf::from(format!("{}.cbt.tmp", path.display()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("plant");
        let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
        v.enable_change_tracking().expect("tracking");
        assert_eq!(
            std::fs::read(&victim).expect("victim"),
            b"root:secret-hash:19000::::::\n"
        );
        let sidecar = PathBuf::from(format!("{}.cbt", path.display()));
        let md = std::fs::symlink_metadata(&sidecar).expect("sidecar written");
        assert!(md.file_type().is_file(), "{md:?}");
        assert!(
            std::fs::symlink_metadata(&tmp).is_err(),
            "temporary left behind"
        );
        assert!(v.tracking.get().is_some(), "tracking stayed off");

        // A symlink planted at the sidecar itself is replaced, not written through, and
        // its target is not read as a sidecar.
        drop(v);
        std::fs::remove_file(&sidecar).expect("rm");
        std::os::unix::fs::symlink(&victim, &sidecar).expect("plant");
        let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
        v.enable_change_tracking().expect("tracking");
        assert_eq!(
            std::fs::read(&victim).expect("victim"),
            b"root:secret-hash:19000::::::\n"
        );
        assert!(std::fs::symlink_metadata(&sidecar)
            .expect("sidecar")
            .file_type()
            .is_file());
    }
}
