//! Records read from files and programs: snapshot manifests (from a snapshot store),
//! control-socket requests (from local clients), the import journal, key files of the
//! local keystore, and the answers of exec key-backend programs.

use super::seeds::{other_dek, seed_dek, seed_manifests, SEED_SNAPSHOT_ID};
use crate::keys::{exec_fuzz_hooks, keystore_fuzz_hooks};
use crate::migrate::journal::{parse_records, progress};
use crate::server::control::{parse_reply, parse_request};
use crate::snapshot::{Manifest, SnapshotId};

/// A snapshot manifest stored as the seeds' snapshot id. An accepted manifest must
/// round-trip through its JSON, never verify under another key, and verify under the
/// seeds' key only if everything its MAC covers is a seed's.
pub fn snapshot_manifest(data: &[u8]) -> bool {
    let Ok(id) = SnapshotId::parse(SEED_SNAPSHOT_ID) else {
        panic!("the seed snapshot id does not parse");
    };
    let Ok(manifest) = Manifest::parse(&id, data) else {
        return false;
    };
    let json = manifest.to_json().expect("an accepted manifest encodes");
    match Manifest::parse(&id, &json) {
        Ok(again) => assert_eq!(again, manifest, "the manifest changed in a round trip"),
        Err(e) => panic!("a re-encoded manifest is refused: {e}"),
    }
    for index in 0..manifest.chunk_count().min(4) {
        let _ = (
            manifest.chunk_name(index),
            manifest.chunk_len(index),
            manifest.first_sector(index),
        );
    }
    let _ = manifest.expected_context();
    let other = other_dek();
    assert!(
        manifest.verify(&other).is_err(),
        "a manifest verified under a key it was not made with"
    );
    if manifest.verify(&seed_dek()).is_ok() {
        let covered = manifest
            .mac_input()
            .expect("the MAC input of a verified manifest");
        let known = seed_manifests()
            .iter()
            .any(|s| s.mac_input().is_ok_and(|m| m == covered));
        assert!(
            known,
            "a manifest whose covered fields differ from every seed verified"
        );
    }
    true
}

/// One control-socket request line (and, read as the daemon's answer, one reply line).
/// An accepted request must come back unchanged from its own wire line.
pub fn control_protocol(data: &[u8]) -> bool {
    let reply = std::str::from_utf8(data).is_ok_and(|text| parse_reply(text).is_ok());
    let Ok(request) = parse_request(data) else {
        return reply;
    };
    let line = request.to_line();
    assert!(
        line.ends_with('\n') && line.matches('\n').count() == 1,
        "a request line spans lines: {line:?}"
    );
    match parse_request(line.as_bytes()) {
        Ok(again) => assert_eq!(again, request, "the request changed in a round trip"),
        Err(e) => panic!("the wire line of an accepted request is refused: {e} ({line:?})"),
    }
    true
}

/// An import journal, as `Journal::open` reads it: a torn last line is dropped, the rest
/// parsed. Accepted records must come back unchanged from the lines the journal writes.
pub fn import_journal(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let Ok(records) = parse_records(&text[..complete]) else {
        return false;
    };
    let _ = progress(&records);
    let mut written = String::new();
    for r in &records {
        match serde_json::to_string(r) {
            Ok(line) => {
                written.push_str(&line);
                written.push('\n');
            }
            Err(e) => panic!("an accepted record cannot be written: {e}"),
        }
    }
    match parse_records(&written) {
        Ok(again) => assert_eq!(again, records, "records changed in a round trip"),
        Err(e) => panic!("journal lines this code wrote are refused: {e}"),
    }
    !records.is_empty()
}

/// A key file of the local keystore (see `keys::local::fuzz_hooks::key_file`).
pub fn keystore_record(data: &[u8]) -> bool {
    keystore_fuzz_hooks::key_file(data).is_ok()
}

/// An exec key-backend program's answer (see `keys::exec::fuzz_hooks::exec_replies`).
pub fn exec_reply(data: &[u8]) -> bool {
    exec_fuzz_hooks::exec_replies(data)
}
