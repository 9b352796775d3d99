//! The key check value and the header MAC: a wrong key, tampering with any covered
//! field, and the documented construction rebuilt independently.

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::super::mac::tag32;
use super::*;

#[test]
fn wrong_dek_fails_key_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, mut h, _) = new_volume(dir.path(), 1 << 20, 4096);
    let other = Dek::generate().expect("dek");
    assert!(matches!(
        h.verify_with_dek(&other, &path),
        Err(VolumeError::KeyCheckFailed { .. })
    ));
    assert!(matches!(
        write_header(&path, &mut h, &other),
        Err(VolumeError::KeyCheckFailed { .. })
    ));
    assert_eq!(
        read_header(&path).expect("read").0.sequence,
        1,
        "nothing written"
    );
}

#[test]
fn mac_detects_tampering() {
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 7] = [
        ("size", |v| v["volume"]["size"] = serde_json::json!(2 << 20)),
        ("sector size", |v| {
            v["volume"]["sector_size"] = serde_json::json!(512);
            v["volume"]["iv_unit"] = serde_json::json!(512);
        }),
        ("data offset", |v| {
            v["volume"]["data_offset"] = serde_json::json!(2 << 20)
        }),
        ("keyslot removed", |v| {
            if let Some(a) = v["keyslots"].as_array_mut() {
                a.pop();
            }
        }),
        ("keyslot backend", |v| {
            v["keyslots"][0]["backend"] = serde_json::json!("evil")
        }),
        ("keyslot context", |v| {
            v["keyslots"][0]["context"]["cryptvol:volume-uuid"] = serde_json::json!("x")
        }),
        ("keyslot params", |v| {
            v["keyslots"][1]["params"]["tag"] = serde_json::json!("c")
        }),
    ];
    for (what, edit) in edits {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, mut h, dek) = new_volume(dir.path(), 1 << 20, 4096);
        h.keyslots.push(dummy_slot(&h.uuid, "b"));
        write_header(&path, &mut h, &dek).expect("write");
        tamper_both(&path, &edit);
        let (t, health) = read_header(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(health.is_healthy(), "{what}: checksums were fixed");
        assert!(
            matches!(
                t.verify_with_dek(&dek, &path),
                Err(VolumeError::HeaderMacMismatch { .. })
            ),
            "{what}: tampering not detected"
        );
    }
}

/// The KCV and MAC follow docs/format.md §4 exactly (built here independently).
#[test]
fn kcv_and_mac_follow_the_documented_construction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, h, dek) = new_volume(dir.path(), 1 << 20, 512);
    let derive = |info: &[u8]| {
        let mut k = [0u8; 32];
        Hkdf::<Sha256>::new(None, dek.expose())
            .expand(info, &mut k)
            .expect("hkdf");
        k
    };
    let hmac = |key: &[u8], msg: &[u8]| {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("hmac");
        m.update(msg);
        tag32(m)
    };
    assert_eq!(
        hmac(&derive(b"cryptvol kcv"), h.uuid.as_bytes()),
        h.key_check
    );

    let lp = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    let mut m = Vec::new();
    lp(&mut m, b"cryptvol header mac v1\0");
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(h.uuid.as_bytes());
    m.extend_from_slice(&(1u64 << 20).to_le_bytes());
    m.extend_from_slice(&512u32.to_le_bytes());
    m.extend_from_slice(&(1u64 << 20).to_le_bytes());
    lp(&mut m, b"aes-xts-plain64");
    m.extend_from_slice(&64u32.to_le_bytes());
    m.extend_from_slice(&512u32.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes()); // required_features: one
    lp(&mut m, b"allocation-map");
    m.extend_from_slice(&0u32.to_le_bytes()); // compatible_features
    m.extend_from_slice(&1u32.to_le_bytes()); // one keyslot
    let slot = &h.keyslots[0];
    lp(&mut m, slot.backend.as_bytes());
    lp(&mut m, slot.key_id.as_bytes());
    lp(&mut m, &slot.blob);
    m.extend_from_slice(&1u32.to_le_bytes());
    lp(&mut m, b"cryptvol:volume-uuid");
    lp(&mut m, h.uuid.to_string().as_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    lp(&mut m, b"tag");
    lp(&mut m, b"a");
    // The allocation map layout (present with the allocation-map feature).
    lp(&mut m, b"allocation-map");
    m.extend_from_slice(&65536u32.to_le_bytes()); // chunk size
    m.extend_from_slice(&4096u32.to_le_bytes()); // page size
    m.extend_from_slice(&1u64.to_le_bytes()); // pages per copy
    m.extend_from_slice(&131072u64.to_le_bytes()); // copy 0
    m.extend_from_slice(&(131072u64 + 4096).to_le_bytes()); // copy 1
    assert_eq!(h.mac_input().expect("mac input"), m);
    assert_eq!(hmac(&derive(b"cryptvol header mac"), &m), h.header_mac);
}

#[test]
fn uuid_swap_is_a_key_check_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 1 << 20, 4096);
    let mut t = h.clone();
    t.uuid = uuid::Uuid::new_v4();
    assert!(matches!(
        t.verify_with_dek(&dek, &path),
        Err(VolumeError::KeyCheckFailed { .. })
    ));
}
