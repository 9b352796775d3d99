//! The allocation map of a thin volume: one bit per chunk of the data area.
//!
//! A clear bit means "never written (or zeroed)": the chunk reads as zeros without
//! touching the backing file. A set bit means the whole chunk holds valid ciphertext.
//! See docs/format.md §7 for the on-disk layout and the crash-safety argument.
//!
//! Crash-safety rules (enforced here and in `io.rs`):
//! - A bit is set in memory only after the whole chunk's ciphertext was written
//!   (`pwrite` returned), and reaches the disk only in [`AllocMap::persist`], which
//!   takes the pending changes *first*, then syncs the data, then writes the map pages.
//!   So a persisted set bit always points to data that was durable before it.
//! - Each map page has two copies; a persist overwrites only the copy that is *not*
//!   the newest valid one, so a torn page write leaves the previous state intact.
//! - A hole is punched only after the cleared bit is durable (see `io.rs`), so no
//!   persisted set bit ever points at a punched hole.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use sha2::{Digest, Sha256};

use super::engine::FileEngine;

/// The required feature naming a volume with an allocation map.
pub const FEATURE: &str = "allocation-map";
/// Chunk size of new volumes: one map bit per 64 KiB (see docs/format.md §7).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Size of one map page on disk.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of page header before the bitmap payload.
const PAGE_HEADER: usize = 96;
/// Bitmap bytes per page.
const PAYLOAD: usize = PAGE_SIZE - PAGE_HEADER;
/// Chunks described by one page (32000; a multiple of 64).
pub const CHUNKS_PER_PAGE: u64 = (PAYLOAD * 8) as u64;
const WORDS_PER_PAGE: usize = PAYLOAD / 8;
const PAGE_MAGIC: [u8; 8] = *b"CVALLOC1";
const OFF_INDEX: usize = 8;
const OFF_COPY: usize = 16;
const OFF_SEQ: usize = 24;
const OFF_UUID: usize = 32;
pub(super) const OFF_CSUM: usize = 64;
/// Where the map area starts: right after the two header copies.
const MAP_AREA_START: u64 = super::header::HEADER_AREA_SIZE;

/// Where the two copies of the map live and how big a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    /// Bytes of data area per bit.
    pub chunk_size: u32,
    /// Pages per copy.
    pub pages: u64,
    /// File offsets of copy 0 and copy 1.
    pub copy_offsets: [u64; 2],
}

impl MapLayout {
    /// The layout for a new volume of `size` bytes, and the data offset that leaves
    /// room for it (at least 1 MiB, rounded up to a MiB).
    pub fn for_size(size: u64) -> (MapLayout, u64) {
        let chunk_size = DEFAULT_CHUNK_SIZE;
        let chunks = size.div_ceil(u64::from(chunk_size));
        let pages = chunks.div_ceil(CHUNKS_PER_PAGE).max(1);
        let copy_bytes = pages * PAGE_SIZE as u64;
        let end = MAP_AREA_START + 2 * copy_bytes;
        let data_offset = end.div_ceil(1 << 20).max(1) << 20;
        (
            MapLayout {
                chunk_size,
                pages,
                copy_offsets: [MAP_AREA_START, MAP_AREA_START + copy_bytes],
            },
            data_offset.max(super::DEFAULT_DATA_OFFSET),
        )
    }

    /// Number of chunks of a data area of `size` bytes.
    pub fn chunks(&self, size: u64) -> u64 {
        size.div_ceil(u64::from(self.chunk_size))
    }

    /// Semantic checks against the volume geometry (header validation).
    pub fn validate(&self, size: u64, sector_size: u32, data_offset: u64) -> Result<(), String> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two()
            || cs < 4096
            || cs < sector_size
            || cs as usize > super::WRITE_CHUNK
        {
            return Err(format!(
                "allocation map chunk size {cs} (must be a power of two from 4096 to {} and at least the sector size)",
                super::WRITE_CHUNK
            ));
        }
        let need = self.chunks(size).div_ceil(CHUNKS_PER_PAGE).max(1);
        if self.pages != need {
            return Err(format!(
                "allocation map has {} pages, a {size}-byte volume needs {need}",
                self.pages
            ));
        }
        let copy_bytes = self
            .pages
            .checked_mul(PAGE_SIZE as u64)
            .ok_or("allocation map size overflows")?;
        let [a, b] = self.copy_offsets;
        for off in [a, b] {
            let end = off
                .checked_add(copy_bytes)
                .ok_or("allocation map overflows")?;
            if off < MAP_AREA_START || !off.is_multiple_of(PAGE_SIZE as u64) || end > data_offset {
                return Err(format!(
                    "allocation map copy at {off} (+{copy_bytes}) must be 4096-aligned and lie between the header copies and the data offset {data_offset}"
                ));
            }
        }
        if a.max(b) - a.min(b) < copy_bytes {
            return Err("the two allocation map copies overlap".into());
        }
        Ok(())
    }

    fn page_offset(&self, copy: usize, page: u64) -> u64 {
        self.copy_offsets[copy & 1] + page * PAGE_SIZE as u64
    }
}

pub(super) fn page_checksum(page: &[u8; PAGE_SIZE]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&page[..OFF_CSUM]);
    h.update([0u8; 32]);
    h.update(&page[OFF_CSUM + 32..]);
    h.finalize().into()
}

/// Encodes one page: header (magic, page index, copy, sequence, volume UUID, SHA-256)
/// and the bitmap words `words` (little-endian, chunk `i` of the page = bit `i % 64`
/// of word `i / 64`).
pub(super) fn encode_page(
    uuid: &uuid::Uuid,
    index: u64,
    copy: usize,
    seq: u64,
    words: &[u64],
) -> Box<[u8; PAGE_SIZE]> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    p[..8].copy_from_slice(&PAGE_MAGIC);
    p[OFF_INDEX..OFF_INDEX + 8].copy_from_slice(&index.to_le_bytes());
    p[OFF_COPY] = copy as u8;
    p[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    p[OFF_UUID..OFF_UUID + 16].copy_from_slice(uuid.as_bytes());
    for (i, w) in words.iter().take(WORDS_PER_PAGE).enumerate() {
        let at = PAGE_HEADER + i * 8;
        p[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    let sum = page_checksum(&p);
    p[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
    p
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Decodes a page read from copy `copy` at index `index`: its sequence number and
/// words, or why it is not valid.
pub(super) fn decode_page(
    p: &[u8; PAGE_SIZE],
    uuid: &uuid::Uuid,
    index: u64,
    copy: usize,
) -> Result<(u64, Vec<u64>), String> {
    if p[..8] != PAGE_MAGIC {
        return Err(if p.iter().all(|&b| b == 0) {
            "never written (all zeros)".into()
        } else {
            "bad magic".into()
        });
    }
    if page_checksum(p)[..] != p[OFF_CSUM..OFF_CSUM + 32] {
        return Err("checksum mismatch (torn or damaged)".into());
    }
    if le64(p, OFF_INDEX) != index || usize::from(p[OFF_COPY]) != copy {
        return Err("misplaced page (index or copy number differs)".into());
    }
    if &p[OFF_UUID..OFF_UUID + 16] != uuid.as_bytes() {
        return Err("page belongs to another volume".into());
    }
    if p[OFF_COPY + 1..OFF_SEQ]
        .iter()
        .chain(&p[OFF_UUID + 16..OFF_CSUM])
        .any(|&b| b != 0)
    {
        return Err("non-zero reserved bytes".into());
    }
    let words = (0..WORDS_PER_PAGE)
        .map(|i| le64(p, PAGE_HEADER + i * 8))
        .collect();
    Ok((le64(p, OFF_SEQ), words))
}

/// Per-page bookkeeping of the two on-disk copies.
#[derive(Debug, Clone, Copy, Default)]
struct PageMeta {
    /// Sequence of each copy, `None` when that copy is not valid.
    seq: [Option<u64>; 2],
}

impl PageMeta {
    /// The copy to overwrite next: one that is not the newest valid copy.
    fn target(&self) -> usize {
        match self.seq {
            [Some(a), Some(b)] => usize::from(a > b),
            [Some(_), None] => 1,
            _ => 0,
        }
    }
    fn next_seq(&self) -> u64 {
        self.seq
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or(0)
            .saturating_add(1)
    }
}

/// What loading the map found (reported by `cryptvol info`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapHealth {
    /// Pages per copy.
    pub pages: u64,
    /// Pages where one copy is damaged or stale-and-invalid (the other was used; the
    /// bad copy is rewritten by the next map update).
    pub pages_one_copy_bad: u64,
    /// Pages with no valid copy: their chunks are treated as allocated (nothing is
    /// lost, but never-written chunks there read as pseudo-random bytes).
    pub pages_damaged: Vec<u64>,
}

impl MapHealth {
    pub fn is_healthy(&self) -> bool {
        self.pages_one_copy_bad == 0 && self.pages_damaged.is_empty()
    }
}

/// Result of reading both copies of the whole map.
struct Loaded {
    words: Vec<u64>,
    metas: Vec<PageMeta>,
    health: MapHealth,
    /// Pages to rewrite (a copy is bad or the page was damaged).
    repair: BTreeSet<u64>,
}

fn read_page(file: &dyn FileEngine, off: u64) -> std::io::Result<Box<[u8; PAGE_SIZE]>> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    // Beyond EOF reads as zeros (an invalid page).
    file.read_exact_at(&mut p[..], off)?;
    Ok(p)
}

/// An error about the map's geometry (from a header that is damaged or forged), as an
/// `InvalidData` I/O error so that callers can tell it from a failed read.
fn geometry_error(detail: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, detail)
}

/// Bounds the map's geometry by the file that should hold it, before anything is
/// allocated from it: the header is not authenticated yet when `info` or `check` read
/// the map, so its page count is a number anyone who can write the file chose. Both
/// copies must lie inside the file (they are written when the volume is created), and
/// the memory for the map is reserved fallibly, so that a forged count is a clear error
/// instead of an abort.
fn bounded_words(
    file: &dyn FileEngine,
    layout: &MapLayout,
    size: u64,
) -> std::io::Result<(Vec<u64>, usize)> {
    let forged = |what: String| {
        geometry_error(format!(
            "allocation map of {} pages {what} (volume size {size} bytes); the header is damaged or forged",
            layout.pages
        ))
    };
    let copy_bytes = layout
        .pages
        .checked_mul(PAGE_SIZE as u64)
        .ok_or_else(|| forged("overflows".into()))?;
    let len = file.len()?;
    for off in layout.copy_offsets {
        if off.checked_add(copy_bytes).is_none_or(|end| end > len) {
            return Err(forged(format!(
                "({copy_bytes} bytes per copy, one at offset {off}) does not fit in the file of {len} bytes"
            )));
        }
    }
    let pages = usize::try_from(layout.pages).map_err(|_| forged("is too large".into()))?;
    let nwords = pages
        .checked_mul(WORDS_PER_PAGE)
        .ok_or_else(|| forged("is too large".into()))?;
    let mut words: Vec<u64> = Vec::new();
    words.try_reserve_exact(nwords).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!(
                "cannot allocate {} MiB of memory for the allocation map of {} pages",
                (nwords as u64 * 8) >> 20,
                layout.pages
            ),
        )
    })?;
    words.resize(nwords, 0);
    Ok((words, pages))
}

fn load(
    file: &dyn FileEngine,
    layout: &MapLayout,
    uuid: &uuid::Uuid,
    size: u64,
) -> std::io::Result<Loaded> {
    let nchunks = layout.chunks(size);
    let (mut words, pages) = bounded_words(file, layout, size)?;
    let mut metas = Vec::new();
    metas
        .try_reserve_exact(pages)
        .map_err(|_| geometry_error(format!("allocation map of {pages} pages is too large")))?;
    metas.resize(pages, PageMeta::default());
    let mut health = MapHealth {
        pages: layout.pages,
        ..MapHealth::default()
    };
    let mut repair = BTreeSet::new();
    for page in 0..layout.pages {
        let mut best: Option<(u64, Vec<u64>)> = None;
        let meta = &mut metas[page as usize];
        for copy in 0..2 {
            let raw = read_page(file, layout.page_offset(copy, page))?;
            if let Ok((seq, w)) = decode_page(&raw, uuid, page, copy) {
                meta.seq[copy] = Some(seq);
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, w));
                }
            }
        }
        let base = page as usize * WORDS_PER_PAGE;
        match best {
            Some((_, w)) => {
                words[base..base + WORDS_PER_PAGE].copy_from_slice(&w);
                if meta.seq.iter().any(Option::is_none) {
                    health.pages_one_copy_bad += 1;
                    repair.insert(page);
                }
            }
            None => {
                words[base..base + WORDS_PER_PAGE].fill(u64::MAX);
                health.pages_damaged.push(page);
                repair.insert(page);
            }
        }
    }
    // Bits beyond the last chunk are meaningless: keep them clear.
    clear_tail(&mut words, nchunks);
    Ok(Loaded {
        words,
        metas,
        health,
        repair,
    })
}

fn clear_tail(words: &mut [u64], nchunks: u64) {
    let full = (nchunks / 64) as usize;
    let rem = nchunks % 64;
    if let Some(w) = words.get_mut(full) {
        *w &= if rem == 0 { 0 } else { (1u64 << rem) - 1 };
    }
    for w in words.iter_mut().skip(full + 1) {
        *w = 0;
    }
}

/// Summary of a volume's map for `cryptvol info` (no key needed: the map is not secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapSummary {
    pub chunk_size: u32,
    pub chunks: u64,
    pub allocated_chunks: u64,
    /// Bytes of the data area in allocated chunks (the last chunk may be short).
    pub allocated_bytes: u64,
    pub health: MapHealth,
}

/// Reads the map of the volume at `file` without opening it for I/O.
pub fn summarize(
    file: &dyn FileEngine,
    layout: &MapLayout,
    uuid: &uuid::Uuid,
    size: u64,
) -> std::io::Result<MapSummary> {
    let l = load(file, layout, uuid, size)?;
    let allocated_chunks: u64 = l.words.iter().map(|w| u64::from(w.count_ones())).sum();
    Ok(MapSummary {
        chunk_size: layout.chunk_size,
        chunks: layout.chunks(size),
        allocated_chunks,
        allocated_bytes: allocated_bytes(&l.words, layout.chunk_size, size),
        health: l.health,
    })
}

fn allocated_bytes(words: &[u64], chunk_size: u32, size: u64) -> u64 {
    let cs = u64::from(chunk_size);
    let chunks = size.div_ceil(cs);
    let n: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    let last = chunks.saturating_sub(1);
    let last_set = words
        .get((last / 64) as usize)
        .is_some_and(|w| w & (1 << (last % 64)) != 0);
    let short = if last_set { cs * chunks - size } else { 0 };
    n * cs - short
}

/// Writes the initial map of a new volume (both copies, sequence 1, nothing allocated).
pub fn write_initial(
    file: &dyn FileEngine,
    layout: &MapLayout,
    uuid: &uuid::Uuid,
) -> std::io::Result<()> {
    let zeros = vec![0u64; WORDS_PER_PAGE];
    for copy in 0..2 {
        for page in 0..layout.pages {
            let p = encode_page(uuid, page, copy, 1, &zeros);
            file.write_all_at(&p[..], layout.page_offset(copy, page))?;
        }
    }
    Ok(())
}

/// Writes both copies of a whole map at `layout` (sequence 1) from `words` (missing
/// words are zero), without syncing: a resize writes the grown map at a new place
/// before the header that points there is committed.
pub(crate) fn write_copies(
    file: &dyn FileEngine,
    layout: &MapLayout,
    uuid: &uuid::Uuid,
    words: &[u64],
) -> std::io::Result<()> {
    let zeros = [0u64; WORDS_PER_PAGE];
    for copy in 0..2 {
        for page in 0..layout.pages {
            let base = usize::try_from(page)
                .ok()
                .and_then(|p| p.checked_mul(WORDS_PER_PAGE))
                .unwrap_or(usize::MAX);
            let w = words
                .get(base..base.saturating_add(WORDS_PER_PAGE))
                .unwrap_or(&zeros[..]);
            let w = if w.len() == WORDS_PER_PAGE {
                w
            } else {
                &zeros[..]
            };
            let p = encode_page(uuid, page, copy, 1, w);
            file.write_all_at(&p[..], layout.page_offset(copy, page))?;
        }
    }
    Ok(())
}

struct Durable {
    /// Where the copies live (changes when an online grow moves the map).
    layout: MapLayout,
    words: Vec<u64>,
    metas: Vec<PageMeta>,
    dirty: BTreeSet<u64>,
}

pub(crate) struct AllocMap {
    chunk_size: u32,
    uuid: uuid::Uuid,
    /// Chunks of the data area (raised by an online grow).
    nchunks: AtomicU64,
    /// The bits reads and writes consult. The vector is replaced only by
    /// [`AllocMap::grow`] (write lock), which runs while no write is in flight.
    live: RwLock<Vec<AtomicU64>>,
    pending: Mutex<HashMap<u64, bool>>,
    durable: Mutex<Durable>,
    health: MapHealth,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn word_is_set(live: &[AtomicU64], chunk: u64) -> bool {
    live.get((chunk / 64) as usize)
        .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
}

impl AllocMap {
    pub fn open(
        file: &dyn FileEngine,
        layout: MapLayout,
        uuid: uuid::Uuid,
        size: u64,
    ) -> std::io::Result<AllocMap> {
        let l = load(file, &layout, &uuid, size)?;
        Ok(AllocMap {
            chunk_size: layout.chunk_size,
            uuid,
            nchunks: AtomicU64::new(layout.chunks(size)),
            live: RwLock::new(l.words.iter().map(|&w| AtomicU64::new(w)).collect()),
            pending: Mutex::new(HashMap::new()),
            durable: Mutex::new(Durable {
                layout,
                words: l.words,
                metas: l.metas,
                dirty: l.repair,
            }),
            health: l.health,
        })
    }

    fn live(&self) -> RwLockReadGuard<'_, Vec<AtomicU64>> {
        self.live.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn chunk_size(&self) -> u64 {
        u64::from(self.chunk_size)
    }
    pub fn chunks(&self) -> u64 {
        self.nchunks.load(Ordering::Acquire)
    }
    pub fn health(&self) -> &MapHealth {
        &self.health
    }

    pub fn is_allocated(&self, chunk: u64) -> bool {
        word_is_set(&self.live(), chunk)
    }

    pub fn all_allocated(&self, first: u64, end: u64) -> bool {
        let live = self.live();
        let mut c = first;
        while c < end {
            let bit = c % 64;
            let n = (64 - bit).min(end - c);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            match live.get((c / 64) as usize) {
                Some(w) if w.load(Ordering::Acquire) & mask == mask => {}
                _ => return false,
            }
            c += n;
        }
        true
    }

    pub fn runs(&self, first: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let live = self.live();
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for c in first..end.min(self.chunks()) {
            let a = word_is_set(&live, c);
            match out.last_mut() {
                Some(last) if last.2 == a => last.1 = c + 1,
                _ => out.push((c, c + 1, a)),
            }
        }
        out
    }

    pub fn set_allocated(&self, chunk: u64) {
        if let Some(w) = self.live().get((chunk / 64) as usize) {
            w.fetch_or(1 << (chunk % 64), Ordering::AcqRel);
            lock(&self.pending).insert(chunk, true);
        }
    }

    pub fn set_unallocated(&self, chunk: u64) {
        if let Some(w) = self.live().get((chunk / 64) as usize) {
            w.fetch_and(!(1 << (chunk % 64)), Ordering::AcqRel);
            lock(&self.pending).insert(chunk, false);
        }
    }

    pub fn words(&self) -> Vec<u64> {
        self.live()
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    pub fn is_dirty(&self) -> bool {
        // One lock at a time: `persist` takes `durable`, then `pending`.
        let pending = !lock(&self.pending).is_empty();
        pending || !lock(&self.durable).dirty.is_empty()
    }

    pub fn allocated(&self, size: u64) -> (u64, u64) {
        let words = self.words();
        let n = words.iter().map(|w| u64::from(w.count_ones())).sum();
        (n, allocated_bytes(&words, self.chunk_size, size))
    }

    /// Takes a grow of the data area to `size` bytes into memory, once its header is
    /// committed: the bit vector covers the new chunks (clear), and with `relocated` the
    /// map now lives at `layout`, where both copies of every page were written (at
    /// sequence 1) from the current bits. The caller holds the volume's whole range lock
    /// and has flushed the map, so no change is pending.
    pub fn grow(&self, layout: MapLayout, size: u64, relocated: bool) {
        let mut d = lock(&self.durable);
        let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
        let nwords = usize::try_from(layout.pages)
            .unwrap_or(usize::MAX)
            .saturating_mul(WORDS_PER_PAGE);
        while live.len() < nwords {
            live.push(AtomicU64::new(0));
        }
        if d.words.len() < nwords {
            d.words.resize(nwords, 0);
        }
        if relocated {
            let pages = usize::try_from(layout.pages).unwrap_or(usize::MAX);
            d.metas = vec![
                PageMeta {
                    seq: [Some(1), Some(1)],
                };
                pages
            ];
            d.words = live.iter().map(|w| w.load(Ordering::Acquire)).collect();
            d.dirty.clear();
        }
        d.layout = layout;
        self.nchunks.store(layout.chunks(size), Ordering::Release);
    }

    pub fn persist(
        &self,
        file: &dyn FileEngine,
        sync_data: &dyn Fn() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut d = lock(&self.durable);
        let layout = d.layout;
        let changes: HashMap<u64, bool> = std::mem::take(&mut *lock(&self.pending));
        if changes.is_empty() && d.dirty.is_empty() {
            drop(d);
            return sync_data();
        }
        if let Err(e) = sync_data() {
            // Keep the changes for the next attempt.
            let mut p = lock(&self.pending);
            for (c, a) in changes {
                p.entry(c).or_insert(a);
            }
            return Err(e);
        }
        super::crash_point("alloc-map-after-data-sync");
        for (&chunk, &allocated) in &changes {
            let Some(w) = d.words.get_mut((chunk / 64) as usize) else {
                continue;
            };
            if allocated {
                *w |= 1 << (chunk % 64);
            } else {
                *w &= !(1 << (chunk % 64));
            }
            d.dirty.insert(chunk / CHUNKS_PER_PAGE);
        }
        let pages: Vec<u64> = d.dirty.iter().copied().collect();
        for page in pages {
            let Some(meta) = d.metas.get(page as usize).copied() else {
                continue;
            };
            let base = page as usize * WORDS_PER_PAGE;
            let Some(words) = d
                .words
                .get(base..base + WORDS_PER_PAGE)
                .map(<[u64]>::to_vec)
            else {
                continue;
            };
            let words = &words[..];
            let copy = meta.target();
            let seq = meta.next_seq();
            let bytes = encode_page(&self.uuid, page, copy, seq, words);
            let off = layout.page_offset(copy, page);
            if super::crash_point_active("alloc-map-page-torn") {
                // Tear the page first (a half-written copy), then maybe crash; if the
                // crash point lets this hit through, the full write below repairs it.
                let _ = file.write_all_at(&bytes[..PAGE_SIZE / 2], off);
                let _ = file.sync_data();
                super::crash_point("alloc-map-page-torn");
            }
            // Until this write is known complete the target copy is not trustworthy.
            if let Some(m) = d.metas.get_mut(page as usize) {
                m.seq[copy] = None;
            }
            file.write_all_at(&bytes[..], off)?;
            if let Some(m) = d.metas.get_mut(page as usize) {
                m.seq[copy] = Some(seq);
            }
            // A page that had no valid copy at all: write the other copy too (there
            // was nothing valid in it to protect).
            let other = 1 - copy;
            if meta.seq[other].is_none() {
                let bytes = encode_page(&self.uuid, page, other, seq + 1, words);
                file.write_all_at(&bytes[..], layout.page_offset(other, page))?;
                if let Some(m) = d.metas.get_mut(page as usize) {
                    m.seq[other] = Some(seq + 1);
                }
            }
            d.dirty.remove(&page);
        }
        super::crash_point("alloc-map-before-map-sync");
        file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn uuid() -> uuid::Uuid {
        uuid::Uuid::from_bytes([7; 16])
    }

    #[test]
    fn map_geometry_is_bounded_by_the_file_before_allocating() {
        // A geometry consistent with a 2^60-byte volume, in a file of a few pages: a
        // clear InvalidData error (a header problem), not an attempt to allocate
        // terabytes.
        let size = 1u64 << 60;
        let (l, _) = MapLayout::for_size(size);
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let e = load(&f, &l, &uuid(), size).err().expect("must fail");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("does not fit in the file"), "{e}");
        // The same check holds for the second copy alone.
        let (l, off) = MapLayout::for_size(1 << 30);
        f.set_len(l.copy_offsets[1] + 4095).unwrap();
        assert!(load(&f, &l, &uuid(), 1 << 30).is_err());
        f.set_len(off).unwrap();
        write_initial(&f, &l, &uuid()).unwrap();
        assert!(load(&f, &l, &uuid(), 1 << 30).is_ok());
    }

    #[test]
    fn layout_for_small_and_large_volumes() {
        let (l, off) = MapLayout::for_size(1 << 30);
        assert_eq!(l.pages, 1);
        assert_eq!(off, 1 << 20);
        assert_eq!(l.copy_offsets, [131072, 131072 + 4096]);
        l.validate(1 << 30, 4096, off).unwrap();
        // 10 TiB: 163840 chunks... per page 32000 → 5120 pages per copy, 2 × 20 MiB.
        let size = 10u64 << 40;
        let (l, off) = MapLayout::for_size(size);
        assert_eq!(l.pages, (size / 65536).div_ceil(32000));
        assert!(off >= 131072 + 2 * l.pages * 4096);
        assert_eq!(off % (1 << 20), 0);
        l.validate(size, 512, off).unwrap();
        assert!(l.validate(size, 512, off - (1 << 20)).is_err());
        assert!(l.validate(size * 2, 512, off).is_err());
        let mut bad = l;
        bad.copy_offsets[1] = bad.copy_offsets[0] + 4096;
        assert!(bad.validate(size, 512, off).is_err());
        let mut bad = l;
        bad.chunk_size = 3000;
        assert!(bad.validate(size, 512, off).is_err());
    }

    #[test]
    fn page_roundtrip_and_damage_detection() {
        let words: Vec<u64> = (0..WORDS_PER_PAGE as u64)
            .map(|i| i * 0x9e37_79b9)
            .collect();
        let p = encode_page(&uuid(), 3, 1, 42, &words);
        let (seq, w) = decode_page(&p, &uuid(), 3, 1).unwrap();
        assert_eq!((seq, w), (42, words));
        assert!(decode_page(&p, &uuid(), 4, 1).is_err());
        assert!(decode_page(&p, &uuid(), 3, 0).is_err());
        assert!(decode_page(&p, &uuid::Uuid::nil(), 3, 1).is_err());
        for at in [0, 9, 30, 40, 70, 100, 4095] {
            let mut q = p.clone();
            q[at] ^= 1;
            assert!(decode_page(&q, &uuid(), 3, 1).is_err(), "flip at {at}");
        }
        assert!(decode_page(&Box::new([0u8; PAGE_SIZE]), &uuid(), 0, 0).is_err());
    }

    #[test]
    fn target_is_never_the_newest_valid_copy() {
        let m = |a, b| PageMeta { seq: [a, b] };
        assert_eq!(m(Some(5), Some(4)).target(), 1);
        assert_eq!(m(Some(4), Some(5)).target(), 0);
        assert_eq!(m(Some(4), None).target(), 1);
        assert_eq!(m(None, Some(4)).target(), 0);
        assert_eq!(m(None, None).target(), 0);
        assert_eq!(m(Some(4), Some(9)).next_seq(), 10);
        assert_eq!(m(None, None).next_seq(), 1);
    }

    fn file_with_map(size: u64) -> (tempfile::NamedTempFile, MapLayout) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let (l, off) = MapLayout::for_size(size);
        f.as_file().set_len(off).unwrap();
        write_initial(f.as_file(), &l, &uuid()).unwrap();
        (f, l)
    }

    #[test]
    fn persist_loads_back_and_survives_a_torn_copy() {
        let size = 3 * 32000 * 65536 + 12345 * 4096; // 4 pages, short last chunk
        let (f, l) = file_with_map(size);
        let m = AllocMap::open(f.as_file(), l, uuid(), size).unwrap();
        assert!(m.health().is_healthy());
        assert_eq!(m.chunks(), l.chunks(size));
        let last = m.chunks() - 1;
        for c in [0, 1, 63, 64, 31999, 32000, 70000, last] {
            m.set_allocated(c);
        }
        m.set_unallocated(1);
        assert!(m.all_allocated(63, 65) && !m.all_allocated(0, 2));
        m.persist(f.as_file(), &|| Ok(())).unwrap();
        let m2 = AllocMap::open(f.as_file(), l, uuid(), size).unwrap();
        let set: Vec<u64> = (0..m2.chunks()).filter(|&c| m2.is_allocated(c)).collect();
        assert_eq!(set, vec![0, 63, 64, 31999, 32000, 70000, last]);
        let (n, bytes) = m2.allocated(size);
        assert_eq!(n, 7);
        assert_eq!(bytes, 6 * 65536 + (size - last * 65536));
        // A second update goes to the other copy; tearing it keeps the first state.
        m2.set_allocated(5);
        m2.persist(f.as_file(), &|| Ok(())).unwrap();
        // The first persist wrote copy 0 (seq 2), so the second wrote copy 1 (seq 3):
        // damage it as a torn write would.
        let newest = l.page_offset(1, 0);
        f.as_file()
            .write_all_at(&[0xAB; 100], newest + 200)
            .unwrap();
        let m3 = AllocMap::open(f.as_file(), l, uuid(), size).unwrap();
        assert_eq!(m3.health().pages_one_copy_bad, 1);
        assert!(
            !m3.is_allocated(5),
            "torn newer copy ignored, older state used"
        );
        assert!(m3.is_allocated(0));
        // Both copies of page 1 destroyed: treated as allocated, reported.
        f.as_file()
            .write_all_at(&[1; 4096], l.page_offset(0, 1))
            .unwrap();
        f.as_file()
            .write_all_at(&[1; 4096], l.page_offset(1, 1))
            .unwrap();
        let m4 = AllocMap::open(f.as_file(), l, uuid(), size).unwrap();
        assert_eq!(m4.health().pages_damaged, vec![1]);
        assert!(m4.all_allocated(32000, 64000));
        // Repair: the next persist rewrites the bad pages.
        m4.persist(f.as_file(), &|| Ok(())).unwrap();
        let m5 = AllocMap::open(f.as_file(), l, uuid(), size).unwrap();
        assert!(m5.health().is_healthy(), "{:?}", m5.health());
    }

    #[test]
    fn changes_after_a_failed_data_sync_are_kept() {
        let (f, l) = file_with_map(1 << 30);
        let m = AllocMap::open(f.as_file(), l, uuid(), 1 << 30).unwrap();
        m.set_allocated(9);
        let err = m.persist(f.as_file(), &|| Err(std::io::Error::other("boom")));
        assert!(err.is_err());
        let fresh = AllocMap::open(f.as_file(), l, uuid(), 1 << 30).unwrap();
        assert!(
            !fresh.is_allocated(9),
            "nothing persisted before the data sync"
        );
        m.persist(f.as_file(), &|| Ok(())).unwrap();
        let fresh = AllocMap::open(f.as_file(), l, uuid(), 1 << 30).unwrap();
        assert!(fresh.is_allocated(9));
    }

    proptest! {
        #[test]
        fn runs_and_all_allocated_match_the_bits(bits in proptest::collection::vec(any::<bool>(), 1..300), a in 0usize..300, b in 0usize..300) {
            let size = bits.len() as u64 * 65536;
            let (f, l) = file_with_map(size);
            let m = AllocMap::open(f.as_file(), l, uuid(), size).unwrap();
            for (i, &x) in bits.iter().enumerate() { if x { m.set_allocated(i as u64) } }
            let (lo, hi) = (a.min(b).min(bits.len()) as u64, a.max(b).min(bits.len()) as u64);
            prop_assert_eq!(m.all_allocated(lo, hi), bits[lo as usize..hi as usize].iter().all(|&x| x));
            let runs = m.runs(lo, hi);
            let mut c = lo;
            for (s, e, al) in &runs {
                prop_assert_eq!(*s, c);
                prop_assert!(e > s);
                for k in *s..*e { prop_assert_eq!(bits[k as usize], *al); }
                c = *e;
            }
            prop_assert_eq!(c, hi);
            for w in runs.windows(2) { prop_assert_ne!(w[0].2, w[1].2); }
        }
    }
}
