use super::*;
use crate::crypto::Dek;
use crate::volume::header::tests::{new_legacy_volume, new_volume};
use crate::volume::io::test_support::*;
use crate::volume::{OpenOptions, Volume};
use proptest::prelude::*;
use std::sync::{Arc, Barrier};

#[test]
fn volume_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Volume>();
}

#[test]
fn out_of_range_and_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 64 * 1024, 4096);
    let ro = Volume::open(
        &path,
        &h,
        Dek::from_slice(dek.expose()).expect("dek"),
        OpenOptions {
            read_only: true,
            discard: true,
            ..OpenOptions::default()
        },
    )
    .expect("open ro");
    let mut b = [0u8; 10];
    ro.read_at(&mut b, 100).expect("read ok");
    assert!(matches!(
        ro.write_at(&b, 0, false),
        Err(VolumeError::ReadOnly)
    ));
    assert!(matches!(
        ro.write_at_mut(&mut b, 0, false),
        Err(VolumeError::ReadOnly)
    ));
    assert!(matches!(
        ro.write_zeroes(0, 10, false),
        Err(VolumeError::ReadOnly)
    ));
    assert!(matches!(ro.discard(0, 4096), Err(VolumeError::ReadOnly)));
    assert!(!ro.discard_enabled());
    ro.flush().expect("flush on read-only is harmless");
    assert!(matches!(
        ro.read_at(&mut b, 64 * 1024 - 5),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        ro.read_at(&mut b, u64::MAX - 2),
        Err(VolumeError::OutOfRange { .. })
    ));
    drop(ro);
    let rw = open_rw(&path, &h, &dek);
    assert!(matches!(
        rw.write_at(&b, 64 * 1024 - 9, false),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        rw.write_zeroes(0, 64 * 1024 + 1, false),
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        rw.discard(u64::MAX, 2),
        Err(VolumeError::OutOfRange { .. })
    ));
    // Zero-length requests at the end are fine.
    rw.write_at(&[], 64 * 1024, true).expect("empty write");
    rw.read_at(&mut [], 64 * 1024).expect("empty read");
}

#[test]
fn fresh_volume_reads_without_error() {
    let (_d, _p, _h, _dek, v) = setup(64 * 1024, 4096);
    let mut b = vec![0u8; 64 * 1024];
    v.read_at(&mut b, 0).expect("read sparse");
}

#[test]
fn plaintext_never_reaches_the_file() {
    let (_d, path, _h, _dek, v) = setup(256 * 1024, 4096);
    let pattern: Vec<u8> = b"TOP-SECRET-PATTERN-0123456789abc".repeat(4096);
    v.write_at(&pattern[..100_000], 3, true).expect("write");
    let mut same = vec![0x41u8; 8192];
    v.write_at_mut(&mut same, 128 * 1024, true).expect("write");
    let file = std::fs::read(&path).expect("read file");
    let needle = &pattern[..16];
    assert!(
        !file.windows(16).any(|w| w == needle),
        "plaintext found in backing file"
    );
    assert!(
        !file.windows(64).any(|w| w.iter().all(|&b| b == 0x41)),
        "constant plaintext found"
    );
    // ...while the data reads back.
    let mut back = vec![0u8; 100_000];
    v.read_at(&mut back, 3).expect("read");
    assert_eq!(back, pattern[..100_000]);
}

#[test]
fn data_area_is_standard_xts_plain64() {
    use aes::cipher::KeyInit;
    use aes::Aes256;
    use xts_mode::{get_tweak_default, Xts128};
    for ss in [512usize, 4096] {
        let (_d, path, h, dek, v) = setup(64 * 1024, ss as u32);
        let sector = 5u64;
        let plain: Vec<u8> = (0..ss).map(|i| (i * 7 % 251) as u8).collect();
        v.write_at(&plain, sector * ss as u64, true).expect("write");
        let file = std::fs::read(&path).expect("read");
        let at = (h.data_offset + sector * ss as u64) as usize;
        let mut ct = file[at..at + ss].to_vec();
        assert_ne!(ct, plain);
        let k = dek.expose();
        let xts = Xts128::new(
            Aes256::new_from_slice(&k[..32]).expect("key1"),
            Aes256::new_from_slice(&k[32..]).expect("key2"),
        );
        // Tweak = sector index from the start of the data area, 128-bit LE.
        let mut tweak = [0u8; 16];
        tweak[..8].copy_from_slice(&sector.to_le_bytes());
        assert_eq!(tweak[..], get_tweak_default(u128::from(sector))[..]);
        xts.decrypt_sector(&mut ct, tweak.into());
        assert_eq!(ct, plain, "sector size {ss}");
    }
}

/// Issue 14 B11: a read that found a chunk allocated, then a trim of that chunk
/// (bit cleared, map flushed, hole punched), then the read's pread of the chunk: the
/// read must return the old data or zeros, never the hole decrypted (garbage). The
/// read hook stops the read right between its map check and its file read until the
/// trim is done (events, no sleeps).
#[test]
fn a_read_racing_a_trim_of_its_chunk_returns_old_data_or_zeros() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 4 * 65536, 4096);
    let v = Arc::new(open_discard(&path, &h, &dek));
    let old = vec![0xabu8; 65536];
    for round in 0..4u64 {
        let chunk = round % 2; // the chunk written, read and trimmed
        let at = chunk * 65536;
        v.write_at(&old, at, false).expect("write");
        v.flush().expect("flush");
        let allocated_blocks = file_blocks(&path);
        let (checked_tx, checked_rx) = std::sync::mpsc::channel::<()>();
        let (trimmed_tx, trimmed_rx) = std::sync::mpsc::channel::<()>();
        *lock_ignoring_poison(&v.read_hook) = Some(Box::new(move || {
            checked_tx.send(()).expect("signal");
            // The trim finishes while this read is between its map check and pread.
            trimmed_rx.recv().expect("trim done");
        }));
        let reader = {
            let v = Arc::clone(&v);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                v.read_at(&mut buf, at).expect("read");
                buf
            })
        };
        checked_rx.recv().expect("the read checked the map");
        v.discard(at, 65536).expect("trim");
        assert!(
            file_blocks(&path) < allocated_blocks,
            "round {round}: the trim punched the chunk (else this test shows nothing)"
        );
        trimmed_tx.send(()).expect("release the read");
        let got = reader.join().expect("reader");
        for (i, sector) in got.chunks(4096).enumerate() {
            assert!(
                sector.iter().all(|&b| b == 0xab) || sector.iter().all(|&b| b == 0),
                "round {round}, sector {i}: neither the old data nor zeros (the punched hole decrypted)"
            );
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    WriteMut { offset: u64, len: usize, seed: u8 },
    Zero { offset: u64, len: u64 },
    Trim { offset: u64, len: u64 },
    Read { offset: u64, len: usize },
    Flush,
    Reopen,
}

/// Three whole 64 KiB chunks and a short one.
const MODEL_SIZE: u64 = 3 * 65536 + 12 * 1024;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..MODEL_SIZE).prop_flat_map(|o| (Just(o), 0..=(MODEL_SIZE - o).min(150_000)));
    prop_oneof![
        (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write {
            offset,
            len: len as usize,
            seed
        }),
        (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::WriteMut {
            offset,
            len: len as usize,
            seed
        }),
        range
            .clone()
            .prop_map(|(offset, len)| Op::Zero { offset, len }),
        range
            .clone()
            .prop_map(|(offset, len)| Op::Trim { offset, len }),
        range.prop_map(|(offset, len)| Op::Read {
            offset,
            len: len as usize
        }),
        Just(Op::Flush),
        Just(Op::Reopen),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs `ops` against a volume and an in-memory model. `thin`: a volume with an
/// allocation map (else a legacy one, zeroed first). `discard`: opened with
/// discard (TRIM zeroes on a thin volume; legacy volumes are run without it, since
/// a legacy TRIM leaves garbage the model cannot predict).
fn run_model(ss: u32, thin: bool, discard: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = if thin {
        new_volume(dir.path(), MODEL_SIZE, ss)
    } else {
        new_legacy_volume(dir.path(), MODEL_SIZE, ss)
    };
    let open = || {
        let dek = Dek::from_slice(dek.expose()).expect("dek");
        Volume::open(
            &path,
            &h,
            dek,
            OpenOptions {
                read_only: false,
                discard,
                ..OpenOptions::default()
            },
        )
        .expect("open")
    };
    let fail = |e: VolumeError| TestCaseError::fail(e.to_string());
    let mut v = open();
    let mut model = vec![0u8; MODEL_SIZE as usize];
    if !thin {
        v.write_zeroes(0, MODEL_SIZE, false).map_err(fail)?;
    }
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let data = pattern(len, seed);
                v.write_at(&data, offset, false).map_err(fail)?;
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            Op::WriteMut { offset, len, seed } => {
                let data = pattern(len, seed);
                let mut buf = data.clone();
                v.write_at_mut(&mut buf, offset, false).map_err(fail)?;
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            Op::Zero { offset, len } => {
                v.write_zeroes(offset, len, false).map_err(fail)?;
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Trim { offset, len } => {
                v.discard(offset, len).map_err(fail)?;
                if thin && discard {
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; len];
                v.read_at(&mut buf, offset).map_err(fail)?;
                prop_assert_eq!(&buf[..], &model[offset as usize..offset as usize + len]);
            }
            Op::Flush => v.flush().map_err(fail)?,
            Op::Reopen => {
                v.flush().map_err(fail)?;
                drop(v);
                v = open();
            }
        }
        if thin {
            // The map never claims "unallocated" where the model holds data.
            let ext = v.extents(0, MODEL_SIZE).map_err(fail)?;
            for e in ext.iter().filter(|e| !e.allocated) {
                let r = &model[e.offset as usize..(e.offset + e.len) as usize];
                prop_assert!(r.iter().all(|&b| b == 0), "hole over data at {}", e.offset);
            }
        }
    }
    let mut all = vec![0u8; MODEL_SIZE as usize];
    v.read_at(&mut all, 0).map_err(fail)?;
    prop_assert!(all == model, "final image differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn matches_in_memory_model_512(ops in proptest::collection::vec(op(), 1..12), discard in any::<bool>()) {
        run_model(512, true, discard, &ops)?;
    }
    #[test]
    fn matches_in_memory_model_4096(ops in proptest::collection::vec(op(), 1..12), discard in any::<bool>()) {
        run_model(4096, true, discard, &ops)?;
    }
    #[test]
    fn legacy_matches_in_memory_model(ops in proptest::collection::vec(op(), 1..12), ss in prop_oneof![Just(512u32), Just(4096u32)]) {
        run_model(ss, false, false, &ops)?;
    }
}

/// Concurrent overlapping unaligned writes. Every write holds the lock over all
/// the sectors it touches for its whole duration, so overlapping writes are
/// linearizable: after each round, the image must equal the previous image with
/// the round's writes applied in *some* order. A torn sector (garbage after
/// decryption) or a lost update (an RMW writing back stale bytes of a neighbour)
/// breaks that.
#[test]
fn concurrent_overlapping_writes_are_linearizable() {
    for ss in [512u32, 4096] {
        let size = 32 * 1024u64;
        let (_d, _p, _h, _dek, v) = setup(size, ss);
        let v = Arc::new(v);
        let writers = 4usize;
        let mut image = vec![0u8; size as usize];
        v.write_at(&image, 0, false).expect("init");
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(ss));
        for round in 0..30u8 {
            // Ranges around a common centre so they overlap partially, unaligned.
            let centre = rng.below(size - 12_000) + 6_000;
            let ranges: Vec<(u64, usize, u8)> = (0..writers)
                .map(|w| {
                    let start = centre - rng.below(6_000);
                    let len = (rng.below(5_999) + 1) as usize;
                    (start, len, round.wrapping_mul(8).wrapping_add(w as u8 + 1))
                })
                .collect();
            let barrier = Arc::new(Barrier::new(writers));
            let handles: Vec<_> = ranges
                .iter()
                .copied()
                .map(|(start, len, value)| {
                    let (v, barrier) = (v.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let buf = vec![value; len];
                        barrier.wait();
                        v.write_at(&buf, start, false).expect("write");
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("writer thread");
            }
            let mut got = vec![0u8; size as usize];
            v.read_at(&mut got, 0).expect("read");
            let found = permutations(writers).into_iter().find_map(|perm| {
                let mut m = image.clone();
                for &w in &perm {
                    let (start, len, value) = ranges[w];
                    m[start as usize..start as usize + len].fill(value);
                }
                (m == got).then_some(m)
            });
            match found {
                Some(m) => image = m,
                None => panic!(
                    "sector size {ss}, round {round}: result is not any serial order of {ranges:?}"
                ),
            }
        }
    }
}

/// Writers own interleaved, byte-disjoint 37-byte pieces that share sectors: every
/// write to a piece is a read-modify-write of sectors holding other writers' pieces.
/// A lost update would leave some piece with a stale value.
#[test]
fn read_modify_write_never_loses_a_neighbours_bytes() {
    const PIECE: u64 = 37;
    const WRITERS: u64 = 6;
    for ss in [512u32, 4096] {
        let size = 16 * 1024u64;
        let (_d, _p, _h, _dek, v) = setup(size, ss);
        let v = Arc::new(v);
        let pieces = size / PIECE;
        let barrier = Arc::new(Barrier::new(WRITERS as usize));
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (v, barrier) = (v.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng(0x1234_5678 + w);
                    let mine: Vec<u64> = (0..pieces).filter(|p| p % WRITERS == w).collect();
                    barrier.wait();
                    for round in 0..3u8 {
                        let value = [(w as u8 + 1) * 16 + round; PIECE as usize];
                        for _ in 0..mine.len() {
                            let p = mine[rng.below(mine.len() as u64) as usize];
                            v.write_at(&value, p * PIECE, false).expect("write");
                        }
                        // Final pass so every piece holds this round's value.
                        for &p in &mine {
                            v.write_at(&value, p * PIECE, false).expect("write");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer thread");
        }
        let mut got = vec![0u8; size as usize];
        v.read_at(&mut got, 0).expect("read");
        for p in 0..pieces {
            let want = ((p % WRITERS) as u8 + 1) * 16 + 2;
            let piece = &got[(p * PIECE) as usize..((p + 1) * PIECE) as usize];
            assert!(
                piece.iter().all(|&b| b == want),
                "sector size {ss}: piece {p} lost its writer's bytes: {piece:?}"
            );
        }
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn permutations_are_complete() {
    let p = permutations(4);
    assert_eq!(p.len(), 24);
    let mut sorted = p.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 24);
}

#[test]
fn no_space_is_mapped() {
    let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
    let (_d, _p, _h, _dek, v) = setup(64 * 1024, 4096);
    assert!(matches!(v.io_err(e), VolumeError::NoSpace(_)));
    let e = std::io::Error::from_raw_os_error(libc::EDQUOT);
    assert!(matches!(v.io_err(e), VolumeError::NoSpace(_)));
    let e = std::io::Error::from_raw_os_error(libc::EIO);
    assert!(matches!(v.io_err(e), VolumeError::Io { .. }));
}
