//! Volumes on a Ceph cluster: the RBD backing engine (issue 19), a minimal FFI layer of
//! our own over librados and librbd (the published crates are stubs or refuse librbd
//! 1.16). What exists now stands alone; wiring `rbd:POOL/IMAGE` into `Volume` through the
//! backing-store seam comes next (docs/rbd.md).
//!
//! - `spec.rs` (always built, pure): `rbd:[POOL/[NAMESPACE/]]IMAGE`.
//! - `ffi.rs`: the hand-written declarations (`-lrados -lrbd`).
//! - `cluster.rs`: [`Cluster`], a connected RADOS client (configuration found as the
//!   `rbd` tool finds it, operation timeouts, blocklisting).
//! - `completion.rs`: `rbd_aio_*` completions bridged to a blocking wait or a future.
//! - `image.rs`: [`RbdImage`], one open image (size, resize, I/O, exclusive lock,
//!   takeover in `lock.rs`); `file_engine.rs`: the volume layer's `FileEngine` over it.
//!
//! Everything but `spec.rs` needs librbd and librados at link time and is built with the
//! cargo feature `rbd` (on in `scripts/test.sh`; `scripts/install-deps.sh` installs
//! `librbd-dev` and `librados-dev`).

pub mod spec;

#[cfg(feature = "rbd")]
mod cluster;
#[cfg(feature = "rbd")]
mod completion;
#[cfg(feature = "rbd")]
mod error;
#[cfg(feature = "rbd")]
mod ffi;
#[cfg(feature = "rbd")]
mod file_engine;
#[cfg(feature = "rbd")]
mod image;
#[cfg(feature = "rbd")]
mod lock;

#[cfg(feature = "rbd")]
pub use cluster::{Cluster, ClusterOptions, Timeouts};
#[cfg(feature = "rbd")]
pub use error::RbdError;
#[cfg(feature = "rbd")]
pub use image::RbdImage;
pub use spec::{ImageSpec, SpecError};
