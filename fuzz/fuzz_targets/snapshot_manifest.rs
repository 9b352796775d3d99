#![no_main]
//! Fuzz target `snapshot_manifest`: the body is `cryptvol::fuzzing::snapshot_manifest` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::snapshot_manifest(data);
});
