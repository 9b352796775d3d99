//! Point-in-time snapshot views of a volume being served: [`Volume::snapshot_view`]
//! starts one (under a lock over the whole volume, flushed), [`SnapshotView`] reads its
//! chunks as of that instant (preserved by copy-before-write, or live), reports the
//! chunks changed since a base snapshot and ends copy-before-write when dropped.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::cow::Cow;
use super::io::lock_ignoring_poison;
use super::sectors::Span;
use super::tracking::{Tracking, SNAPSHOT_CHUNK};
use super::{Volume, VolumeError};

impl Volume {
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
            let mut cow = lock_ignoring_poison(&self.cow.view);
            if self.reenc.active.load(Ordering::Acquire) {
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
            *cow = Some(Arc::new(Cow::new()));
        }
        self.cow.active.store(true, Ordering::Release);
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
#[derive(Debug)]
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
        let ss = u64::from(v.sector_size());
        // Lock order: the chunk's range lock, then the view's lock, as a writer takes
        // them (range lock, then copy-before-write). Taking the view's lock first and
        // then a range lock inside `read_at` (which it does when a punch or a
        // re-encryption is under way) deadlocks with a writer of this chunk.
        let _range = v.locks.lock(Span {
            first: a / ss,
            end: b.div_ceil(ss),
        });
        let cow = lock_ignoring_poison(&v.cow.view).clone();
        let Some(cow) = cow else {
            return Err(VolumeError::Snapshot {
                path: v.path().to_string(),
                detail: "the snapshot view has ended".into(),
            });
        };
        let mut inner = cow.lock();
        if let Some((off, bits)) = inner.preserved.remove(&index) {
            let f = inner.spill.as_ref().ok_or_else(|| VolumeError::Snapshot {
                path: v.path().to_string(),
                detail: "preserved chunk lost".into(),
            })?;
            f.read_exact_at(buf, off).map_err(|e| v.io_err(e))?;
            v.decrypt(buf, a / ss)?;
            return Ok(zero_unallocated(v, buf, &bits));
        }
        // Not written since the view started: read it live. The chunk's range lock keeps
        // every writer (and trim) of it out meanwhile, so the map and the file agree and
        // the map-aware read needs no lock of its own.
        let bits = v.alloc_bits(index);
        if bits.iter().all(|&x| !x) {
            buf.fill(0);
        } else {
            if v.reenc.active.load(Ordering::Acquire) {
                v.check_broken_zone(Span {
                    first: a / ss,
                    end: b.div_ceil(ss),
                })?;
            }
            v.read_mapped(buf, a)?;
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
            t.set_base(id);
            t.save(&v.uuid(), true).map_err(|e| v.io_err(e))?;
        }
        *lock_ignoring_poison(&self.completed) = true;
        Ok(())
    }
}

/// Test-only slow-down of each snapshot chunk read or restore write (so that tests can
/// write while a snapshot is read out, or interrupt one reliably however fast the build):
/// `CRYPTVOL_TEST_SNAPSHOT_DELAY_MS`, honoured only with `CRYPTVOL_FAULT_INJECTION=1`.
/// With `CRYPTVOL_TEST_SNAPSHOT_GATE=FILE` too, each one first waits until FILE exists
/// (at most [`TEST_GATE_LIMIT`]), so that a test can order its writes before any chunk
/// is read by an event rather than by the clock.
pub fn test_delay() {
    if std::env::var_os("CRYPTVOL_FAULT_INJECTION").is_some_and(|v| v == "1") {
        if let Some(gate) = std::env::var_os("CRYPTVOL_TEST_SNAPSHOT_GATE") {
            wait_for_gate(std::path::Path::new(&gate));
        }
        if let Some(ms) = std::env::var("CRYPTVOL_TEST_SNAPSHOT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
        }
    }
}

/// The longest a test gate ([`test_delay`]) holds a chunk back.
const TEST_GATE_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Waits until `gate` exists, at most [`TEST_GATE_LIMIT`] (test-only).
fn wait_for_gate(gate: &std::path::Path) {
    let deadline = std::time::Instant::now() + TEST_GATE_LIMIT;
    while !gate.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
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
        v.cow.active.store(false, Ordering::Release);
        *lock_ignoring_poison(&v.cow.view) = None;
        if !*lock_ignoring_poison(&self.completed) {
            // The snapshot did not complete: its changes still count for the next one.
            if let (Some(t), Some((_, words))) = (v.tracking.get(), &self.tracked) {
                t.restore(words);
            }
        }
    }
}

#[cfg(test)]
mod tests;
