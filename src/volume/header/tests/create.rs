//! Creating volumes: the round trip through the file, the canonical metadata JSON,
//! spec validation, and the allocation map with its feature (and legacy volumes
//! without either).

use super::super::copy::OFF_SALT;
use super::*;

#[test]
fn create_then_read_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, created, dek) = new_volume(dir.path(), 8 << 20, 4096);
    let (h, health) = read_header(&path).expect("read");
    assert!(health.is_healthy(), "{health:?}");
    assert_eq!(h.uuid, created.uuid);
    assert_eq!(h.size, 8 << 20);
    assert_eq!(h.sector_size, 4096);
    assert_eq!(h.iv_unit, 4096);
    assert_eq!(h.data_offset, DEFAULT_DATA_OFFSET);
    assert_eq!(h.cipher, CIPHER);
    assert_eq!(h.sequence, 1);
    assert_eq!(h.keyslots, created.keyslots);
    assert_eq!(h.key_check, created.key_check);
    assert_eq!(h.header_mac, created.header_mac);
    h.verify_with_dek(&dek, &path).expect("verify");
    let len = std::fs::metadata(&path).expect("meta").len();
    assert_eq!(len, DEFAULT_DATA_OFFSET + (8 << 20));
    // Distinct magics and salts: the two copies never hold identical bytes.
    let (a, b) = (read_copy(&path, 0), read_copy(&path, 1));
    assert_eq!(&a[..8], b"CRYPTVOL");
    assert_eq!(&b[..8], b"LOVTPYRC");
    assert_ne!(a[OFF_SALT..OFF_SALT + 32], b[OFF_SALT..OFF_SALT + 32]);
}

#[test]
fn metadata_json_is_canonical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _, _) = new_volume(dir.path(), 1 << 20, 512);
    let c = read_copy(&path, 0);
    let len = le_u32(&c, OFF_META_LEN) as usize;
    let text = &c[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + len];
    // serde_json::Value keeps objects in a BTreeMap: re-serializing sorts keys.
    let v: serde_json::Value = serde_json::from_slice(text).expect("json");
    assert_eq!(serde_json::to_vec(&v).expect("json"), text);
}

#[test]
fn create_validates_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dek = Dek::generate().expect("dek");
    let uuid = uuid::Uuid::new_v4();
    let path = dir.path().join("v");
    let bad = [
        (
            VolumeSpec {
                size: 4096 * 3 + 512,
                sector_size: 4096,
            },
            "size",
        ),
        (
            VolumeSpec {
                size: 0,
                sector_size: 4096,
            },
            "size",
        ),
        (
            VolumeSpec {
                size: 1 << 20,
                sector_size: 1024,
            },
            "sector",
        ),
    ];
    for (spec, what) in bad {
        let r = create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek);
        match (what, r) {
            ("size", Err(VolumeError::BadSize { .. })) => {}
            ("sector", Err(VolumeError::BadSectorSize(1024))) => {}
            (_, other) => panic!("{what}: unexpected {other:?}"),
        }
        assert!(!path.exists(), "nothing is left behind");
    }
    let spec = VolumeSpec {
        size: 1 << 20,
        sector_size: 512,
    };
    assert!(matches!(
        create(&path, &spec, uuid, vec![], &dek),
        Err(VolumeError::InvalidHeader { .. })
    ));
    assert!(!path.exists());
    let too_many: Vec<_> = (0..MAX_KEYSLOTS + 1)
        .map(|i| dummy_slot(&uuid, &i.to_string()))
        .collect();
    assert!(create(&path, &spec, uuid, too_many, &dek).is_err());
    assert!(!path.exists());
    let mut huge = dummy_slot(&uuid, "h");
    huge.blob = vec![1; METADATA_AREA_SIZE];
    match create(&path, &spec, uuid, vec![huge], &dek) {
        Err(VolumeError::InvalidHeader { detail, .. }) => {
            assert!(detail.contains("metadata area"), "{detail}")
        }
        other => panic!("expected InvalidHeader, got {other:?}"),
    }
    assert!(!path.exists());
    // 512-byte sectors are accepted.
    create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek).expect("512");
}

#[test]
fn create_refuses_existing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("precious");
    std::fs::write(&path, b"do not touch").expect("write");
    let dek = Dek::generate().expect("dek");
    let uuid = uuid::Uuid::new_v4();
    let spec = VolumeSpec {
        size: 1 << 20,
        sector_size: 4096,
    };
    assert!(matches!(
        create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek),
        Err(VolumeError::AlreadyExists { .. })
    ));
    assert_eq!(std::fs::read(&path).expect("read"), b"do not touch");
}

#[test]
fn legacy_volume_without_map_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_legacy_volume(dir.path(), 1 << 20, 4096);
    let (back, _) = read_header(&path).expect("read");
    assert!(back.allocation_map.is_none() && back.required_features.is_empty());
    back.verify_with_dek(&dek, &path)
        .expect("MAC without map fields");
    assert_eq!(back.header_mac, h.header_mac);
}

#[test]
fn map_and_feature_must_come_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    assert!(h.allocation_map.is_some());
    assert_eq!(h.required_features, vec!["allocation-map".to_string()]);
    let mut t = h.clone();
    t.required_features.clear();
    assert!(matches!(
        write_header(&path, &mut t, &dek),
        Err(VolumeError::InvalidHeader { .. })
    ));
    let mut t = h.clone();
    t.allocation_map = None;
    assert!(matches!(
        write_header(&path, &mut t, &dek),
        Err(VolumeError::InvalidHeader { .. })
    ));
    // Tampering with the map layout is caught by the MAC.
    let mut t = h.clone();
    if let Some(m) = t.allocation_map.as_mut() {
        m.copy_offsets.swap(0, 1);
    }
    assert!(matches!(
        t.verify_with_dek(&dek, &path),
        Err(VolumeError::HeaderMacMismatch { .. })
    ));
}
