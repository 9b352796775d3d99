//! The key file parser over bytes, for the fuzz targets (`crate::fuzzing`).

use std::path::Path;

use super::record::{encode_key_file, parse_key_file, MasterKey};
use crate::keys::KeyError;

/// The key id every fuzzed key file is read as.
pub(crate) const FUZZ_KEY_ID: &str = "mk-0123456789abcdef0123456789abcdef";

/// Parses `bytes` as the key file of [`FUZZ_KEY_ID`] (owner uid 0). When it is accepted,
/// it must also be accepted without its material, and the file this code writes for the
/// key must parse back to the same key; returns how many materials it holds.
pub(crate) fn key_file(bytes: &[u8]) -> Result<usize, KeyError> {
    let path = Path::new("fuzz-keystore").join(format!("{FUZZ_KEY_ID}.json"));
    let key = parse_key_file(&path, FUZZ_KEY_ID, bytes, 0, true)?;
    if let Err(e) = parse_key_file(&path, FUZZ_KEY_ID, bytes, 0, false) {
        panic!("accepted with its material but refused without: {e}");
    }
    let written = match encode_key_file(&key, Path::new("fuzz-keystore")) {
        Ok(b) => b,
        Err(e) => panic!("an accepted key file cannot be written back: {e}"),
    };
    let again = match parse_key_file(&path, FUZZ_KEY_ID, &written, 0, true) {
        Ok(k) => k,
        Err(e) => panic!("a key file this code wrote is refused: {e}"),
    };
    assert_same_key(&key, &again);
    Ok(key.materials.len())
}

fn assert_same_key(a: &MasterKey, b: &MasterKey) {
    let (m, n) = (&a.meta, &b.meta);
    assert_eq!(m.key_id, n.key_id);
    assert_eq!(m.state, n.state);
    assert_eq!(m.created_at, n.created_at);
    assert_eq!(m.deletion_unix, n.deletion_unix);
    assert_eq!(m.creator_uid, n.creator_uid);
    assert_eq!(m.policy, n.policy);
    assert_eq!(m.versions, n.versions);
    assert_eq!(a.materials.len(), b.materials.len());
    for ((v, x), (w, y)) in a.materials.iter().zip(&b.materials) {
        assert_eq!(v, w);
        assert!(
            x.expose() == y.expose(),
            "material {v} changed in the round trip"
        );
    }
}
