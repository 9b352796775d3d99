use std::os::unix::fs::FileExt;
use std::path::Path;

use super::*;
use crate::volume::io::test_support::*;
use crate::volume::read_header;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Opens the volume at `path` as its header on disk says, reads `len` bytes at `off`.
fn reopen_read(path: &Path, dek: &Dek, off: u64, len: usize) -> (u64, Vec<u8>) {
    let (h, _) = read_header(path).expect("header");
    let v = open_rw(path, &h, dek);
    let mut buf = vec![0u8; len];
    v.read_at(&mut buf, off).expect("read");
    (v.size(), buf)
}

fn grow(path: &Path, dek: &Dek, new_size: u64) -> (Header, Growth) {
    let (h, _) = read_header(path).expect("header");
    let v = open_rw(path, &h, dek);
    v.grow_offline(&h, dek, new_size).expect("grow")
}

#[test]
fn grow_keeps_data_and_the_new_space_reads_zeros_even_in_the_old_last_chunk() {
    // 1 MiB + 8 KiB: the last 64 KiB chunk is short, and written, so its bit is set.
    let size = MIB + 8192;
    let (_d, path, h, dek, v) = setup(size, 4096);
    let data = pattern(16384, 7);
    v.write_at(&data, size - 16384, false).unwrap();
    v.flush().unwrap();
    drop(v);
    let (new, g) = grow(&path, &dek, 3 * MIB);
    assert_eq!(
        (g.old_size, g.new_size, g.map_relocated),
        (size, 3 * MIB, false)
    );
    assert_eq!(new.size, 3 * MIB);
    assert_eq!(new.allocation_map, h.allocation_map);
    assert!(new.sequence > h.sequence);
    let (got_size, old) = reopen_read(&path, &dek, size - 16384, 16384);
    assert_eq!(got_size, 3 * MIB);
    assert_eq!(old, data);
    // The rest of the old last chunk and everything after it read as zeros.
    let (_, tail) = reopen_read(&path, &dek, size, (3 * MIB - size) as usize);
    assert!(tail.iter().all(|&b| b == 0));
    // Writes at the new end work and read back.
    let (h2, _) = read_header(&path).unwrap();
    let v = open_rw(&path, &h2, &dek);
    let end = pattern(4096, 9);
    v.write_at(&end, 3 * MIB - 4096, true).unwrap();
    drop(v);
    assert_eq!(reopen_read(&path, &dek, 3 * MIB - 4096, 4096).1, end);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        h.data_offset + 3 * MIB
    );
}

#[test]
fn grow_past_a_map_page_moves_the_map_and_keeps_the_bits() {
    let (_d, path, h, dek, v) = setup(GIB, 4096);
    let a = pattern(4096, 1);
    let b = pattern(4096, 2);
    v.write_at(&a, 0, false).unwrap();
    v.write_at(&b, GIB - 4096, true).unwrap();
    drop(v);
    let (new, g) = grow(&path, &dek, 5 * GIB);
    assert!(g.map_relocated);
    let (old_map, new_map) = (h.allocation_map.unwrap(), new.allocation_map.unwrap());
    assert_eq!((old_map.pages, new_map.pages), (1, 3));
    let old_end = old_map.copy_offsets[1] + PAGE_SIZE as u64;
    assert!(new_map.copy_offsets.iter().all(|&o| o >= old_end));
    let (h2, _) = read_header(&path).unwrap();
    let v = open_rw(&path, &h2, &dek);
    assert!(v.map_health().unwrap().is_healthy());
    assert_eq!(v.allocated_bytes(), 2 * 65536);
    let mut buf = vec![0u8; 4096];
    v.read_at(&mut buf, GIB - 4096).unwrap();
    assert_eq!(buf, b);
    v.read_at(&mut buf, 4 * GIB).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    v.write_at(&a, 5 * GIB - 4096, true).unwrap();
    v.read_at(&mut buf, 5 * GIB - 4096).unwrap();
    assert_eq!(buf, a);
}

/// The header area as it was, put back: the state a crash leaves before the header
/// commit (file extended, new map copies written, old header still current).
fn header_area(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 2 * HEADER_COPY];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

const HEADER_COPY: usize = 65536;

fn put(path: &Path, bytes: &[u8], at: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn every_crash_state_of_a_grow_opens_with_the_old_or_the_new_size() {
    let (_d, path, _h, dek, v) = setup(GIB, 4096);
    let data = pattern(65536, 3);
    v.write_at(&data, GIB - 65536, true).unwrap();
    drop(v);
    let old = header_area(&path);
    grow(&path, &dek, 5 * GIB);
    let new = header_area(&path);
    let (p, s) = (..HEADER_COPY, HEADER_COPY..);
    let torn = |copy: &[u8]| {
        let mut c = copy.to_vec();
        c[5000] ^= 0xff; // inside the metadata area: the checksum fails
        c
    };
    // (primary, secondary) as a crash can leave them: the primary is written first.
    let states: [(Vec<u8>, Vec<u8>, u64); 4] = [
        (old[p].to_vec(), old[s.clone()].to_vec(), GIB),
        (torn(&new[p]), old[s.clone()].to_vec(), GIB),
        (new[p].to_vec(), old[s.clone()].to_vec(), 5 * GIB),
        (new[p].to_vec(), torn(&new[s.clone()]), 5 * GIB),
    ];
    for (i, (prim, sec, want)) in states.iter().enumerate() {
        put(&path, prim, 0);
        put(&path, sec, HEADER_COPY as u64);
        let (size, got) = reopen_read(&path, &dek, GIB - 65536, 65536);
        assert_eq!(size, *want, "crash state {i}");
        assert_eq!(got, data, "crash state {i}");
    }
}

#[test]
fn shrinking_and_same_size_are_refused_with_a_hint() {
    let (_d, path, h, dek, v) = setup(4 * MIB, 4096);
    let e = v.grow_offline(&h, &dek, 2 * MIB).unwrap_err().to_string();
    assert!(
        e.contains("cannot shrink") && e.contains("new volume and copy"),
        "{e}"
    );
    let e = v.grow_offline(&h, &dek, 4 * MIB).unwrap_err().to_string();
    assert!(e.contains("already has"), "{e}");
    let e = v
        .grow_offline(&h, &dek, 4 * MIB + 100)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sector"), "{e}");
    drop(v);
    assert_eq!(read_header(&path).unwrap().0.size, 4 * MIB);
}

#[test]
fn growth_past_the_map_area_is_refused_with_the_limit() {
    let (layout, data_offset) = MapLayout::for_size(GIB);
    assert_eq!(data_offset, MIB);
    // 1 MiB of data offset: 224 pages after the headers, 2 used by the current copies.
    let ok = grown_layout(&layout, 200 * GIB, data_offset).unwrap();
    assert_eq!(ok.pages, 103);
    assert_eq!(
        ok.copy_offsets[0],
        layout.copy_offsets[1] + PAGE_SIZE as u64
    );
    let e = grown_layout(&layout, 300 * GIB, data_offset).unwrap_err();
    assert!(
        e.contains("at most 111 pages") && e.contains("create a new volume"),
        "{e}"
    );
    // Same page count: unchanged.
    assert_eq!(
        grown_layout(&layout, GIB + MIB, data_offset).unwrap(),
        layout
    );
}
