#![no_main]
//! Fuzz target `exec_reply`: the body is `cryptvol::fuzzing::exec_reply` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::exec_reply(data);
});
