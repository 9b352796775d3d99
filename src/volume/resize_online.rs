//! Growing a volume while it is served (`cryptvol resize --control PATH EXPORT`): the
//! same crash-safe steps on disk as an offline grow (`resize.rs`, docs/format.md §6a),
//! run while no write is in flight, then the new size taken into memory.
//!
//! Exclusion: the re-encryption mutex (no step or start meanwhile), then the range lock
//! over every sector there is or will be (no write in flight, none starts). Refused
//! while a re-encryption is in progress or a snapshot view is open (its preserved
//! chunks and changed-chunk bits describe the old size); grow after either finishes.
//!
//! Publication order, so that a request never sees the new size before what serves it:
//! the header is committed on disk first; then the allocation map covers the new
//! chunks (and is persisted to its new place from now on), the changed-chunk tracking
//! covers them (its base is forgotten: the next snapshot reads everything), and last
//! the size itself. Reads take no lock: one that checked its range against the old
//! size reads within the old size, which the grow does not change.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::io::lock_ignoring_poison;
use super::resize::resize_err;
use super::sectors::Span;
use super::{read_header, Growth, Header, Volume, VolumeError};

impl Volume {
    /// Grows this volume, opened read-write and possibly served, to `target(size now)`
    /// bytes (`None`: the size asked for overflows), and returns the sizes. Concurrent
    /// reads and writes go on before and after; writes wait while the grow runs.
    pub fn grow_online(&self, target: &dyn Fn(u64) -> Option<u64>) -> Result<Growth, VolumeError> {
        if self.read_only() {
            return Err(VolumeError::ReadOnly);
        }
        let path = self.path().to_string();
        let ctl = lock_ignoring_poison(&self.reenc.ctl);
        if self.reenc.active.load(Ordering::Acquire) {
            return Err(resize_err(
                &path,
                "an online re-encryption is in progress; grow the volume after it finishes (cryptvol reencrypt EXPORT --status)".into(),
            ));
        }
        let _all = self.locks.lock(Span {
            first: 0,
            end: u64::MAX,
        });
        if lock_ignoring_poison(&self.cow.view).is_some() {
            return Err(resize_err(
                &path,
                "a snapshot of this volume is being taken; grow the volume after it finishes"
                    .into(),
            ));
        }
        let header = self.current_header(&ctl.dek)?;
        let new_size = target(header.size)
            .ok_or_else(|| resize_err(&path, "the requested size overflows".into()))?;
        match self.grow_on_disk(&header, &ctl.dek, new_size) {
            Ok((new, growth)) => {
                self.take_growth(&new, growth.map_relocated);
                Ok(growth)
            }
            Err(e) => {
                self.recover_failed_growth(&header, &ctl.dek);
                Err(e)
            }
        }
    }

    /// The header on disk, checked to be this volume's, under `dek`, of the size served.
    fn current_header(&self, dek: &crate::crypto::Dek) -> Result<Header, VolumeError> {
        let path = Path::new(self.path());
        let (h, _) = read_header(path)?;
        if h.uuid != self.uuid() {
            return Err(resize_err(
                self.path(),
                format!(
                    "the file now holds volume {}, not {}; it was replaced while served",
                    h.uuid,
                    self.uuid()
                ),
            ));
        }
        h.verify_with_dek(dek, path)?;
        if h.size != self.size() {
            return Err(resize_err(
                self.path(),
                format!(
                    "the header records {} bytes but {} are served; restart the daemon to serve what the header says",
                    h.size,
                    self.size()
                ),
            ));
        }
        Ok(h)
    }

    /// Takes a committed grow into memory, in the order of this module's comment.
    fn take_growth(&self, new: &Header, relocated: bool) {
        if let (Some(map), Some(layout)) = (&self.map, new.allocation_map) {
            map.grow(layout, new.size, relocated);
        }
        if let Some(t) = self.tracking.get() {
            t.grow(new.size);
            if let Err(e) = t.save(&self.uuid(), true) {
                tracing::warn!(path = %self.path(), "cannot save changed-chunk tracking after growing: {e}");
            }
        }
        self.geo.size.store(new.size, Ordering::Release);
    }

    /// A grow failed: when its header commit reached the disk anyway (an error after the
    /// first copy was written), memory must follow the header, whose map place may have
    /// changed; otherwise nothing on disk that the old header describes was changed.
    fn recover_failed_growth(&self, old: &Header, dek: &crate::crypto::Dek) {
        let Ok((h, _)) = read_header(Path::new(self.path())) else {
            return;
        };
        if h.uuid == old.uuid
            && h.size > old.size
            && h.verify_with_dek(dek, Path::new(self.path())).is_ok()
        {
            tracing::warn!(path = %self.path(), size = h.size, "the grow failed after its header was written: serving the new size");
            let relocated = h.allocation_map != old.allocation_map;
            self.take_growth(&h, relocated);
        }
    }
}

#[cfg(test)]
mod tests;
