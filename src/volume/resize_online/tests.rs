use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::volume::io::test_support::*;
use crate::volume::reencrypt::tests::begin;
use crate::volume::{read_header, SNAPSHOT_CHUNK};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn block(seed: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i.wrapping_mul(131) ^ seed.wrapping_mul(0x9e37)) as u8)
        .collect()
}

/// A writer thread: writes, then reads back and compares, blocks at pseudo-random
/// offsets below the size it sees, until told to stop; returns how many it verified.
fn writer(v: Arc<crate::volume::Volume>, stop: Arc<AtomicBool>, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut n = 0;
    while !stop.load(Ordering::Acquire) {
        let size = v.size();
        let off = rng.below(size / 4096) * 4096;
        let data = block(rng.next());
        v.write_at(&data, off, false).expect("write");
        let mut back = vec![0u8; 4096];
        v.read_at(&mut back, off).expect("read");
        assert_eq!(back, data, "block at {off} (size seen {size})");
        n += 1;
    }
    n
}

#[test]
fn grows_twice_under_concurrent_verified_io_and_reopens_at_the_new_size() {
    // 1 GiB + 8 KiB: the old last chunk is short; the second grow moves the map.
    let size = GIB + 8192;
    let (_d, path, _h, dek, v) = setup(size, 4096);
    let tail = block(99);
    v.write_at(&tail, size - 4096, true).unwrap();
    let v = Arc::new(v);
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let (v, stop) = (v.clone(), stop.clone());
            std::thread::spawn(move || writer(v, stop, 7 + i))
        })
        .collect();
    let g1 = v.grow_online(&|s| s.checked_add(3 * MIB)).expect("grow 1");
    assert_eq!(
        (g1.old_size, g1.new_size, g1.map_relocated),
        (size, size + 3 * MIB, false)
    );
    assert_eq!(v.size(), size + 3 * MIB);
    // The rest of the old last chunk reads as zeros.
    let mut buf = vec![0u8; 8192];
    v.read_at(&mut buf, size).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let g2 = v.grow_online(&|_| Some(5 * GIB)).expect("grow 2");
    assert!(g2.map_relocated);
    assert_eq!(v.size(), 5 * GIB);
    let end = block(5);
    v.write_at(&end, 5 * GIB - 4096, true).unwrap();
    stop.store(true, Ordering::Release);
    let verified: u64 = threads.into_iter().map(|t| t.join().expect("writer")).sum();
    assert!(verified > 0);
    v.flush().unwrap();
    let allocated = v.allocated_bytes();
    drop(v);
    let (h, _) = read_header(&path).unwrap();
    assert_eq!(h.size, 5 * GIB);
    let v = open_rw(&path, &h, &dek);
    assert!(v.map_health().unwrap().is_healthy());
    assert_eq!(v.allocated_bytes(), allocated);
    let mut got = vec![0u8; 4096];
    v.read_at(&mut got, size - 4096).unwrap();
    v.read_at(&mut got, 5 * GIB - 4096).unwrap();
    assert_eq!(got, end);
}

#[test]
fn a_grow_extends_changed_chunk_tracking_and_forgets_its_base() {
    let (_d, _path, _h, _dek, v) = setup(4 * MIB, 4096);
    v.enable_change_tracking().unwrap();
    let t = v.tracking.get().unwrap();
    t.set_base("parent");
    v.grow_online(&|s| Some(s + 4 * MIB)).unwrap();
    v.write_at(&block(1), 8 * MIB - 4096, false).unwrap();
    let (base, words) = t.take();
    assert_eq!(
        base, None,
        "the next snapshot after a grow reads every chunk"
    );
    let last = (8 * MIB - 1) / SNAPSHOT_CHUNK;
    assert_ne!(words[(last / 64) as usize] & (1 << (last % 64)), 0);
}

#[test]
fn shrink_snapshot_views_reencryption_and_read_only_are_refused() {
    let (_d, path, h, dek, v) = setup(4 * MIB, 4096);
    let e = v.grow_online(&|_| Some(2 * MIB)).unwrap_err().to_string();
    assert!(e.contains("cannot shrink"), "{e}");
    let e = v
        .grow_online(&|s| s.checked_add(u64::MAX))
        .unwrap_err()
        .to_string();
    assert!(e.contains("overflows"), "{e}");
    let v = Arc::new(v);
    let view = v.snapshot_view(SNAPSHOT_CHUNK).unwrap();
    let e = v.grow_online(&|s| Some(2 * s)).unwrap_err().to_string();
    assert!(e.contains("snapshot"), "{e}");
    drop(view);
    let _new = begin(&v);
    let e = v.grow_online(&|s| Some(2 * s)).unwrap_err().to_string();
    assert!(e.contains("re-encryption"), "{e}");
    assert_eq!(v.size(), 4 * MIB);
    drop(v);
    assert_eq!(read_header(&path).unwrap().0.size, 4 * MIB);
    let ro = crate::volume::Volume::open(
        &path,
        &h,
        crate::crypto::Dek::from_slice(dek.expose()).unwrap(),
        crate::volume::OpenOptions {
            read_only: true,
            discard: false,
            ..Default::default()
        },
    );
    // A re-encryption is recorded now: opening needs its key; read-only grows are
    // refused before anything else anyway.
    if let Ok(ro) = ro {
        assert!(matches!(
            ro.grow_online(&|s| Some(2 * s)),
            Err(crate::volume::VolumeError::ReadOnly)
        ));
    }
}

#[test]
fn reads_racing_a_grow_see_the_old_or_the_new_size_never_a_torn_one() {
    let (_d, _path, _h, _dek, v) = setup(MIB, 4096);
    let v = Arc::new(v);
    let stop = Arc::new(AtomicBool::new(false));
    let beyond = Arc::new(AtomicU64::new(0));
    let reader = {
        let (v, stop, beyond) = (v.clone(), stop.clone(), beyond.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Acquire) {
                // Just past the old end: out of range until the grow is published,
                // then zeros.
                match v.read_at(&mut buf, MIB) {
                    Ok(()) => {
                        assert!(buf.iter().all(|&b| b == 0));
                        beyond.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(crate::volume::VolumeError::OutOfRange { .. }) => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        })
    };
    v.grow_online(&|s| Some(s * 2)).unwrap();
    while beyond.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Release);
    reader.join().unwrap();
}
