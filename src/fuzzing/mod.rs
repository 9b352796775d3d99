//! Fuzz target bodies: one function per parser of bytes that come from outside the
//! process (NBD clients and servers, volume files, sidecars, key files, programs, the
//! kernel). The cargo-fuzz crate in `fuzz/` calls each as `cryptvol::fuzzing::TARGET(data)`
//! and `tests/fuzz_corpus.rs` replays the checked-in corpus through the same functions,
//! so a crash the fuzzer found stays fixed.
//!
//! Each body feeds `data` to the parser and panics when an invariant breaks: a panic in
//! the parser itself, an encoder and decoder that do not round-trip, a header that
//! verifies with a key other than its own, a reply that breaks the protocol's bounds.
//! Allocation is bounded by the fuzzer (`-malloc_limit_mb`). Not a stable API.

mod input;
mod nbd_peer;
mod nbd_server;
mod records;
mod seeds;
mod volume;

pub use nbd_peer::{nbd_client, nbd_uri, netlink_reply};
pub use nbd_server::{nbd_handshake, nbd_transmission};
pub use records::{
    control_protocol, exec_reply, import_journal, keystore_record, snapshot_manifest,
};
pub use seeds::seeds;
pub use volume::{alloc_map, cbt_sidecar, volume_header};

/// A fuzz target's body: whether the parser under test accepted the input (the seeds
/// must be; the fuzzer ignores it).
pub type Target = fn(&[u8]) -> bool;

/// Every target, by the name of its fuzz binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_handshake", nbd_handshake),
    ("nbd_transmission", nbd_transmission),
    ("nbd_client", nbd_client),
    ("netlink_reply", netlink_reply),
    ("nbd_uri", nbd_uri),
    ("volume_header", volume_header),
    ("alloc_map", alloc_map),
    ("cbt_sidecar", cbt_sidecar),
    ("snapshot_manifest", snapshot_manifest),
    ("control_protocol", control_protocol),
    ("import_journal", import_journal),
    ("keystore_record", keystore_record),
    ("exec_reply", exec_reply),
];

/// The body of the target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
}
