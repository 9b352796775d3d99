use super::*;
use crate::crypto::Dek;
use crate::volume::header::tests::{dummy_slot, new_volume};
use crate::volume::io::test_support::*;
use crate::volume::{create, read_header, OpenOptions, Volume, VolumeSpec, DEFAULT_DATA_OFFSET};
use std::os::unix::fs::FileExt;

#[test]
fn fresh_volume_opens_and_reports_geometry() {
    let (_d, path, h, _, v) = setup(1 << 20, 512);
    assert_eq!(v.size(), 1 << 20);
    assert_eq!(v.sector_size(), 512);
    assert_eq!(v.uuid(), h.uuid);
    assert_eq!(v.data_offset(), DEFAULT_DATA_OFFSET);
    assert!(!v.read_only());
    assert_eq!(v.path(), path.display().to_string());
}

#[test]
fn open_with_wrong_dek_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, _) = new_volume(dir.path(), 1 << 20, 4096);
    let other = Dek::generate().expect("dek");
    assert!(matches!(
        Volume::open(&path, &h, other, OpenOptions::default()),
        Err(VolumeError::KeyCheckFailed { .. })
    ));
}

#[test]
fn open_refuses_header_of_another_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path_a, _, _) = new_volume(dir.path(), 1 << 20, 4096);
    let other = dir.path().join("b.img");
    let uuid = uuid::Uuid::new_v4();
    let dek_b = Dek::generate().expect("dek");
    let spec = VolumeSpec {
        size: 1 << 20,
        sector_size: 4096,
    };
    let hb = create(&other, &spec, uuid, vec![dummy_slot(&uuid, "b")], &dek_b).expect("create");
    assert!(matches!(
        Volume::open(&path_a, &hb, dek_b, OpenOptions::default()),
        Err(VolumeError::InvalidHeader { .. })
    ));
}

#[test]
fn truncated_data_area_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(DEFAULT_DATA_OFFSET + (1 << 20) - 4096)
        .expect("truncate");
    let (h2, _) = read_header(&path).expect("header intact");
    assert_eq!(h2.uuid, h.uuid);
    let r = Volume::open(
        &path,
        &h2,
        Dek::from_slice(dek.expose()).expect("dek"),
        OpenOptions::default(),
    );
    match r {
        Err(VolumeError::Truncated { detail, .. }) => {
            assert!(detail.contains("restore"), "{detail}")
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn damaged_map_pages_are_reported_and_repaired() {
    let (_d, path, h, dek, v) = setup(1 << 20, 4096);
    v.write_at(&[9u8; 4096], 0, true).expect("write");
    drop(v);
    let layout = h.allocation_map.expect("thin");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    FileExt::write_all_at(&f, &[0xEE; 64], layout.copy_offsets[0] + 500).expect("damage");
    FileExt::write_all_at(&f, &[0xEE; 64], layout.copy_offsets[1] + 500).expect("damage");
    drop(f);
    let sum = crate::volume::map_summary(&path, &h)
        .expect("summary")
        .expect("thin");
    assert_eq!(sum.health.pages_damaged, vec![0]);
    // Opening read-write treats the page as allocated (nothing lost) and repairs it.
    let v = open_rw(&path, &h, &dek);
    let mut back = vec![0u8; 4096];
    v.read_at(&mut back, 0).expect("read");
    assert_eq!(back, vec![9u8; 4096], "written data still readable");
    drop(v);
    let sum = crate::volume::map_summary(&path, &h)
        .expect("summary")
        .expect("thin");
    assert!(sum.health.is_healthy(), "{:?}", sum.health);
    assert_eq!(sum.allocated_chunks, 16, "conservatively all allocated");
}

#[test]
fn a_volume_is_open_for_writing_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 64 * 1024, 4096);
    let ro = |read_only| OpenOptions {
        read_only,
        discard: false,
        ..OpenOptions::default()
    };
    let key = || Dek::from_slice(dek.expose()).expect("dek");
    let rw = Volume::open(&path, &h, key(), ro(false)).expect("first writer");
    assert!(matches!(
        Volume::open(&path, &h, key(), ro(false)),
        Err(VolumeError::InUse { .. })
    ));
    assert!(matches!(
        Volume::open(&path, &h, key(), ro(true)),
        Err(VolumeError::InUse { .. })
    ));
    // The header can still be read while the volume is open.
    read_header(&path).expect("read header of an open volume");
    drop(rw);
    let r1 = Volume::open(&path, &h, key(), ro(true)).expect("reader 1");
    let _r2 = Volume::open(&path, &h, key(), ro(true)).expect("readers share");
    assert!(matches!(
        Volume::open(&path, &h, key(), ro(false)),
        Err(VolumeError::InUse { .. })
    ));
    drop(r1);
}
