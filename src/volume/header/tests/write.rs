//! Crash-safe header updates: the order of the two writes, a crash between them,
//! lost updates, and a header written over another volume.

use super::super::write::{plan_write, write_order};
use super::*;

#[test]
fn write_order_writes_the_invalid_copy_first() {
    let ok = CopyStatus::Ok;
    let bad = CopyStatus::Damaged("x".into());
    let h = |p: &CopyStatus, s: &CopyStatus| HeaderHealth {
        primary: p.clone(),
        secondary: s.clone(),
    };
    assert_eq!(write_order(Some(&h(&ok, &ok))), [0, 1]);
    assert_eq!(write_order(Some(&h(&bad, &ok))), [0, 1]);
    assert_eq!(write_order(Some(&h(&ok, &bad))), [1, 0]);
    assert_eq!(write_order(Some(&h(&ok, &CopyStatus::Stale(3)))), [1, 0]);
    assert_eq!(write_order(Some(&h(&CopyStatus::Stale(3), &ok))), [0, 1]);
    assert_eq!(write_order(None), [0, 1]);
}

/// A crash after the first write (or a torn first write) leaves a valid header.
#[test]
fn crash_during_header_update_leaves_a_valid_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    corrupt(&path, 1, 300); // secondary damaged, primary is the only valid copy
    h.keyslots.push(dummy_slot(&h.uuid, "b"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let plan = plan_write(&file, &path, &h, &dek).expect("plan");
    assert_eq!(
        plan.writes[0].0, HEADER_COPY_SIZE,
        "damaged secondary goes first"
    );
    // Torn first write: the binary header and the start of the metadata land.
    let (off, bytes) = &plan.writes[0];
    file.write_all_at(&bytes[..BINARY_HEADER_SIZE + 10], *off)
        .expect("write");
    let (got, _) = read_header(&path).expect("old header still readable");
    assert_eq!(got.sequence, 1);
    // Complete first write, crash before the second.
    file.write_all_at(bytes, *off).expect("write");
    let (got, health) = read_header(&path).expect("new header readable");
    assert_eq!(got.sequence, 2);
    assert_eq!(got.keyslots.len(), 2);
    assert_eq!(health.primary, CopyStatus::Stale(1));
    got.verify_with_dek(&dek, &path).expect("verify");
}

#[test]
fn stale_in_memory_header_is_not_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    let mut first = h.clone();
    let mut second = h;
    first.keyslots.push(dummy_slot(&first.uuid, "b"));
    write_header(&path, &mut first, &dek).expect("write");
    second.keyslots.push(dummy_slot(&second.uuid, "c"));
    match write_header(&path, &mut second, &dek) {
        Err(VolumeError::InvalidHeader { detail, .. }) => {
            assert!(detail.contains("read it again"), "{detail}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (now, _) = read_header(&path).expect("read");
    assert_eq!(now.keyslots[1].params["tag"], "b");
}

#[test]
fn header_of_another_volume_is_not_written_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path_a, _, _) = new_volume(&dir.path().join("a").tap_mkdir(), 1 << 20, 4096);
    let (_, mut hb, dek_b) = new_volume(&dir.path().join("b").tap_mkdir(), 1 << 20, 4096);
    assert!(matches!(
        write_header(&path_a, &mut hb, &dek_b),
        Err(VolumeError::InvalidHeader { .. })
    ));
}
