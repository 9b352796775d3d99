#![no_main]
//! Fuzz target `keystore_record`: the body is `cryptvol::fuzzing::keystore_record` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::keystore_record(data);
});
