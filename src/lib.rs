//! cryptvol: self-hosted encrypted block volumes served over NBD.
//!
//! Layers (see `docs/ARCHITECTURE.md`):
//! - [`nbd`]: the NBD wire protocol as pure functions over bytes (no I/O, no crypto).
//! - [`server`]: sockets, tasks, concurrency, shutdown.
//! - [`blockdev`]: the `BlockDevice` trait between a frontend (the NBD session) and the
//!   device serving blocks (the encrypted volume, or `MemDevice` in memory).
//! - [`volume`]: on-disk header, backing-file I/O, sector arithmetic.
//! - [`crypto`]: the XTS engine and secret types (no I/O).
//! - [`keys`]: the `KeyBackend` trait and its backends.
//! - [`ops`]: the commands' logic composed from the layers above (create, unlock, info,
//!   keyslots and rekey, snapshots and restore, the data key of a re-encryption).
//! - [`nbdclient`]: a small blocking NBD client (socket I/O over the [`nbd`] codec).
//! - [`attach`]: `cryptvol attach`, the kernel's nbd device over netlink (reconnect, watch).
//! - [`migrate`]: `import` (unencrypted disk → new volume, resumable) and `export`.
//! - [`progress`]: progress bars / periodic log lines for long operations.
//! - [`compliance`]: `cryptvol check`, the compliance scanner (headers and key metadata only).
//! - [`snapshot`]: encrypted, incremental snapshots in a local or S3-compatible object store.
//! - [`latency`]: a lock-free latency histogram (request and key-backend metrics).
//! - [`fsutil`]: creating and rewriting files without following symlinks.
//! - [`rbd`]: volumes on Ceph RBD: the `rbd:POOL/IMAGE` spec and, with the `rbd` feature,
//!   the librbd engine (FFI of our own, exclusive lock, takeover, bounded waits).
//! - [`config`]: the `serve` configuration file and how it combines with the command line.
//! - [`ublk`]: the ublk frontend: a served volume as `/dev/ublkbN` (kernel userspace block
//!   driver), through the same `BlockDevice` as the NBD session; user recovery.
//! - [`cli`]: the clap front end: arguments, printing, and the daemon's wiring (`cli/serve.rs`:
//!   settings, signals, listeners, control hooks).
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod attach;
pub mod blockdev;
pub mod cli;
pub mod compliance;
pub mod config;
pub mod crypto;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod latency;
pub mod migrate;
pub mod nbd;
pub mod nbdclient;
pub mod ops;
pub mod progress;
pub mod rbd;
pub mod server;
pub mod size;
pub mod snapshot;
pub mod ublk;
pub mod volume;
