#![no_main]
//! Fuzz target `nbd_handshake`: the body is `cryptvol::fuzzing::nbd_handshake` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::nbd_handshake(data);
});
