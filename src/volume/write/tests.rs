use crate::volume::header::tests::{new_legacy_volume, new_volume};
use crate::volume::io::test_support::*;
use crate::volume::{Extent, Volume};

#[test]
fn write_zeroes_reads_back_zeros() {
    let (_d, _p, _h, _dek, v) = setup(3 << 20, 4096);
    let ones = vec![0xFFu8; 3 << 20];
    v.write_at(&ones, 0, false).expect("write");
    // Spans several chunks with partial sectors at both ends.
    let (off, len) = (1000u64, (2 << 20) + 5000);
    v.write_zeroes(off, len, true).expect("zeroes");
    let mut back = vec![0u8; 3 << 20];
    v.read_at(&mut back, 0).expect("read");
    for (i, &b) in back.iter().enumerate() {
        let inside = (i as u64) >= off && (i as u64) < off + len;
        assert_eq!(b, if inside { 0 } else { 0xFF }, "byte {i}");
    }
}

#[test]
fn legacy_discard_punches_whole_sectors_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_legacy_volume(dir.path(), 64 * 1024, 4096);
    let v = open_discard(&path, &h, &dek);
    assert!(v.discard_enabled() && !v.is_thin());
    let data = vec![0x5Au8; 64 * 1024];
    v.write_at(&data, 0, true).expect("write");
    // Covers sector 1 wholly, sectors 0 and 2 partially.
    v.discard(100, 2 * 4096).expect("discard");
    let mut back = vec![0u8; 64 * 1024];
    v.read_at(&mut back, 0).expect("read");
    assert!(
        back[..4096].iter().all(|&b| b == 0x5A),
        "partial head sector kept"
    );
    assert!(
        back[2 * 4096..].iter().all(|&b| b == 0x5A),
        "partial tail sector kept"
    );
    // Sector 1: either punched (garbage) or untouched if the filesystem cannot punch.
    let file = std::fs::read(&path).expect("read");
    let at = (h.data_offset + 4096) as usize;
    let punched = file[at..at + 4096].iter().all(|&b| b == 0);
    if punched {
        assert!(
            back[4096..8192].iter().any(|&b| b != 0x5A && b != 0),
            "reads garbage"
        );
    }
    // Without the discard option, nothing happens.
    drop(v);
    let v2 = open_rw(&path, &h, &dek);
    v2.write_at(&data, 0, true).expect("write");
    v2.discard(0, 64 * 1024).expect("no-op");
    v2.read_at(&mut back, 0).expect("read");
    assert_eq!(back, data);
}

#[test]
fn thin_fresh_volume_reads_zeros_and_allocates_whole_chunks() {
    let (_d, path, h, dek, v) = setup(1 << 20, 4096);
    assert!(v.is_thin());
    assert_eq!(v.chunk_size(), Some(65536));
    let mut back = vec![0xFFu8; 1 << 20];
    v.read_at(&mut back, 0).expect("read");
    assert!(back.iter().all(|&b| b == 0), "fresh volume reads zeros");
    assert_eq!(v.allocated_bytes(), 0);
    let before = file_blocks(&path);
    // A 100-byte write in chunk 3 allocates exactly that chunk.
    v.write_at(b"hello thin world", 3 * 65536 + 1000, false)
        .expect("write");
    assert_eq!(v.allocated_bytes(), 65536);
    let ext = v.extents(0, 1 << 20).expect("extents");
    assert_eq!(
        ext,
        vec![
            Extent {
                offset: 0,
                len: 3 * 65536,
                allocated: false
            },
            Extent {
                offset: 3 * 65536,
                len: 65536,
                allocated: true
            },
            Extent {
                offset: 4 * 65536,
                len: (1 << 20) - 4 * 65536,
                allocated: false
            },
        ]
    );
    assert_eq!(
        v.extents(3 * 65536 + 10, 100).expect("sub"),
        vec![Extent {
            offset: 3 * 65536 + 10,
            len: 100,
            allocated: true
        }]
    );
    v.read_at(&mut back, 0).expect("read");
    let mut want = vec![0u8; 1 << 20];
    want[3 * 65536 + 1000..3 * 65536 + 1016].copy_from_slice(b"hello thin world");
    assert_eq!(back, want, "rest of the chunk reads as zeros");
    v.flush().expect("flush");
    assert!(
        file_blocks(&path) >= before + 65536,
        "the whole chunk was written"
    );
    // The whole chunk holds ciphertext of zeros around the data (no hole inside).
    let file = std::fs::read(&path).expect("read file");
    let base = (h.data_offset + 3 * 65536) as usize;
    assert!(file[base..base + 4096].iter().any(|&b| b != 0));
    assert!(file[base + 61440..base + 65536].iter().any(|&b| b != 0));
    // Unwritten chunks were never touched.
    assert!(file[h.data_offset as usize..base].iter().all(|&b| b == 0));
    drop(v);
    // Persisted: a reopened volume sees the same map and data.
    let v = open_rw(&path, &h, &dek);
    assert_eq!(v.allocated_bytes(), 65536);
    v.read_at(&mut back, 0).expect("read");
    assert_eq!(back, want);
    let sum = crate::volume::map_summary(&path, &h)
        .expect("summary")
        .expect("thin");
    assert_eq!(
        (sum.allocated_chunks, sum.allocated_bytes, sum.chunks),
        (1, 65536, 16)
    );
    assert!(sum.health.is_healthy());
}

/// Issue 15: the first write to a never-written chunk used to take the sector
/// range lock, find the chunk unallocated, drop it and lock the whole chunk: two
/// acquisitions (and two copy-before-write passes). Every write locks once.
#[test]
fn every_write_takes_the_range_lock_once() {
    let (_d, _path, _h, _dek, v) = setup(1 << 20, 4096);
    let locks = |v: &Volume| v.locks.acquisitions();
    let cases: [(&str, u64, usize, bool); 5] = [
        (
            "aligned write_at_mut, never-written chunk",
            2 * 65536,
            4096,
            true,
        ),
        (
            "aligned write_at_mut, allocated chunk",
            2 * 65536 + 8192,
            4096,
            true,
        ),
        (
            "unaligned write_at, never-written chunk",
            5 * 65536 + 10,
            100,
            false,
        ),
        (
            "unaligned write_at, allocated chunk",
            5 * 65536 + 500,
            100,
            false,
        ),
        (
            "write_at across chunks, one never written",
            5 * 65536 + 60000,
            10000,
            false,
        ),
    ];
    for (what, offset, len, in_place) in cases {
        let mut data = vec![0x5Au8; len];
        let before = locks(&v);
        if in_place {
            v.write_at_mut(&mut data, offset, false).expect(what);
        } else {
            v.write_at(&data, offset, false).expect(what);
        }
        assert_eq!(locks(&v) - before, 1, "{what}");
    }
}

#[test]
fn thin_zeroes_and_trim_unallocate_whole_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 * 65536 + 8192; // short last chunk
    let (path, h, dek) = new_volume(dir.path(), size, 512);
    let v = open_discard(&path, &h, &dek);
    let data = vec![0x77u8; size as usize];
    v.write_at(&data, 0, false).expect("write");
    assert_eq!(v.allocated_bytes(), size);
    v.flush().expect("flush");
    let full = file_blocks(&path);
    // Zero chunk 1 wholly and half of chunk 2: chunk 1 unallocated, chunk 2 keeps data.
    v.write_zeroes(65536, 65536 + 32768, false).expect("zeroes");
    assert_eq!(v.allocated_bytes(), size - 65536);
    assert!(
        file_blocks(&path) <= full - 65536,
        "whole chunk punched with discard on"
    );
    // Trim the short last chunk (to the end of the volume): unallocated.
    v.discard(4 * 65536, 8192).expect("trim");
    assert_eq!(v.allocated_bytes(), size - 65536 - 8192);
    // NO_HOLE zeroing of chunk 0 clears the bit but keeps the space.
    let before = file_blocks(&path);
    v.write_zeroes_no_hole(0, 65536, false).expect("no-hole");
    assert_eq!(file_blocks(&path), before, "NO_HOLE frees nothing");
    let mut want = data.clone();
    want[..65536].fill(0);
    want[65536..65536 * 2 + 32768].fill(0);
    want[4 * 65536..].fill(0);
    let mut back = vec![0u8; size as usize];
    v.read_at(&mut back, 0).expect("read");
    assert_eq!(back, want);
    v.flush().expect("flush");
    drop(v);
    let v = open_rw(&path, &h, &dek);
    v.read_at(&mut back, 0).expect("read");
    assert_eq!(back, want, "after reopen");
    // Re-allocating a previously used chunk writes zeros around new data, not the
    // stale ciphertext that may still be in the file.
    v.write_at(b"x", 10, false).expect("write");
    v.read_at(&mut back[..65536], 0).expect("read");
    assert_eq!(back[10], b'x');
    assert!(back[..10].iter().chain(&back[11..65536]).all(|&b| b == 0));
}

#[test]
fn preallocate_fills_everything_with_ciphertext() {
    let (_d, path, h, _dek, v) = setup(256 * 1024, 4096);
    let calls = std::sync::atomic::AtomicU64::new(0);
    v.preallocate(&|done| calls.store(done, std::sync::atomic::Ordering::Relaxed))
        .expect("preallocate");
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 256 * 1024);
    assert_eq!(v.allocated_bytes(), 256 * 1024);
    assert_eq!(v.extents(0, 256 * 1024).expect("ext").len(), 1);
    let mut back = vec![1u8; 256 * 1024];
    v.read_at(&mut back, 0).expect("read");
    assert!(back.iter().all(|&b| b == 0));
    let file = std::fs::read(&path).expect("read");
    let area = &file[h.data_offset as usize..];
    // No all-zero 512-byte block anywhere in the data area.
    assert!(area.chunks(512).all(|c| c.iter().any(|&b| b != 0)));
}

#[test]
fn aligned_write_at_mut_clobbers_and_persists() {
    let (_d, path, h, dek, v) = setup(64 * 1024, 512);
    let orig: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    // The first write to a chunk allocates it (whole-chunk path, buffer untouched);
    // the next aligned write takes the in-place path.
    let mut buf = orig.clone();
    v.write_at_mut(&mut buf, 1024, false).expect("write");
    assert_eq!(buf, orig, "allocating write leaves the buffer alone");
    let mut buf = orig.clone();
    v.write_at_mut(&mut buf, 1024, false).expect("write");
    assert_ne!(buf, orig, "aligned buffer was encrypted in place");
    let mut odd = orig[..700].to_vec();
    v.write_at_mut(&mut odd, 20_001, false).expect("unaligned");
    v.flush().expect("flush");
    drop(v);
    let v = open_rw(&path, &h, &dek);
    let mut back = vec![0u8; 8192];
    v.read_at(&mut back, 1024).expect("read");
    assert_eq!(back, orig);
    let mut back = vec![0u8; 700];
    v.read_at(&mut back, 20_001).expect("read");
    assert_eq!(back, orig[..700]);
}
