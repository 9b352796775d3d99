#![no_main]
//! Fuzz target `volume_header`: the body is `cryptvol::fuzzing::volume_header` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::volume_header(data);
});
