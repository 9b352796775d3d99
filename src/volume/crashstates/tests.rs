//! The enumerator's own rules, and every crash state of the volume layer's metadata
//! updates: re-encryption (begin, a step, the last step with the final switch), an
//! allocation-map flush after thin writes, and an offline grow. The operations on keys
//! and whole files (create, rekey, keyslots, restore) are in `ops/crashstates_tests.rs`.

use std::path::{Path, PathBuf};

use super::*;
use crate::crypto::Dek;
use crate::volume::header::tests::{dummy_slot, new_volume};
use crate::volume::{read_header, Header, OpenOptions, Volume, VolumeError};

#[test]
fn small_epochs_get_every_subset_and_large_ones_a_bounded_sample() {
    assert_eq!(subsets(0, 0).len(), 1);
    assert_eq!(subsets(EXHAUSTIVE_UNITS, 0).len(), 1 << EXHAUSTIVE_UNITS);
    let big = subsets(1000, 3);
    assert_eq!(big.len(), SPREAD + 2 * SPREAD + RANDOM_SUBSETS);
    assert!(big.iter().any(|m| m.iter().all(|&b| b)), "the full epoch");
    assert!(big.iter().any(|m| m.iter().all(|&b| !b)), "nothing of it");
    assert_eq!(subsets(1000, 3), big, "reproducible");
}

#[test]
fn writes_are_split_into_sectors_and_unchanged_sectors_dropped() {
    let durable = vec![0u8; 4096];
    let mut bytes = vec![0u8; 1536];
    bytes[600] = 1; // only the second sector of the write changes
    let u = units(
        &[Event::Write { offset: 512, bytes }, Event::SetLen(8192)],
        &Image::from_bytes(&durable),
    );
    assert_eq!(u.len(), 2, "{u:?}");
    assert!(matches!(&u[0], (0, Event::Write { offset: 1024, bytes }) if bytes.len() == 512));
    assert!(matches!(u[1], (1, Event::SetLen(8192))));
}

#[test]
fn whole_writes_are_enumerated_before_their_sectors() {
    let w = |offset: u64| Event::Write {
        offset,
        bytes: vec![1; 1024],
    };
    let u = units(
        &[w(0), w(4096), Event::SetLen(8192)],
        &Image::from_bytes(&[0u8; 8192]),
    );
    assert_eq!(u.len(), 5);
    let (m, writes) = masks(&u, 0);
    assert_eq!(writes, 3);
    assert_eq!(m.len(), (1 << 3) + (1 << 5));
    // A whole-write subset: both sectors of the first write, nothing of the second.
    assert!(m[..8].contains(&vec![true, true, false, false, true]));
}

#[test]
fn a_state_that_fails_its_check_is_reported_with_its_epoch_and_units() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("s");
    let events = [
        Event::Write {
            offset: 0,
            bytes: vec![1; 1024],
        },
        Event::Sync,
    ];
    let mut seen = 0;
    let err = enumerate(
        Some(&Image::from_bytes(&[0u8; 1024])),
        &events,
        &scratch,
        |s| {
            seen += 1;
            let img = std::fs::read(s.path).unwrap();
            if img[0] != img[512] {
                return Err("torn".into());
            }
            Ok(())
        },
    )
    .unwrap_err();
    assert!(
        err.contains("epoch 0 of 2") && err.contains("torn"),
        "{err}"
    );
    assert!(seen >= 2);
}

pub(in crate::volume) fn copy(d: &Dek) -> Dek {
    Dek::from_slice(d.expose()).expect("dek")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

/// A volume being recorded, with the scratch file its states are built in.
struct Case {
    _dir: tempfile::TempDir,
    path: PathBuf,
    header: Header,
    dek: Dek,
    scratch_dir: tempfile::TempDir,
    rec: Recorder,
}

impl Case {
    /// A new thin volume of `size` bytes and 512-byte sectors (so that a sector is the
    /// disk's write unit and a torn volume sector never arises), recorded from now on.
    fn new(size: u64) -> Case {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, header, dek) = new_volume(dir.path(), size, 512);
        let rec = Recorder::start(dir.path());
        let scratch_dir = scratch_dir(dir.path());
        Case {
            _dir: dir,
            path,
            header,
            dek,
            scratch_dir,
            rec,
        }
    }

    fn open(&self) -> Volume {
        self.open_with(OpenOptions::default())
    }

    fn open_with(&self, opts: OpenOptions) -> Volume {
        Volume::open(&self.path, &self.header, copy(&self.dek), opts).expect("open")
    }

    fn scratch(&self) -> PathBuf {
        self.scratch_dir.path().join("state.img")
    }

    /// Runs `op`, then checks every crash state of what it wrote with `check`.
    fn enumerate(
        &self,
        name: &str,
        op: impl FnOnce(),
        check: impl FnMut(&State) -> Result<(), String>,
    ) -> Counts {
        let _ = self.rec.take(&self.path);
        let base = Image::read_file(&self.path).expect("image");
        op();
        let events = self.rec.take(&self.path);
        let counts = enumerate(Some(&base), &events, &self.scratch(), check)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        report(name, &counts);
        counts
    }
}

/// Opens the state at `p` with whichever key its header asks for (`old`, or `new`
/// after a re-encryption's switch, both while one is under way), read-write as a
/// restart would (which finishes an interrupted re-encryption step), and reads it all.
fn open_state(p: &Path, old: &Dek, new: Option<&Dek>) -> Result<(Header, Vec<u8>), String> {
    let (h, _) = read_header(p).map_err(|e| format!("header: {e}"))?;
    let opts = OpenOptions::default();
    let vol = if h.reencrypt.is_some() {
        let next = new.ok_or("a re-encryption is recorded but there is no new key")?;
        Volume::open_with_next(p, &h, copy(old), Some(copy(next)), opts)
    } else {
        match (Volume::open(p, &h, copy(old), opts), new) {
            (Err(VolumeError::KeyCheckFailed { .. }), Some(n)) => {
                Volume::open(p, &h, copy(n), opts)
            }
            (r, _) => r,
        }
    }
    .map_err(|e| format!("open: {e}"))?;
    let mut buf = vec![0u8; vol.size() as usize];
    vol.read_at(&mut buf, 0).map_err(|e| format!("read: {e}"))?;
    Ok((h, buf))
}

/// Every 512-byte sector of `got` is the one of `old` or of `new`.
fn each_sector_old_or_new(got: &[u8], old: &[u8], new: &[u8]) -> Result<(), String> {
    for (i, g) in got.chunks(512).enumerate() {
        let r = i * 512..i * 512 + g.len();
        if g != &old[r.clone()] && g != &new[r] {
            return Err(format!("sector {i} reads neither the old nor the new data"));
        }
    }
    Ok(())
}

fn whole(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).expect("read");
    b
}

#[test]
fn reencryption_begin_steps_and_finish_leave_no_state_that_loses_data() {
    // Two zones of 1024 sectors: a first step, then the last step and the switch.
    let size = 1536 * 512;
    let case = Case::new(size);
    let v = case.open();
    v.write_at(&pattern(70_000, 1), 0, false).unwrap();
    v.write_at(&pattern(9_000, 2), 600_000, false).unwrap();
    v.flush().unwrap();
    let model = whole(&v);
    let new = Dek::generate().unwrap();
    let check = |s: &State| {
        let (h, data) = open_state(s.path, &case.dek, Some(&new))?;
        if data != model {
            return Err(format!(
                "data changed (watermark {:?})",
                h.reencrypt.map(|r| r.watermark)
            ));
        }
        Ok(())
    };
    let slot = dummy_slot(&v.uuid(), "new");
    let mut total = 0;
    total += case
        .enumerate(
            "re-encryption begin",
            || v.reencrypt_begin(copy(&new), vec![slot]).unwrap(),
            check,
        )
        .states;
    let st = std::cell::Cell::new(None);
    total += case
        .enumerate(
            "re-encryption step",
            || st.set(v.reencrypt_step().unwrap()),
            check,
        )
        .states;
    assert_eq!(st.get().map(|s| s.watermark), Some(1024 * 512));
    total += case
        .enumerate(
            "re-encryption last step and finish",
            || st.set(v.reencrypt_step().unwrap()),
            check,
        )
        .states;
    assert_eq!(v.reencrypt_step().unwrap(), None, "finished");
    let (h, _) = read_header(&case.path).unwrap();
    assert!(h.reencrypt.is_none());
    assert!(total > 100, "{total}");
}

#[test]
fn an_allocation_map_flush_never_exposes_garbage_or_loses_flushed_data() {
    let size = 256 * 1024; // four 64 KiB chunks
    let case = Case::new(size);
    let v = case.open();
    v.write_at(&pattern(20_000, 3), 1000, false).unwrap();
    v.flush().unwrap();
    let old = whole(&v);
    let writes = [
        (5000u64, pattern(3000, 4)),
        (140_000, pattern(6000, 5)),
        (250_000, pattern(4000, 6)),
    ];
    let mut new = old.clone();
    for (off, data) in &writes {
        new[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let counts = case.enumerate(
        "allocation-map flush (thin writes + flush)",
        || {
            for (off, data) in &writes {
                v.write_at(data, *off, false).unwrap();
            }
            v.flush().unwrap();
        },
        |s| {
            let (_, data) = open_state(s.path, &case.dek, None)?;
            if s.complete && data != new {
                return Err("the flushed writes are not all there".into());
            }
            each_sector_old_or_new(&data, &old, &new)
        },
    );
    assert_eq!(whole(&v), new);
    assert!(counts.states > 50, "{counts:?}");
}

#[test]
fn zeroing_whole_chunks_with_hole_punching_never_leaves_a_set_bit_over_a_hole() {
    let size = 256 * 1024;
    let case = Case::new(size);
    let v = case.open_with(OpenOptions {
        read_only: false,
        discard: true,
        ..OpenOptions::default()
    });
    v.write_at(&pattern(200_000, 9), 0, false).unwrap();
    v.flush().unwrap();
    let old = whole(&v);
    let mut new = old.clone();
    new[65536..131072].fill(0);
    let counts = case.enumerate(
        "allocation-map flush (chunk zeroed and punched)",
        || v.write_zeroes(65536, 65536, false).unwrap(),
        |s| {
            let (_, data) = open_state(s.path, &case.dek, None)?;
            if s.complete && data != new {
                return Err("the zeroed chunk does not read as zeros".into());
            }
            each_sector_old_or_new(&data, &old, &new)
        },
    );
    assert_eq!(v.allocated_bytes(), 3 * 65536, "the chunk was unallocated");
    assert!(counts.states >= 3, "{counts:?}");
}

#[test]
fn a_grow_leaves_the_old_or_the_new_size_with_the_data_intact() {
    // 3 chunks and 8 KiB: the short last chunk is written, so the grow zeroes its tail.
    let size = 3 * 65536 + 8192;
    let new_size = 320 * 1024;
    let case = Case::new(size);
    let v = case.open();
    v.write_at(&pattern(30_000, 7), 0, false).unwrap();
    v.write_at(&pattern(8192, 8), size - 8192, false).unwrap();
    v.flush().unwrap();
    let old = whole(&v);
    let counts = case.enumerate(
        "resize (grow)",
        || {
            v.grow_offline(&case.header, &case.dek, new_size).unwrap();
        },
        |s| {
            let (h, data) = open_state(s.path, &case.dek, None)?;
            if data[..size as usize] != old[..] {
                return Err(format!("data changed (size {})", h.size));
            }
            if data[size as usize..].iter().any(|&b| b != 0) {
                return Err("the grown space does not read as zeros".into());
            }
            match (h.size, s.complete) {
                (n, true) if n != new_size => Err(format!("complete grow shows size {n}")),
                (n, _) if n == size || n == new_size => Ok(()),
                (n, _) => Err(format!("size {n} is neither the old nor the new")),
            }
        },
    );
    assert!(counts.states > 5, "{counts:?}");
}

/// What a sparse multi-GiB volume must read: `writes` over zeros. Reading the whole
/// volume per state would be GiBs, so the check reads each write whole and the first
/// and last 4 KiB of the chunks that matter: each write's, each map page's first and
/// last, and those around both ends of the old and the new size (where they lie inside
/// the state's size). A chunk with a clear bit reads zeros whole; one with a set bit
/// over garbage shows it in any sector.
struct SparseModel {
    writes: Vec<(u64, Vec<u8>)>,
}

impl SparseModel {
    const CHUNK: u64 = 65536;

    fn expected(&self, off: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        for (w, data) in &self.writes {
            let (a, b) = (off.max(*w), (off + len).min(w + data.len() as u64));
            if a < b {
                out[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&data[(a - w) as usize..(b - w) as usize]);
            }
        }
        out
    }

    fn windows(&self, sizes: [u64; 2], size: u64) -> Vec<(u64, u64)> {
        let c = Self::CHUNK;
        let page_span = crate::volume::alloc::CHUNKS_PER_PAGE * c;
        let mut chunks: Vec<u64> = self
            .writes
            .iter()
            .flat_map(|(w, d)| [w / c * c, (w + d.len() as u64 - 1) / c * c])
            .collect();
        for end in (1..=size.div_ceil(page_span)).map(|p| p * page_span) {
            chunks.extend([end - page_span, end - c, end]);
        }
        for s in sizes {
            chunks.extend([
                s.saturating_sub(c) / c * c,
                s / c * c,
                s.saturating_sub(1) / c * c,
            ]);
        }
        // Each write whole, and the first and last 4 KiB of every chunk named.
        let mut out: Vec<(u64, u64)> = self
            .writes
            .iter()
            .map(|(w, d)| (*w, d.len() as u64))
            .collect();
        out.extend(
            chunks
                .into_iter()
                .flat_map(|s| [(s, 4096), (s + c - 4096, 4096)]),
        );
        out.sort_unstable();
        out.dedup();
        out.into_iter()
            .filter(|&(s, _)| s < size)
            .map(|(s, len)| (s, len.min(size - s)))
            .collect()
    }

    /// Opens the state at `p` and checks it against the model; returns its size and
    /// allocated bytes.
    fn check(&self, p: &Path, dek: &Dek, sizes: [u64; 2]) -> Result<(Header, u64), String> {
        self.check_or_older(p, dek, sizes, self, false)
    }

    /// [`SparseModel::check`], where each sector may also read as it does in `older`
    /// (the model before unflushed writes) and, with `torn_page_ok`, one copy of a map
    /// page may be bad (a map persist torn while writing it: the other copy holds).
    fn check_or_older(
        &self,
        p: &Path,
        dek: &Dek,
        sizes: [u64; 2],
        older: &SparseModel,
        torn_page_ok: bool,
    ) -> Result<(Header, u64), String> {
        let (h, _) = read_header(p).map_err(|e| format!("header: {e}"))?;
        let v = Volume::open(p, &h, copy(dek), OpenOptions::default())
            .map_err(|e| format!("open: {e}"))?;
        let usable = |m: &crate::volume::alloc::MapHealth| {
            m.is_healthy() || (torn_page_ok && m.pages_damaged.is_empty())
        };
        if !v.map_health().is_some_and(usable) {
            return Err(format!("map not healthy: {:?}", v.map_health()));
        }
        for (off, len) in self.windows(sizes, v.size()) {
            let mut buf = vec![0u8; len as usize];
            v.read_at(&mut buf, off).map_err(|e| format!("read: {e}"))?;
            let (new, old) = (self.expected(off, len), older.expected(off, len));
            each_sector_old_or_new(&buf, &old, &new)
                .map_err(|e| format!("{len} bytes at {off}: {e} (size {})", h.size))?;
        }
        Ok((h, v.allocated_bytes()))
    }
}

#[test]
fn a_grow_that_moves_the_allocation_map_leaves_the_old_or_the_new_map_and_size() {
    // One map page covers 32000 chunks of 64 KiB (1.95 GiB). Four grows, each past a
    // page: 1 GiB + 8 KiB (1 page; the short last chunk written, so the first grow also
    // zeroes its tail) to 3 GiB (2 pages), 5 GiB (3), 7.5 GiB (4) and 9 GiB (5). The
    // first three place the new copies after the current ones; the last fits before
    // them, over the stale pages of the first two layouts. Images are sparse.
    const GIB: u64 = 1 << 30;
    let size0 = GIB + 8192;
    let case = Case::new(size0);
    let mut model = SparseModel {
        writes: vec![(0, pattern(30_000, 1)), (size0 - 8192, pattern(8192, 2))],
    };
    {
        let v = case.open();
        for (off, data) in &model.writes {
            v.write_at(data, *off, false).expect("write");
        }
        v.flush().expect("flush");
    }
    let page_span = crate::volume::alloc::CHUNKS_PER_PAGE * SparseModel::CHUNK;
    let mut size = size0;
    let mut placed_before = false;
    for (k, new_size) in [3 * GIB, 5 * GIB, 15 * GIB / 2, 9 * GIB]
        .into_iter()
        .enumerate()
    {
        let (h, _) = read_header(&case.path).expect("header");
        {
            // Data in the last map page's chunks, flushed before the grow.
            let v = Volume::open(&case.path, &h, copy(&case.dek), OpenOptions::default())
                .expect("open");
            let boundary = size / page_span * page_span;
            let at = boundary.checked_sub(2048).unwrap_or(size - 4096);
            let w = (at, pattern(4096, 10 + k as u8));
            v.write_at(&w.1, w.0, false).expect("write");
            v.flush().expect("flush");
            model.writes.push(w);
        }
        let v =
            Volume::open(&case.path, &h, copy(&case.dek), OpenOptions::default()).expect("open");
        let old_alloc = v.allocated_bytes();
        let grown = std::cell::RefCell::new(None);
        let sizes = [size, new_size];
        let name = format!("resize (grow moving the map, {} to {} pages)", k + 1, k + 2);
        let mut new_alloc = None;
        let counts = case.enumerate(
            &name,
            || *grown.borrow_mut() = Some(v.grow_offline(&h, &case.dek, new_size).unwrap()),
            |s| {
                let (got, alloc) = model.check(s.path, &case.dek, sizes)?;
                match (got.size, s.complete) {
                    (n, true) if n != new_size => Err(format!("complete grow shows size {n}")),
                    (n, _) if n == size && alloc == old_alloc => Ok(()),
                    (n, _) if n == new_size && *new_alloc.get_or_insert(alloc) == alloc => Ok(()),
                    (n, _) => Err(format!("size {n}, {alloc} bytes allocated: neither the old ({size}, {old_alloc}) nor the new")),
                }
            },
        );
        drop(v);
        let (new_h, growth) = grown.into_inner().expect("grown");
        let (old_map, new_map) = (h.allocation_map.unwrap(), new_h.allocation_map.unwrap());
        assert!(growth.map_relocated, "{name}: {growth:?}");
        assert_eq!(new_map.pages, k as u64 + 2, "{name}");
        let copy_bytes = |m: &crate::volume::alloc::MapLayout| m.pages * 4096;
        let old_lo = old_map.copy_offsets[0].min(old_map.copy_offsets[1]);
        placed_before |= new_map.copy_offsets[1] + copy_bytes(&new_map) <= old_lo;
        assert!(
            counts.states > 20 && counts.epochs >= 4,
            "{name}: {counts:?}"
        );
        model
            .check(&case.path, &case.dek, sizes)
            .expect("the grown volume");
        size = new_size;
    }
    assert!(
        placed_before,
        "no grow placed the map before the current copies"
    );
}

#[test]
fn an_online_grow_that_moves_the_map_and_the_next_map_flush_lose_nothing() {
    // The served path: `grow_online` moves the map (1 to 2 pages) and takes the new
    // layout into memory; the next flush after writes on both map pages persists the
    // map to its new place. Both are enumerated.
    const GIB: u64 = 1 << 30;
    let size0 = GIB + 8192;
    let case = Case::new(size0);
    let old = SparseModel {
        writes: vec![(0, pattern(30_000, 1)), (size0 - 8192, pattern(8192, 2))],
    };
    let v = case.open();
    for (off, data) in &old.writes {
        v.write_at(data, *off, false).expect("write");
    }
    v.flush().expect("flush");
    let new_size = 3 * GIB;
    let sizes = [size0, new_size];
    let old_alloc = v.allocated_bytes();
    let grown = std::cell::Cell::new(None);
    let counts = case.enumerate(
        "online resize moving the map (1 to 2 pages)",
        || grown.set(Some(v.grow_online(&|_| Some(new_size)).unwrap())),
        |s| {
            let (h, alloc) = old.check(s.path, &case.dek, sizes)?;
            match (h.size, s.complete) {
                (n, true) if n != new_size => Err(format!("complete grow shows size {n}")),
                (n, _) if n == size0 && alloc == old_alloc => Ok(()),
                // The short last chunk is whole now.
                (n, _) if n == new_size && alloc == 2 * SparseModel::CHUNK => Ok(()),
                (n, _) => Err(format!("size {n}, {alloc} bytes allocated")),
            }
        },
    );
    assert!(
        grown.get().is_some_and(|g| g.map_relocated),
        "{:?}",
        grown.get()
    );
    assert_eq!(v.size(), new_size);
    assert!(counts.states > 20, "{counts:?}");
    // Writes in both map pages' chunks and past the old end, then a flush.
    let page_span = crate::volume::alloc::CHUNKS_PER_PAGE * SparseModel::CHUNK;
    let mut new = SparseModel {
        writes: old.writes.clone(),
    };
    new.writes.extend([
        (page_span - 2048, pattern(4096, 3)),
        (size0 + 100_000, pattern(9000, 4)),
        (new_size - 4096, pattern(4096, 5)),
    ]);
    let counts = case.enumerate(
        "allocation-map flush after an online grow moved the map",
        || {
            for (off, data) in &new.writes[old.writes.len()..] {
                v.write_at(data, *off, false).unwrap();
            }
            v.flush().unwrap();
        },
        |s| {
            let (h, _) = new.check_or_older(s.path, &case.dek, sizes, &old, true)?;
            if h.size != new_size {
                return Err(format!("size {} after the grow", h.size));
            }
            if s.complete {
                new.check(s.path, &case.dek, sizes)?;
            }
            Ok(())
        },
    );
    assert!(counts.states > 20, "{counts:?}");
    drop(v);
    new.check(&case.path, &case.dek, sizes)
        .expect("the volume after the flush");
}
