#![no_main]
//! Fuzz target `import_journal`: the body is `cryptvol::fuzzing::import_journal` (shared with the corpus
//! replay in tests/fuzz_corpus.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cryptvol::fuzzing::import_journal(data);
});
