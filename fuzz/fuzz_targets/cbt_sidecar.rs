#![no_main]
//! Fuzz target `cbt_sidecar`: the body is `cryptvol::fuzzing::cbt_sidecar` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::cbt_sidecar(data);
});
