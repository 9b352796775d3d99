use super::*;
use crate::volume::header::tests::new_volume;
use crate::volume::reencrypt::tests::copy;
use crate::volume::{OpenOptions, Volume, SNAPSHOT_CHUNK};
use std::path::PathBuf;

#[test]
fn a_sidecar_larger_than_its_format_allows_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.img.cbt");
    let uuid = uuid::Uuid::new_v4();
    let good = cbt_encode(&uuid, false, Some("snap-1"), &[5, 6]).unwrap();
    std::fs::write(&p, &good).unwrap();
    assert_eq!(read_sidecar(&p, 2).unwrap(), good);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(1 << 40).unwrap(); // sparse 1 TiB
    let e = read_sidecar(&p, 2).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
}

/// The sidecar's bytes are part of the on-disk format: pinned here, byte for byte.
#[test]
fn the_sidecar_encoding_is_pinned() {
    let uuid = uuid::Uuid::from_bytes([
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ]);
    let b = cbt_encode(&uuid, true, Some("s1"), &[5, 1 << 63]).unwrap();
    assert_eq!(hex::encode(&b), "435643425430303100112233445566778899aabbccddeeff0102007331000008000000000002000000000000000500000000000000000000000000008099cf366baebff08a554e73e301a1ca8e8636a81438944651a9b200a823849bc1");
    let none = cbt_encode(&uuid, false, None, &[]).unwrap();
    assert_eq!(hex::encode(&none), "435643425430303100112233445566778899aabbccddeeff0000000000080000000000000000000000000022c3c3cca92a5ed127abfd2848b2503b5cac850905479f15b93f8afbcd121a7c");
}

/// Issue 14 B6: root followed a symlink planted at `<volume>.cbt.tmp` and overwrote
/// the file it pointed to. The temporary must be created afresh (O_EXCL|O_NOFOLLOW),
/// the victim left alone, and tracking still work.
#[test]
fn cbt_temporary_never_written_through_a_planted_symlink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victims = tempfile::tempdir().expect("tempdir");
    let victim = victims.path().join("shadow");
    std::fs::write(&victim, b"root:secret-hash:19000::::::\n").expect("victim");
    let (path, h, dek) = new_volume(dir.path(), 4 * SNAPSHOT_CHUNK, 4096);
    let tmp = PathBuf::from(format!("{}.cbt.tmp", path.display()));
    std::os::unix::fs::symlink(&victim, &tmp).expect("plant");
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    v.enable_change_tracking().expect("tracking");
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"root:secret-hash:19000::::::\n"
    );
    let sidecar = PathBuf::from(format!("{}.cbt", path.display()));
    let md = std::fs::symlink_metadata(&sidecar).expect("sidecar written");
    assert!(md.file_type().is_file(), "{md:?}");
    assert!(
        std::fs::symlink_metadata(&tmp).is_err(),
        "temporary left behind"
    );
    assert!(v.tracking.get().is_some(), "tracking stayed off");

    // A symlink planted at the sidecar itself is replaced, not written through, and
    // its target is not read as a sidecar.
    drop(v);
    std::fs::remove_file(&sidecar).expect("rm");
    std::os::unix::fs::symlink(&victim, &sidecar).expect("plant");
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    v.enable_change_tracking().expect("tracking");
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"root:secret-hash:19000::::::\n"
    );
    assert!(std::fs::symlink_metadata(&sidecar)
        .expect("sidecar")
        .file_type()
        .is_file());
}

fn sidecar_of(path: &std::path::Path) -> PathBuf {
    PathBuf::from(format!("{}.cbt", path.display()))
}

/// Issue 18 (start time): a cleanly closed sidecar with a base is loaded, and marked
/// "in use" on disk before `enable_change_tracking` returns (in place, then rewritten):
/// a crash from then on leaves a sidecar no open can load.
#[test]
fn a_loadable_sidecar_is_in_use_on_disk_once_tracking_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 4 * SNAPSHOT_CHUNK, 4096);
    let n = Tracking::nwords(4 * SNAPSHOT_CHUNK);
    let clean = cbt_encode(&h.uuid, false, Some("snap-1"), &vec![0b101; n]).expect("encode");
    std::fs::write(sidecar_of(&path), &clean).expect("sidecar");
    assert!(loadable_by_some_open(&clean, &h.uuid));
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    v.enable_change_tracking().expect("tracking");
    let t = v.tracking.get().expect("tracking on");
    assert_eq!(
        lock_ignoring_poison(&t.meta).base.as_deref(),
        Some("snap-1")
    );
    let on_disk = std::fs::read(sidecar_of(&path)).expect("sidecar");
    assert_eq!(
        on_disk.get(IN_USE_AT as usize),
        Some(&1),
        "not marked in use"
    );
    assert!(!loadable_by_some_open(&on_disk, &h.uuid));
    assert!(cbt_decode(&on_disk, &h.uuid, n).is_none());
    // A clean close makes it loadable again, with the bits.
    drop(v);
    let closed = std::fs::read(sidecar_of(&path)).expect("sidecar");
    assert_eq!(
        cbt_decode(&closed, &h.uuid, n),
        Some(("snap-1".to_string(), vec![0b101; n]))
    );
}

/// A clean sidecar with another word count (it would load after an online grow to that
/// size) is invalidated too, not skipped as "not this volume's".
#[test]
fn a_clean_sidecar_of_another_size_is_invalidated_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 4 * SNAPSHOT_CHUNK, 4096);
    let n = Tracking::nwords(4 * SNAPSHOT_CHUNK);
    let other = cbt_encode(&h.uuid, false, Some("snap-9"), &vec![1; n + 1]).expect("encode");
    std::fs::write(sidecar_of(&path), &other).expect("sidecar");
    assert!(loadable_by_some_open(&other, &h.uuid));
    assert!(cbt_decode(&other, &h.uuid, n).is_none());
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    v.enable_change_tracking().expect("tracking");
    let on_disk = std::fs::read(sidecar_of(&path)).expect("sidecar");
    assert!(!loadable_by_some_open(&on_disk, &h.uuid), "still loadable");
    assert!(cbt_decode(&on_disk, &h.uuid, n + 1).is_none());
}

/// Without a sidecar (or with an invalid one) tracking starts without a sync, but the
/// file it writes is "in use" all the same, and never loadable.
#[test]
fn without_a_loadable_sidecar_the_new_one_is_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 4 * SNAPSHOT_CHUNK, 4096);
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    v.enable_change_tracking().expect("tracking");
    assert!(v.tracking.get().is_some(), "tracking stayed off");
    let on_disk = std::fs::read(sidecar_of(&path)).expect("sidecar written");
    assert_eq!(on_disk.get(IN_USE_AT as usize), Some(&1));
    assert!(!loadable_by_some_open(&on_disk, &h.uuid));
}

/// The in-place mark refuses a file whose bytes changed since they were read, or
/// that has a second link (it would write into another file): the caller then replaces
/// the sidecar by rename, as before.
#[test]
fn the_in_place_mark_refuses_changed_or_linked_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("v.img.cbt");
    let uuid = uuid::Uuid::new_v4();
    let clean = cbt_encode(&uuid, false, Some("s"), &[1, 2]).expect("encode");
    std::fs::write(&p, &clean).expect("write");
    let other = cbt_encode(&uuid, false, Some("t"), &[1, 2]).expect("encode");
    assert!(mark_in_use_in_place(&p, &other).is_err());
    assert_eq!(std::fs::read(&p).expect("read"), clean);
    let link = dir.path().join("elsewhere");
    std::fs::hard_link(&p, &link).expect("link");
    assert!(mark_in_use_in_place(&p, &clean).is_err());
    assert_eq!(std::fs::read(&link).expect("read"), clean);
    std::fs::remove_file(&link).expect("rm");
    mark_in_use_in_place(&p, &clean).expect("mark");
    assert!(!loadable_by_some_open(
        &std::fs::read(&p).expect("read"),
        &uuid
    ));
}

/// A word count read from the file is bounded before it is used: a huge one is just
/// not loadable (no overflow).
#[test]
fn a_huge_word_count_in_the_file_is_not_loadable() {
    let uuid = uuid::Uuid::new_v4();
    let mut b = cbt_encode(&uuid, false, Some("s"), &[1]).expect("encode");
    let at = 27 + 1 + 8;
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(!loadable_by_some_open(&b, &uuid));
    b[at..at + 8].copy_from_slice(&(u64::MAX / 8 + 1).to_le_bytes());
    assert!(!loadable_by_some_open(&b, &uuid));
}
