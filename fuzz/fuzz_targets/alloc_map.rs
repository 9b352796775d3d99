#![no_main]
//! Fuzz target `alloc_map`: the body is `cryptvol::fuzzing::alloc_map` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::alloc_map(data);
});
