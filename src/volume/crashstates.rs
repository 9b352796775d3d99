//! Crash-state enumeration (test builds only): a recording engine behind the
//! [`FileEngine`] seam and an enumerator of every on-disk state a power cut could leave.
//!
//! Recording: [`Recorder::start`] registers a directory; every engine made by
//! [`engine_for`](super::engine::engine_for) for a file in it (the volume's, the header
//! update's, a new volume's, a restore's partial file) is a [`RecordingEngine`], which
//! passes each call to the real file and logs every write, length change, hole punch
//! and sync of that file, in call order; [`note_linked`] logs a restore's publication
//! of its partial file under the final name (which a state then includes or not).
//!
//! Enumeration ([`enumerate`]): the log of one file is cut into sync epochs (the events
//! between two syncs). A crash in epoch `k` leaves the pre-operation image with every
//! event of the epochs before `k` (synced, so durable), plus any subset of epoch `k`'s
//! events, because the page cache may have written back any of them, and any part of
//! a write, down to the 512-byte sector a disk writes atomically (torn writes). Sectors
//! that a write leaves unchanged (and that nothing else in the epoch writes) are
//! dropped. Each epoch is enumerated twice over:
//! - whole writes (each write, length change, hole punch, publication reaches the
//!   disk or not):
//!   all `2^n` subsets of the epoch's `n` writes when `n <= EXHAUSTIVE_UNITS` (12);
//! - sectors (torn writes), when a write spans more than one changed sector: all
//!   subsets of the `n` sectors when `n <= EXHAUSTIVE_UNITS`.
//!
//! Above the bound, either level is sampled: every prefix, every single omission (all
//! but one unit) and every single unit at up to `SPREAD` (8) evenly spaced positions
//! each (all positions when `n <= SPREAD`), plus `RANDOM_SUBSETS` (24) random subsets
//! from a fixed seed (xorshift64*, seeded by the epoch's index), so runs are
//! reproducible.
//!
//! A subset is applied in the order the events were recorded. Each state is written to
//! a scratch file (sparse: images hold only the pages read as data or written, see
//! [`Image`]) and handed to the caller's check, once per distinct (epoch, subset).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::engine::{FileEngine, StdFileEngine};

mod image;
pub(crate) use image::Image;

/// The disk's atomic write unit: writes are split at these boundaries.
pub(crate) const SECTOR: u64 = 512;
/// Up to this many units in an epoch, every subset is built.
pub(crate) const EXHAUSTIVE_UNITS: usize = 12;
/// Positions of prefixes, single omissions and single units when sampling.
pub(crate) const SPREAD: usize = 8;
/// Random subsets per sampled epoch.
pub(crate) const RANDOM_SUBSETS: usize = 24;

/// One recorded call on a file.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    Write {
        offset: u64,
        bytes: Vec<u8>,
    },
    SetLen(u64),
    Punch {
        offset: u64,
        len: u64,
    },
    Sync,
    /// The file was given its final name (a restore's `.FILE.partial` published).
    Linked,
}

#[derive(Default)]
struct Log {
    events: Mutex<Vec<(PathBuf, Event)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Log {
    fn push(&self, path: &Path, event: Event) {
        lock(&self.events).push((path.to_path_buf(), event));
    }
}

/// The directories being recorded, and their logs.
static RECORDING: Mutex<Vec<(PathBuf, Arc<Log>)>> = Mutex::new(Vec::new());

/// Records the files of one directory while alive.
pub(crate) struct Recorder {
    dir: PathBuf,
    log: Arc<Log>,
}

impl Recorder {
    /// Starts recording every engine opened for a file directly in `dir`.
    pub(crate) fn start(dir: &Path) -> Recorder {
        let log = Arc::new(Log::default());
        lock(&RECORDING).push((dir.to_path_buf(), Arc::clone(&log)));
        Recorder {
            dir: dir.to_path_buf(),
            log,
        }
    }

    /// Takes the events recorded so far for `file` (and forgets every file's events).
    pub(crate) fn take(&self, file: &Path) -> Vec<Event> {
        std::mem::take(&mut *lock(&self.log.events))
            .into_iter()
            .filter(|(p, _)| p == file)
            .map(|(_, e)| e)
            .collect()
    }
}

/// Records that `partial` was published under its final name (called by
/// `ops::partial::publish_partial` after the link).
pub(crate) fn note_linked(partial: &Path) {
    let Some(dir) = partial.parent() else {
        return;
    };
    let log = lock(&RECORDING)
        .iter()
        .find(|(d, _)| d == dir)
        .map(|(_, l)| Arc::clone(l));
    if let Some(log) = log {
        log.push(partial, Event::Linked);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        lock(&RECORDING).retain(|(d, l)| !(d == &self.dir && Arc::ptr_eq(l, &self.log)));
    }
}

/// The engine for `path` when its directory is being recorded.
pub(super) fn recording_engine(path: &Path, inner: &StdFileEngine) -> Option<Box<dyn FileEngine>> {
    let dir = path.parent()?;
    let log = lock(&RECORDING)
        .iter()
        .find(|(d, _)| d == dir)
        .map(|(_, l)| Arc::clone(l))?;
    Some(Box::new(RecordingEngine {
        inner: inner.clone(),
        path: path.to_path_buf(),
        log,
    }))
}

/// Passes every call to the real engine and logs what changes the file.
struct RecordingEngine {
    inner: StdFileEngine,
    path: PathBuf,
    log: Arc<Log>,
}

impl std::fmt::Debug for RecordingEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingEngine")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RecordingEngine {
    fn logged(&self, r: std::io::Result<()>, event: Event) -> std::io::Result<()> {
        if r.is_ok() {
            self.log.push(&self.path, event);
        }
        r
    }
}

impl FileEngine for RecordingEngine {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.inner.write_all_at(buf, offset);
        let bytes = buf.to_vec();
        self.logged(r, Event::Write { offset, bytes })
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.logged(self.inner.sync_data(), Event::Sync)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.logged(
            self.inner.punch_hole(offset, len),
            Event::Punch { offset, len },
        )
    }

    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.logged(self.inner.set_len(len), Event::SetLen(len))
    }

    fn sync_all(&self) -> std::io::Result<()> {
        self.logged(self.inner.sync_all(), Event::Sync)
    }
}

/// Applies one event to an image.
fn apply(img: &mut Image, event: &Event) {
    match event {
        Event::Write { offset, bytes } => img.write(*offset, bytes),
        Event::SetLen(len) => img.set_len(*len),
        Event::Punch { offset, len } => img.zero(*offset, offset.saturating_add(*len)),
        Event::Sync | Event::Linked => {}
    }
}

/// The events of one epoch as units (writes split at sector boundaries), without the
/// sectors a write leaves as they are in `durable` and nothing else here writes. Each
/// unit comes with the index of the event it is part of.
fn units(events: &[Event], durable: &Image) -> Vec<(usize, Event)> {
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let Event::Write { offset, bytes } = e else {
            out.push((i, e.clone()));
            continue;
        };
        let end = offset + bytes.len() as u64;
        let mut pos = *offset;
        while pos < end {
            let next = ((pos / SECTOR + 1) * SECTOR).min(end);
            let piece = &bytes[(pos - offset) as usize..(next - offset) as usize];
            out.push((
                i,
                Event::Write {
                    offset: pos,
                    bytes: piece.to_vec(),
                },
            ));
            pos = next;
        }
    }
    let sector_of = |e: &Event| match e {
        Event::Write { offset, .. } => Some(offset / SECTOR),
        _ => None,
    };
    let written: Vec<Option<u64>> = out.iter().map(|(_, e)| sector_of(e)).collect();
    let unchanged = |i: usize, e: &Event| match e {
        Event::Write { offset, bytes } => {
            durable.read(*offset, bytes.len()).as_deref() == Some(&bytes[..])
                && written.iter().filter(|w| **w == written[i]).count() == 1
        }
        _ => false,
    };
    let keep: Vec<bool> = out
        .iter()
        .enumerate()
        .map(|(i, (_, e))| !unchanged(i, e))
        .collect();
    out.into_iter()
        .zip(keep)
        .filter_map(|(u, k)| k.then_some(u))
        .collect()
}

/// The subsets of an epoch's units to build, as masks over the units: first at the
/// granularity of whole writes (each write reaches the disk or not), then at the
/// granularity of sectors (torn writes). The second adds nothing when no write spans
/// more than one changed sector. Returns the masks and the number of whole writes.
fn masks(units: &[(usize, Event)], epoch: usize) -> (Vec<Vec<bool>>, usize) {
    let mut writes: Vec<usize> = units.iter().map(|(w, _)| *w).collect();
    writes.dedup();
    let index: Vec<usize> = units
        .iter()
        .map(|(w, _)| writes.iter().position(|x| x == w).unwrap_or(0))
        .collect();
    let mut out: Vec<Vec<bool>> = subsets(writes.len(), epoch)
        .into_iter()
        .map(|m| index.iter().map(|&i| m[i]).collect())
        .collect();
    if units.len() > writes.len() {
        out.extend(subsets(units.len(), epoch));
    }
    (out, writes.len())
}

/// xorshift64*: reproducible "random" subsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Up to `SPREAD` evenly spaced positions in `0..n` (all of them when `n <= SPREAD`).
fn spread(n: usize) -> Vec<usize> {
    if n <= SPREAD {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..SPREAD).map(|i| i * (n - 1) / (SPREAD - 1)).collect();
    v.dedup();
    v
}

/// The subsets of `n` units to build for epoch `epoch` (see the module comment).
pub(crate) fn subsets(n: usize, epoch: usize) -> Vec<Vec<bool>> {
    if n <= EXHAUSTIVE_UNITS {
        return (0..1u32 << n)
            .map(|m| (0..n).map(|i| m & (1 << i) != 0).collect())
            .collect();
    }
    let mut out = Vec::new();
    for k in spread(n + 1) {
        out.push((0..n).map(|i| i < k).collect());
    }
    for j in spread(n) {
        out.push((0..n).map(|i| i != j).collect());
        out.push((0..n).map(|i| i == j).collect());
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (epoch as u64 + 1));
    for _ in 0..RANDOM_SUBSETS {
        out.push((0..n).map(|_| rng.next() & 1 == 1).collect());
    }
    out
}

/// What an enumeration did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Sync epochs in the recording (a crash can land in each).
    pub epochs: usize,
    /// Epochs with more than `EXHAUSTIVE_UNITS` units (subsets sampled).
    pub sampled_epochs: usize,
    /// Distinct states built and checked.
    pub states: usize,
    /// The most whole writes (and other events) in one epoch, and the most units.
    pub max_writes: usize,
    pub max_units: usize,
}

/// One crash state: the scratch file holding it (absent when the file was absent).
pub(crate) struct State<'a> {
    pub path: &'a Path,
    /// Whether every event of the operation reached the disk.
    pub complete: bool,
    /// Whether the file's publication under its final name is part of the state.
    pub linked: bool,
}

/// Builds every crash state of `events` over `base` (`None`: the file did not exist
/// before; [`Image::read_file`] reads a volume file) at `scratch`, and runs `check` on
/// each; stops at the first failure, which names the epoch and the subset.
pub(crate) fn enumerate(
    base: Option<&Image>,
    events: &[Event],
    scratch: &Path,
    mut check: impl FnMut(&State) -> Result<(), String>,
) -> Result<Counts, String> {
    let epochs: Vec<&[Event]> = events.split(|e| matches!(e, Event::Sync)).collect();
    let mut counts = Counts {
        epochs: epochs.len(),
        ..Counts::default()
    };
    let last_change = epochs.iter().rposition(|e| !e.is_empty()).unwrap_or(0);
    let mut durable: Option<Image> = base.cloned();
    let mut linked = false;
    // A new file may be absent after a crash (its directory entry not yet durable), or
    // present with any subset of what was written to it (below, from empty).
    if durable.is_none() {
        let _ = std::fs::remove_file(scratch);
        check(&State {
            path: scratch,
            complete: events.is_empty(),
            linked: false,
        })
        .map_err(|e| format!("file absent: {e}"))?;
        counts.states += 1;
    }
    for (k, epoch) in epochs.iter().enumerate() {
        let start = durable.clone().unwrap_or_default();
        let units = units(epoch, &start);
        let (masks, writes) = masks(&units, k);
        if units.len() > EXHAUSTIVE_UNITS {
            counts.sampled_epochs += 1;
        }
        counts.max_writes = counts.max_writes.max(writes);
        counts.max_units = counts.max_units.max(units.len());
        let epoch_at = EpochAt {
            index: k,
            of: epochs.len(),
            start: &start,
            linked,
            last: k >= last_change,
        };
        counts.states += check_epoch(&epoch_at, &units, masks, scratch, &mut check)?;
        let mut next = start;
        for e in *epoch {
            apply(&mut next, e);
            linked |= matches!(e, Event::Linked);
        }
        durable = Some(next);
    }
    Ok(counts)
}

/// Where an epoch is: its index (of how many), the durable image it starts from,
/// whether the file was published before it, whether it is the last one that changes
/// anything.
struct EpochAt<'a> {
    index: usize,
    of: usize,
    start: &'a Image,
    linked: bool,
    last: bool,
}

/// Builds and checks the states of one epoch, once per distinct subset (its empty
/// subset is the previous epoch complete, checked already). Returns how many.
fn check_epoch(
    at: &EpochAt,
    units: &[(usize, Event)],
    masks: Vec<Vec<bool>>,
    scratch: &Path,
    check: &mut impl FnMut(&State) -> Result<(), String>,
) -> Result<usize, String> {
    let mut seen = std::collections::HashSet::new();
    for mask in masks {
        let empty = !mask.iter().any(|&b| b);
        if (empty && at.index > 0) || !seen.insert(mask.clone()) {
            continue;
        }
        let mut img = at.start.clone();
        let mut linked = at.linked;
        for ((_, u), _) in units.iter().zip(&mask).filter(|(_, &m)| m) {
            apply(&mut img, u);
            linked |= matches!(u, Event::Linked);
        }
        img.save(scratch).map_err(|e| format!("scratch: {e}"))?;
        let state = State {
            path: scratch,
            complete: at.last && mask.iter().all(|&b| b),
            linked,
        };
        check(&state).map_err(|e| {
            format!(
                "epoch {} of {}, units {} of {}: {e}",
                at.index,
                at.of,
                ranges(&mask),
                units.len()
            )
        })?;
    }
    Ok(seen.len())
}

/// The units a subset applies, as ranges (`0-3, 7`).
fn ranges(mask: &[bool]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < mask.len() {
        if !mask[i] {
            i += 1;
            continue;
        }
        let a = i;
        while i < mask.len() && mask[i] {
            i += 1;
        }
        out.push(if i - a == 1 {
            a.to_string()
        } else {
            format!("{a}-{}", i - 1)
        });
    }
    if out.is_empty() {
        return "none".into();
    }
    out.join(", ")
}

/// The line each enumeration prints (`cargo test -- --nocapture` shows it).
pub(crate) fn report(name: &str, c: &Counts) {
    println!(
        "crash states: {name}: {} states opened ({} sync epochs, {} sampled; largest epoch: {} writes, {} sectors)",
        c.states, c.epochs, c.sampled_epochs, c.max_writes, c.max_units
    );
}

/// The scratch file for states: in /dev/shm when there is one (tmpfs), else beside
/// the test's files.
pub(crate) fn scratch_dir(fallback: &Path) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("crashstates")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir_in(fallback))
        .expect("scratch directory")
}

#[cfg(test)]
mod tests;
