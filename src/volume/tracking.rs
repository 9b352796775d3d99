//! Changed-block tracking of a served volume: one bit per snapshot chunk written since
//! the base snapshot, kept in memory and persisted in the sidecar `<volume>.cbt`
//! (its encoding, checksum, and atomic replacement), so that a snapshot reads only
//! the chunks changed since the last one, across clean restarts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};

use sha2::{Digest, Sha256};

use super::io::lock_ignoring_poison;
use super::{Volume, VolumeError};
use crate::crypto::canonical::{CanonicalWriter, SIDECAR_V1};

/// Granularity of snapshot chunks and of changed-chunk tracking (as EBS: 512 KiB).
pub const SNAPSHOT_CHUNK: u64 = 512 * 1024;

/// Changed-chunk tracking of a served volume: one bit per snapshot chunk written since
/// the base snapshot, persisted in a sidecar file `<volume>.cbt` on clean close. The
/// sidecar says "in use" while the volume is open, so after a crash the tracking is
/// known to be incomplete and the next snapshot reads everything.
pub(super) struct Tracking {
    /// One bit per snapshot chunk; replaced (longer) by an online grow.
    words: RwLock<Vec<AtomicU64>>,
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
pub(super) fn cbt_encode(
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
pub(super) fn cbt_decode(b: &[u8], uuid: &uuid::Uuid, nwords: usize) -> Option<(String, Vec<u64>)> {
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

/// [`write_atomically`] without any sync: only for an "in use" sidecar replacing one
/// that is already invalid (or none). Whatever a crash leaves (no file, the old invalid
/// one, an empty or partial new one, the new one) fails [`cbt_decode`], which is all an
/// "in use" sidecar has to achieve; the sync bought nothing there but start-up time.
fn write_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("cbt.tmp");
    let result = (|| {
        let mut f = crate::fsutil::replace_new_nofollow(&tmp, 0o600)?;
        f.write_all(bytes)?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Only ever our own temporary: it was created with O_EXCL (or is not there).
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Offset of the "in use" flag in the sidecar (after the magic and the volume UUID).
const IN_USE_AT: u64 = 8 + 16;

/// Whether `b` is a cleanly closed sidecar of volume `uuid` that names a base, for the
/// word count it records: a sidecar some later open could load (this open, or one after
/// an online grow to that word count). Only such a sidecar must be invalidated durably.
fn loadable_by_some_open(b: &[u8], uuid: &uuid::Uuid) -> bool {
    let nwords = (|| {
        let blen = usize::from(u16::from_le_bytes(b.get(25..27)?.try_into().ok()?));
        let at = 27 + blen + 8;
        let n = u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?);
        // The file's own count, bounded by its length before any arithmetic on it.
        usize::try_from(n).ok().filter(|&n| n <= b.len() / 8)
    })();
    nwords.is_some_and(|n| cbt_decode(b, uuid, n).is_some())
}

/// Marks the loadable sidecar at `path`, whose bytes were `seen`, "in use" durably by
/// rewriting its flag byte in place and syncing that one block: no temporary, no rename,
/// and (unlike a rename, which `Durability::DataOnly` does not sync) nothing a crash can
/// undo once this returns. The file is opened without following links and must be our
/// own regular file with one link whose bytes are still `seen`: the write only ever
/// lands in a sidecar of this volume. A torn write of the one byte fails the checksum,
/// which invalidates the sidecar as well.
fn mark_in_use_in_place(path: &Path, seen: &[u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let md = f.metadata()?;
    let ours = md.file_type().is_file()
        && md.uid() == nix::unistd::geteuid().as_raw()
        && md.nlink() == 1
        && md.len() == seen.len() as u64;
    let mut now = Vec::with_capacity(seen.len());
    if ours {
        (&f).take(seen.len() as u64).read_to_end(&mut now)?;
    }
    if !ours || now != seen {
        return Err(std::io::Error::other(
            "the sidecar changed or is not a private regular file",
        ));
    }
    f.write_all_at(&[1], IN_USE_AT)?;
    f.sync_data()
}

impl Tracking {
    pub(super) fn nwords(size: u64) -> usize {
        size.div_ceil(SNAPSHOT_CHUNK).div_ceil(64) as usize
    }

    fn words(&self) -> RwLockReadGuard<'_, Vec<AtomicU64>> {
        self.words.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn mark(&self, first_byte: u64, end_byte: u64) {
        if end_byte <= first_byte {
            return;
        }
        let words = self.words();
        for c in first_byte / SNAPSHOT_CHUNK..end_byte.div_ceil(SNAPSHOT_CHUNK) {
            if let Some(w) = words.get((c / 64) as usize) {
                let bit = 1u64 << (c % 64);
                if w.load(Ordering::Relaxed) & bit == 0 {
                    w.fetch_or(bit, Ordering::Relaxed);
                }
            }
        }
    }

    /// Takes the bits (they restart from zero) and the base.
    pub(super) fn take(&self) -> (Option<String>, Vec<u64>) {
        let base = lock_ignoring_poison(&self.meta).base.clone();
        let words = self
            .words()
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        (base, words)
    }

    /// Puts taken bits back (a snapshot that did not complete).
    pub(super) fn restore(&self, words: &[u64]) {
        for (w, &b) in self.words().iter().zip(words) {
            w.fetch_or(b, Ordering::AcqRel);
        }
    }

    pub(super) fn save(&self, uuid: &uuid::Uuid, in_use: bool) -> std::io::Result<()> {
        write_atomically(&self.sidecar, &self.encode(uuid, in_use)?)
    }

    fn encode(&self, uuid: &uuid::Uuid, in_use: bool) -> std::io::Result<Vec<u8>> {
        let base = lock_ignoring_poison(&self.meta).base.clone();
        let words: Vec<u64> = self
            .words()
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        cbt_encode(uuid, in_use, base.as_deref(), &words)
    }

    /// Marks the sidecar "in use" at open, before any write is served, so that a crash
    /// from now on leaves it invalid (the next snapshot then reads every chunk). `seen`:
    /// the result of reading the sidecar. Only a sidecar that some open could load needs
    /// a sync; it gets one, of its flag byte in place ([`mark_in_use_in_place`]). The new
    /// content is then written without a sync ([`write_unsynced`]): the sidecar on disk
    /// is already invalid (or absent), and a failure still turns tracking off as before
    /// (an unwritable directory). A sidecar that could not be read (too large, a link,
    /// not ours) is replaced durably, as before. Start-up used to pay an `fdatasync` here
    /// for every export, even with no sidecar at all (issue 18: two fdatasyncs per export
    /// at `serve`).
    fn mark_in_use(
        &self,
        uuid: &uuid::Uuid,
        seen: &std::io::Result<Vec<u8>>,
    ) -> std::io::Result<()> {
        match seen {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return self.save(uuid, true),
            Ok(b) if !loadable_by_some_open(b, uuid) => {}
            Ok(b) => {
                if let Err(e) = mark_in_use_in_place(&self.sidecar, b) {
                    tracing::debug!(sidecar = %self.sidecar.display(), "cannot mark the sidecar in use in place ({e}); replacing it durably");
                    return self.save(uuid, true);
                }
            }
        }
        write_unsynced(&self.sidecar, &self.encode(uuid, true)?)
    }

    /// The volume grew to `size` bytes: the bits cover the new chunks, and the base is
    /// forgotten, so the next snapshot reads every chunk (a parent of the old size is not
    /// used anyway) and tracking restarts relative to it.
    pub(super) fn grow(&self, size: u64) {
        let n = Tracking::nwords(size);
        let mut words = self.words.write().unwrap_or_else(PoisonError::into_inner);
        while words.len() < n {
            words.push(AtomicU64::new(0));
        }
        drop(words);
        lock_ignoring_poison(&self.meta).base = None;
    }

    /// Tracking continues relative to snapshot `id` from now on.
    pub(super) fn set_base(&self, id: &str) {
        lock_ignoring_poison(&self.meta).base = Some(id.to_string());
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
        if super::is_rbd_path(std::path::Path::new(self.path())) {
            // Its sidecar would be a local file beside no file: off until it has a home.
            tracing::debug!(path = %self.path(), "changed-chunk tracking is off for RBD volumes");
            return Ok(());
        }
        let sidecar = PathBuf::from(format!("{}.cbt", self.path()));
        let n = Tracking::nwords(self.size());
        let seen = read_sidecar(&sidecar, n);
        let (base, words) = match &seen {
            Ok(b) => match cbt_decode(b, &self.uuid(), n) {
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
            words: RwLock::new(words.into_iter().map(AtomicU64::new).collect()),
            meta: Mutex::new(TrackMeta { base }),
            sidecar,
        };
        // Tracking is an optimisation: without a writable sidecar (a read-only
        // directory, a filesystem without rename), snapshots simply read every chunk.
        if let Err(e) = t.mark_in_use(&self.uuid(), &seen) {
            tracing::warn!(path = %self.path(), sidecar = %t.sidecar.display(), "changed-chunk tracking is off: cannot write its file ({e}); snapshots of this volume read every chunk (only changed ones are uploaded)");
            return Ok(());
        }
        let _ = self.tracking.set(t);
        Ok(())
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
mod tests;
