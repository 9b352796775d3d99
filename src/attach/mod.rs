//! `cryptvol attach`: a kernel nbd device configured over the kernel's nbd netlink
//! interface, with the NBD handshake done here in userspace ([`crate::nbdclient`]).
//!
//! - [`netlink`]: the messages, pure (byte-exact unit tests run on any host).
//! - [`device`]: the netlink socket (`NbdNetlink`).
//! - this module: handshake N connections, hand them over with `NBD_CMD_CONNECT`;
//!   `reconnect` (new sockets with `NBD_CMD_RECONFIGURE` after a daemon restart);
//!   `refresh_size`; `detach`; and `watch`, the resident mode that reconnects by itself.
//!
//! Watch mode listens to the nbd multicast group for `NBD_CMD_LINK_DEAD` (the kernel
//! sends one per connection it marks dead) rather than polling: it reacts at once, and
//! `NBD_CMD_STATUS` could not tell a dead connection anyway (it reports a device as
//! connected while its configuration lives, dead sockets or not). STATUS is polled every
//! few seconds only to notice that the device was detached, which ends the watch.

pub mod device;
pub mod netlink;

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::nbd::consts::{FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY};
use crate::nbdclient::{ExportDetails, NbdClient, NbdClientError, NbdUri};
pub use device::NbdNetlink;

/// Most connections one device gets.
pub const MAX_CONNECTIONS: u32 = 16;
/// Block sizes the kernel accepts (a power of two from 512 to the page size).
const MIN_KERNEL_BLOCK: u32 = 512;
const MAX_KERNEL_BLOCK: u32 = 4096;
/// Pause between reconnect attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often watch mode checks that the device is still attached.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Errors of `cryptvol attach`.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Nbd(#[from] NbdClientError),
    #[error("TLS cannot be handed to the kernel's nbd driver: the server at {server} requires TLS for export {export:?}. Attach it with nbd-client's TLS options (-certfile, -keyfile, -cacertfile), or serve it on a plaintext listener (e.g. a Unix socket) for cryptvol attach")]
    TlsOnly { server: String, export: String },
    #[error("netlink: {what}: {err}")]
    Netlink {
        what: &'static str,
        err: std::io::Error,
    },
    #[error("the kernel's nbd driver refused the request: {errno} (dmesg shows its reason)")]
    Kernel { errno: std::io::Error },
    #[error("the kernel has no nbd driver (the generic netlink family \"nbd\" is unknown): run `modprobe nbd`")]
    NoNbdModule,
    #[error(
        "the nbd netlink family has no multicast group {:?} (kernel too old for --watch)",
        netlink::NBD_MCAST_GROUP
    )]
    NoMulticastGroup,
    #[error("the kernel did not say which nbd device it configured")]
    NoIndex,
    #[error("{0}")]
    Parse(netlink::ParseError),
    #[error("{0:?} is not an nbd device: give /dev/nbdN (or nbdN)")]
    BadDevice(String),
    #[error("{0}")]
    Usage(String),
    #[error("the connections disagree about the export (size or flags changed between them): {first:?} vs {other:?}")]
    Inconsistent {
        first: ExportDetails,
        other: ExportDetails,
    },
    #[error("/dev/nbd{index}: no new connection within the dead-connection timeout ({secs} s); the kernel now fails its I/O: {last}")]
    ReconnectTimedOut { index: u32, secs: u64, last: String },
}

/// Parses `/dev/nbdN` or `nbdN` to N.
pub fn device_index(dev: &str) -> Result<u32, AttachError> {
    let name = dev.strip_prefix("/dev/").unwrap_or(dev);
    name.strip_prefix("nbd")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| AttachError::BadDevice(dev.to_string()))
}

/// The block size the kernel gets: the export's preferred size, within what the kernel
/// accepts and at least the export's minimum; 512 when the export sends none.
pub fn kernel_block_size(block_size: Option<(u32, u32, u32)>) -> Result<u32, AttachError> {
    let Some((min, pref, _)) = block_size else {
        return Ok(MIN_KERNEL_BLOCK);
    };
    if min > MAX_KERNEL_BLOCK {
        return Err(AttachError::Usage(format!(
            "the export's minimum block size {min} is larger than the kernel's limit {MAX_KERNEL_BLOCK}"
        )));
    }
    Ok(pref.clamp(MIN_KERNEL_BLOCK, MAX_KERNEL_BLOCK).max(min))
}

/// How to reach the export and what the device gets.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub uri: NbdUri,
    pub connections: u32,
    /// Request timeout in seconds (0: the kernel's default).
    pub timeout: u64,
    pub dead_conn_timeout: u64,
    /// Make the device read-only even when the export is writable.
    pub read_only: bool,
    /// A logical block size instead of the export's preferred one.
    pub block_size: Option<u32>,
}

/// Opens `n` connections to the export, each through the whole handshake; returns what
/// the export said and the sockets, ready for the kernel.
pub fn open_connections(
    uri: &NbdUri,
    n: u32,
) -> Result<(ExportDetails, Vec<OwnedFd>), AttachError> {
    let mut details: Option<ExportDetails> = None;
    let mut fds = Vec::new();
    for _ in 0..n {
        let c = NbdClient::connect(uri).map_err(|e| match e {
            NbdClientError::TlsRequired { server, export } => {
                AttachError::TlsOnly { server, export }
            }
            e => AttachError::Nbd(e),
        })?;
        let d = c.details();
        match details {
            None => details = Some(d),
            Some(first) if first.size != d.size || first.flags != d.flags => {
                return Err(AttachError::Inconsistent { first, other: d })
            }
            Some(_) => {}
        }
        fds.push(c.into_socket()?);
    }
    let details = details.ok_or_else(|| AttachError::Usage("--connections must be ≥ 1".into()))?;
    Ok((details, fds))
}

fn raw_fds(fds: &[OwnedFd]) -> Vec<u32> {
    fds.iter().map(|f| f.as_raw_fd() as u32).collect()
}

/// What [`attach`] configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub index: u32,
    pub details: ExportDetails,
    pub block_size: u32,
}

/// Handshakes, then `NBD_CMD_CONNECT` on `index` (or the first free device).
pub fn attach(opts: &AttachOptions, index: Option<u32>) -> Result<Attached, AttachError> {
    check_connections(opts.connections)?;
    let (details, fds) = open_connections(&opts.uri, opts.connections)?;
    if opts.connections > 1 && details.flags & FLAG_CAN_MULTI_CONN == 0 {
        return Err(AttachError::Usage(format!(
            "the export does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN): use --connections 1 (flags {:#x})",
            details.flags
        )));
    }
    let block_size = match opts.block_size {
        Some(b) => check_block_size(b, details.block_size)?,
        None => kernel_block_size(details.block_size)?,
    };
    let read_only = if opts.read_only { FLAG_READ_ONLY } else { 0 };
    let mut nl = NbdNetlink::open()?;
    let index = nl.connect(netlink::ConnectConfig {
        index,
        size_bytes: details.size,
        block_size: u64::from(block_size),
        timeout: opts.timeout,
        dead_conn_timeout: opts.dead_conn_timeout,
        server_flags: u64::from(details.flags | read_only),
        client_flags: 0,
        fds: raw_fds(&fds),
    })?;
    // The kernel holds its own references to the sockets; ours close here.
    drop(fds);
    Ok(Attached {
        index,
        details,
        block_size,
    })
}

/// A block size given by the user: one the kernel accepts and the export allows.
fn check_block_size(b: u32, export: Option<(u32, u32, u32)>) -> Result<u32, AttachError> {
    if !b.is_power_of_two() || !(MIN_KERNEL_BLOCK..=MAX_KERNEL_BLOCK).contains(&b) {
        return Err(AttachError::Usage(format!(
            "--block-size {b}: give 512, 1024, 2048 or 4096"
        )));
    }
    match export {
        Some((min, _, _)) if b < min => Err(AttachError::Usage(format!(
            "--block-size {b} is smaller than the export's minimum block size {min}"
        ))),
        _ => Ok(b),
    }
}

fn check_connections(n: u32) -> Result<(), AttachError> {
    if n == 0 || n > MAX_CONNECTIONS {
        return Err(AttachError::Usage(format!(
            "--connections {n}: give 1 to {MAX_CONNECTIONS}"
        )));
    }
    Ok(())
}

/// `NBD_CMD_DISCONNECT` of device `index`.
pub fn detach(index: u32) -> Result<(), AttachError> {
    NbdNetlink::open()?.disconnect(index)
}

/// New connections to the export handed to device `index` (`NBD_CMD_RECONFIGURE`): the
/// kernel puts each in the place of a dead one and ignores the rest.
pub fn reconnect(opts: &AttachOptions, index: u32) -> Result<ExportDetails, AttachError> {
    check_connections(opts.connections)?;
    let (details, fds) = open_connections(&opts.uri, opts.connections)?;
    NbdNetlink::open()?.reconfigure(&netlink::Reconfigure {
        index,
        fds: raw_fds(&fds),
        size_bytes: None,
    })?;
    Ok(details)
}

/// Asks the export for its current size and gives it to device `index`.
pub fn refresh_size(uri: &NbdUri, index: u32) -> Result<u64, AttachError> {
    let c = NbdClient::connect(uri).map_err(|e| match e {
        NbdClientError::TlsRequired { server, export } => AttachError::TlsOnly { server, export },
        e => AttachError::Nbd(e),
    })?;
    let size = c.size();
    c.disconnect();
    NbdNetlink::open()?.reconfigure(&netlink::Reconfigure {
        index,
        fds: Vec::new(),
        size_bytes: Some(size),
    })?;
    Ok(size)
}

/// Stays with device `index`: on every `NBD_CMD_LINK_DEAD` for it, reconnects (retrying
/// until the dead-connection timeout); returns when the device is detached or `stop`
/// says so. `on_event` hears what happened (for logs).
pub fn watch(
    opts: &AttachOptions,
    index: u32,
    stop: &dyn Fn() -> bool,
    on_event: &dyn Fn(WatchEvent),
) -> Result<(), AttachError> {
    let mut events = NbdNetlink::open()?;
    events.join_link_events()?;
    let mut control = NbdNetlink::open()?;
    let mut last_status = Instant::now();
    while !stop() {
        let dead = events.link_dead_events(Duration::from_secs(1))?;
        if dead.contains(&index) {
            let t0 = Instant::now();
            on_event(WatchEvent::LinkDead);
            reconnect_until_deadline(opts, index, stop, on_event)?;
            on_event(WatchEvent::Reconnected(t0.elapsed()));
        }
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = Instant::now();
            if !control.connected(index)? {
                on_event(WatchEvent::Detached);
                return Ok(());
            }
        }
    }
    Ok(())
}

/// What [`watch`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    LinkDead,
    RetryFailed(String),
    Reconnected(Duration),
    Detached,
}

fn reconnect_until_deadline(
    opts: &AttachOptions,
    index: u32,
    stop: &dyn Fn() -> bool,
    on_event: &dyn Fn(WatchEvent),
) -> Result<(), AttachError> {
    let deadline = Instant::now() + Duration::from_secs(opts.dead_conn_timeout.max(1));
    loop {
        match reconnect(opts, index) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline || stop() => {
                return Err(AttachError::ReconnectTimedOut {
                    index,
                    secs: opts.dead_conn_timeout,
                    last: e.to_string(),
                })
            }
            Err(e) => on_event(WatchEvent::RetryFailed(e.to_string())),
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// Whether the export is read-only (shown to the user).
pub fn read_only(d: &ExportDetails) -> bool {
    d.flags & FLAG_READ_ONLY != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_index("/dev/nbd3").unwrap(), 3);
        assert_eq!(device_index("nbd12").unwrap(), 12);
        for bad in ["/dev/sda", "/dev/nbd", "nbd1p1", "/dev/nbd-1", ""] {
            assert!(
                matches!(device_index(bad), Err(AttachError::BadDevice(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn block_size_is_the_preferred_one_within_kernel_limits() {
        assert_eq!(kernel_block_size(Some((1, 4096, 1 << 25))).unwrap(), 4096);
        assert_eq!(kernel_block_size(Some((512, 512, 1 << 25))).unwrap(), 512);
        assert_eq!(kernel_block_size(Some((1, 65536, 1 << 25))).unwrap(), 4096);
        assert_eq!(kernel_block_size(Some((1, 1, 1 << 25))).unwrap(), 512);
        assert_eq!(kernel_block_size(None).unwrap(), 512);
        assert!(kernel_block_size(Some((8192, 8192, 1 << 25))).is_err());
    }

    #[test]
    fn user_block_sizes() {
        assert_eq!(
            check_block_size(4096, Some((512, 4096, 1 << 25))).unwrap(),
            4096
        );
        assert_eq!(check_block_size(512, None).unwrap(), 512);
        assert!(check_block_size(512, Some((4096, 4096, 1 << 25))).is_err());
        assert!(check_block_size(1000, None).is_err());
        assert!(check_block_size(8192, None).is_err());
    }

    #[test]
    fn connection_counts_are_bounded() {
        assert!(check_connections(0).is_err());
        assert!(check_connections(MAX_CONNECTIONS + 1).is_err());
        assert!(check_connections(2).is_ok());
    }
}
