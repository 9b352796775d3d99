#![no_main]
//! Fuzz target `control_protocol`: the body is `cryptvol::fuzzing::control_protocol` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::control_protocol(data);
});
