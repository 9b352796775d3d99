//! Copy-before-write for snapshot views: while a view is active, the first write to a
//! snapshot chunk the view has not read yet first preserves the chunk's old ciphertext
//! (and allocation state) in an unlinked temporary file. Also the pre-write hook every
//! write path runs under its range lock (changed-chunk marking, then preservation).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::io::lock_ignoring_poison;
use super::sectors::Span;
use super::tracking::SNAPSHOT_CHUNK;
use super::{Volume, VolumeError};

/// Copy-before-write state of a volume: the active view's preserved chunks, if any.
#[derive(Default)]
pub(super) struct CowState {
    /// A snapshot view is active: writes preserve old chunks first.
    pub(super) active: AtomicBool,
    /// The active view's copy-before-write state.
    pub(super) view: Mutex<Option<Arc<Cow>>>,
}

/// Copy-before-write state of an active snapshot view.
pub(super) struct Cow {
    inner: Mutex<CowInner>,
}

impl Cow {
    /// Nothing read or preserved yet.
    pub(super) fn new() -> Self {
        Self {
            inner: Mutex::new(CowInner {
                done: HashSet::new(),
                preserved: HashMap::new(),
                spill: None,
                spill_len: 0,
            }),
        }
    }

    /// The state, locked: held by a view's read of a chunk so that no writer passes
    /// its copy-before-write step for that chunk meanwhile.
    pub(super) fn lock(&self) -> MutexGuard<'_, CowInner> {
        lock_ignoring_poison(&self.inner)
    }
}

pub(super) struct CowInner {
    /// Chunks the view has read or preserved: writes to them need nothing more.
    pub(super) done: HashSet<u64>,
    /// Preserved chunks: offset in `spill` of the raw ciphertext, and the allocation
    /// state of each allocation chunk inside it at the time.
    pub(super) preserved: HashMap<u64, (u64, Vec<bool>)>,
    /// An unlinked temporary file next to the volume holding preserved ciphertext.
    pub(super) spill: Option<File>,
    pub(super) spill_len: u64,
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
    /// Called by every write path right after it took the range lock over `span`,
    /// before it changes anything there: marks the chunks changed and, while a
    /// snapshot view is active, preserves their old contents first.
    pub(super) fn before_write(&self, span: Span) -> Result<(), VolumeError> {
        let ss = u64::from(self.sector_size());
        let (a, b) = (span.first * ss, span.end * ss);
        if let Some(t) = self.tracking.get() {
            t.mark(a, b);
        }
        if !self.cow.active.load(Ordering::Acquire) || b <= a {
            return Ok(());
        }
        let cow = lock_ignoring_poison(&self.cow.view).clone();
        if let Some(cow) = cow {
            for c in a / SNAPSHOT_CHUNK..b.div_ceil(SNAPSHOT_CHUNK) {
                self.preserve(&cow, c)?;
            }
        }
        Ok(())
    }

    pub(super) fn chunk_bounds(&self, c: u64) -> (u64, u64) {
        let a = c * SNAPSHOT_CHUNK;
        (a, (a + SNAPSHOT_CHUNK).min(self.size()))
    }

    /// Allocation state of each allocation chunk in snapshot chunk `c`.
    pub(super) fn alloc_bits(&self, c: u64) -> Vec<bool> {
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
        let mut inner = cow.lock();
        if inner.done.contains(&c) {
            return Ok(());
        }
        let (a, b) = self.chunk_bounds(c);
        let ss = u64::from(self.sector_size());
        let mut buf = vec![0u8; (b - a) as usize];
        self.pread_sectors(&mut buf, a / ss)?;
        let bits = self.alloc_bits(c);
        if inner.spill.is_none() {
            inner.spill = Some(spill_file(Path::new(self.path())).map_err(|e| self.io_err(e))?);
        }
        let off = inner.spill_len;
        if let Some(f) = &inner.spill {
            f.write_all_at(&buf, off).map_err(|e| self.io_err(e))?;
        }
        inner.spill_len += buf.len() as u64;
        inner.preserved.insert(c, (off, bits));
        inner.done.insert(c);
        Ok(())
    }
}
