//! The ublk frontend: a served volume as `/dev/ublkbN` through the kernel's userspace
//! block driver (`ublk_drv`, Linux 6.0+), beside the NBD server and through the same
//! [`BlockDevice`](crate::blockdev::BlockDevice).
//!
//! - `request.rs`: pure: a ublk I/O descriptor as a `BlockDevice` call, and its result.
//! - `params.rs`: pure: the block size, cache/FUA, discard and read-only parameters.
//! - `plan.rs`: pure: add a new device, or recover a quiesced one the kernel kept.
//! - `queues.rs`: pure: the record of failed queue threads, which ends the start wait
//!   with an error instead of letting it wait forever for a queue that is gone.
//! - `device.rs`: the `libublk` wiring: control device, one queue thread per CPU,
//!   start, recovery (`UBLK_F_USER_RECOVERY` with reissue) and stop.
//!
//! A killed daemon leaves its device quiesced: I/O waits in the kernel, and a new daemon
//! given the same device id takes it over and serves what waited (see docs/ublk.md).

mod device;
pub mod params;
pub mod plan;
pub mod queues;
pub mod request;

pub use device::{UblkFrontend, UblkOptions};

/// Errors of the ublk frontend.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// The driver or libublk refused an operation.
    #[error("ublk {what} failed: {detail} (is the ublk_drv module loaded? `modprobe ublk_drv`; Linux 6.0 or later)")]
    Driver { what: &'static str, detail: String },
    /// The device cannot be described to the kernel.
    #[error("cannot serve this volume over ublk: {0}")]
    BadGeometry(String),
    /// The device id asked for belongs to a live server.
    #[error("ublk device {id} is served by process {pid}: stop it first, or choose another id")]
    InUse { id: u32, pid: i32 },
    /// The device did not come up in time.
    #[error("ublk device did not start within {secs} s: {detail}")]
    StartTimeout { secs: u64, detail: String },
    /// A queue thread failed or panicked (before the start: the device does not start).
    #[error("ublk queue {queue} failed: {cause}")]
    QueueFailed { queue: u16, cause: String },
    /// The kernel kept a device whose server died, but it is not ready for recovery.
    #[error("ublk device {id} is in state {state}, not quiesced, after {secs} s: cannot recover it (remove it, or choose another id)")]
    NotRecoverable { id: u32, state: String, secs: u64 },
}

impl UblkError {
    /// A libublk error, with what was being done.
    pub(crate) fn driver(what: &'static str, e: impl std::fmt::Display) -> UblkError {
        UblkError::Driver {
            what,
            detail: e.to_string(),
        }
    }
}
