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
