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
        &durable,
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
    let u = units(&[w(0), w(4096), Event::SetLen(8192)], &[0u8; 8192]);
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
    let err = enumerate(Some(&[0u8; 1024]), &events, &scratch, |s| {
        seen += 1;
        let img = std::fs::read(s.path).unwrap();
        if img[0] != img[512] {
            return Err("torn".into());
        }
        Ok(())
    })
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
        let base = std::fs::read(&self.path).expect("image");
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
