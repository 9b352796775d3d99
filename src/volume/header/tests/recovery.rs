//! Reading the two copies: damaged, stale, truncated, misplaced and foreign copies,
//! unknown versions and features, hostile lengths, and a decoder that never panics.

use super::super::copy::{decode_copy, OFF_VERSION};
use super::*;

#[test]
fn damaged_primary_falls_back_and_write_header_repairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, dek) = new_volume(dir.path(), 1 << 20, 4096);
    corrupt(&path, 0, BINARY_HEADER_SIZE + 10);
    let (mut h, health) = read_header(&path).expect("read");
    assert!(matches!(&health.primary, CopyStatus::Damaged(r) if r.contains("checksum")));
    assert_eq!(health.secondary, CopyStatus::Ok);
    h.verify_with_dek(&dek, &path).expect("verify");
    write_header(&path, &mut h, &dek).expect("write");
    assert_eq!(h.sequence, 2);
    let (h2, health2) = read_header(&path).expect("read");
    assert!(health2.is_healthy(), "{health2:?}");
    assert_eq!(h2.sequence, 2);
    h2.verify_with_dek(&dek, &path).expect("verify");
}

#[test]
fn stale_copy_is_reported_and_newest_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    let old_secondary = read_copy(&path, 1);
    h.keyslots.push(dummy_slot(&h.uuid, "b"));
    write_header(&path, &mut h, &dek).expect("write");
    write_copy(&path, 1, &old_secondary);
    let (got, health) = read_header(&path).expect("read");
    assert_eq!(health.primary, CopyStatus::Ok);
    assert_eq!(health.secondary, CopyStatus::Stale(1));
    assert_eq!(got.sequence, 2);
    assert_eq!(got.keyslots.len(), 2);
}

#[test]
fn both_copies_damaged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    corrupt(&path, 0, 5000);
    corrupt(&path, 1, 20);
    match read_header(&path) {
        Err(VolumeError::BothHeadersDamaged {
            primary, secondary, ..
        }) => {
            assert!(primary.contains("checksum"), "{primary}");
            assert!(secondary.contains("checksum"), "{secondary}");
        }
        other => panic!("expected BothHeadersDamaged, got {other:?}"),
    }
    // A header the DEK authenticates (e.g. from a backup) restores both copies.
    write_header(&path, &mut h, &dek).expect("restore");
    let (_, health) = read_header(&path).expect("read");
    assert!(health.is_healthy());
}

#[test]
fn not_a_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").expect("write");
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 2 << 20]).expect("write");
    let random = dir.path().join("random");
    let mut r = vec![0u8; 300_000];
    getrandom::fill(&mut r).expect("rng");
    std::fs::write(&random, &r).expect("write");
    let short = dir.path().join("short");
    std::fs::write(&short, b"hello").expect("write");
    for p in [&empty, &zeros, &random, &short] {
        assert!(
            matches!(read_header(p), Err(VolumeError::NotAVolume { .. })),
            "{}",
            p.display()
        );
    }
    // Writing a header onto a file that is not a volume is refused too.
    let (_, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    assert!(matches!(
        write_header(&zeros, &mut h, &dek),
        Err(VolumeError::NotAVolume { .. })
    ));
}

#[test]
fn truncated_header_area() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(1000).expect("truncate");
    assert!(matches!(
        read_header(&path),
        Err(VolumeError::Truncated { .. })
    ));
}

#[test]
fn missing_file_is_io_error_with_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    match read_header(&dir.path().join("nope")) {
        Err(VolumeError::Io { path, source }) => {
            assert!(path.ends_with("nope"));
            assert_eq!(source.kind(), ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn unknown_version_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
    for i in 0..2 {
        tamper_binary(&path, i, &|c| {
            c[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&2u32.to_le_bytes())
        });
    }
    match read_header(&path) {
        Err(VolumeError::UnsupportedVersion {
            version, supported, ..
        }) => {
            assert_eq!(version, 2);
            assert_eq!(supported, "1");
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    // Only one copy of a newer version is refused as well (never roll back).
    let (path2, _, _) = new_volume(&dir.path().join("x").tap_mkdir(), 1 << 20, 4096);
    tamper_binary(&path2, 0, &|c| {
        c[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&7u32.to_le_bytes())
    });
    assert!(matches!(
        read_header(&path2),
        Err(VolumeError::UnsupportedVersion { version: 7, .. })
    ));
}

#[test]
fn unknown_required_feature_refused_compatible_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, dek) = new_volume(dir.path(), 1 << 20, 4096);
    tamper_both(&path, &|v| {
        v["compatible_features"] = serde_json::json!(["shiny"])
    });
    let (h, _) = read_header(&path).expect("compatible feature is fine to read");
    assert_eq!(h.compatible_features, vec!["shiny".to_string()]);
    // ...but it is covered by the MAC.
    assert!(matches!(
        h.verify_with_dek(&dek, &path),
        Err(VolumeError::HeaderMacMismatch { .. })
    ));
    tamper_both(&path, &|v| {
        v["required_features"] = serde_json::json!(["frobnicate", "zap"])
    });
    match read_header(&path) {
        Err(VolumeError::UnsupportedFeature { features, .. }) => {
            assert_eq!(features, "frobnicate, zap")
        }
        other => panic!("expected UnsupportedFeature, got {other:?}"),
    }
}

#[test]
fn semantically_invalid_copy_is_damaged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
    tamper_json(&path, 0, &|v| {
        v["volume"]["cipher"] = serde_json::json!("aes-cbc-plain")
    });
    let (h, health) = read_header(&path).expect("secondary wins");
    assert_eq!(h.cipher, CIPHER);
    assert!(matches!(&health.primary, CopyStatus::Damaged(r) if r.contains("cipher")));
    tamper_json(&path, 1, &|v| {
        v["volume"]["iv_unit"] = serde_json::json!(512)
    });
    match read_header(&path) {
        Err(VolumeError::BothHeadersDamaged { secondary, .. }) => {
            assert!(secondary.contains("IV unit"))
        }
        other => panic!("expected BothHeadersDamaged, got {other:?}"),
    }
}

#[test]
fn hostile_lengths_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
    tamper_binary(&path, 0, &|c| {
        c[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    tamper_binary(&path, 1, &|c| {
        c[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&0u32.to_le_bytes())
    });
    match read_header(&path) {
        Err(VolumeError::BothHeadersDamaged {
            primary, secondary, ..
        }) => {
            assert!(primary.contains("metadata length"), "{primary}");
            assert!(secondary.contains("metadata length"), "{secondary}");
        }
        other => panic!("expected BothHeadersDamaged, got {other:?}"),
    }
}

#[test]
fn swapped_copies_are_misplaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, _) = new_volume(dir.path(), 1 << 20, 4096);
    let (a, b) = (read_copy(&path, 0), read_copy(&path, 1));
    write_copy(&path, 0, &b);
    write_copy(&path, 1, &a);
    match read_header(&path) {
        Err(VolumeError::BothHeadersDamaged { primary, .. }) => {
            assert!(primary.contains("misplaced"))
        }
        other => panic!("expected BothHeadersDamaged, got {other:?}"),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Random bytes over a valid copy never panic the decoder.
    #[test]
    fn decode_copy_never_panics(garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                                at in 0usize..COPY_LEN, keep_magic in proptest::prelude::any::<bool>()) {
        let mut c = vec![0u8; COPY_LEN];
        if keep_magic {
            c[..8].copy_from_slice(&MAGIC_PRIMARY);
            c[OFF_VERSION] = 1;
        }
        let end = (at + garbage.len()).min(COPY_LEN);
        c[at..end].copy_from_slice(&garbage[..end - at]);
        let _ = decode_copy(&c, 0);
        let _ = decode_copy(&c[..at], 0);
    }
}
