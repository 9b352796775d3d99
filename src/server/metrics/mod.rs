//! Prometheus metrics of the daemon (`serve --metrics ADDR`).
//!
//! Counting is split from exposition. Each export owns an [`ExportMetrics`]: fixed arrays
//! of atomics (requests, bytes and a latency histogram per NBD command, errors per NBD
//! error value, connections, snapshot progress) that the request path updates with
//! relaxed atomic additions — no lock, no allocation per request. Key backends count in
//! [`crate::keys::stats`]. At scrape time, [`collect::ServerCollector`] reads all of it,
//! plus what the volumes report themselves (size, allocated bytes, re-encryption
//! watermark), and `prometheus-client` encodes it as Prometheus text; [`http`] serves it.

mod collect;
mod http;
#[cfg(test)]
mod tests;

pub(crate) use collect::registry;
pub(crate) use http::serve_metrics;
pub use http::{MetricsError, MetricsListener};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::latency::LatencyHistogram;
use crate::nbd::{NbdErrno, ValidRequest};

/// The NBD commands counted, each with its own requests, bytes and latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Cache,
}

impl Command {
    /// Every command, in the order of [`ExportMetrics`]'s arrays.
    pub const ALL: [Command; 7] = [
        Command::Read,
        Command::Write,
        Command::Flush,
        Command::Trim,
        Command::WriteZeroes,
        Command::BlockStatus,
        Command::Cache,
    ];

    /// The `command` label.
    pub fn label(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Cache => "cache",
        }
    }

    /// The command of a request and the bytes it covers (its length; 0 for FLUSH).
    /// `None` for DISC, which is not a request on the device.
    pub fn of(req: &ValidRequest) -> Option<(Command, u64)> {
        let counted = match *req {
            ValidRequest::Read { len, .. } => (Command::Read, len),
            ValidRequest::Write { len, .. } => (Command::Write, len),
            ValidRequest::Flush => (Command::Flush, 0),
            ValidRequest::Trim { len, .. } => (Command::Trim, len),
            ValidRequest::WriteZeroes { len, .. } => (Command::WriteZeroes, len),
            ValidRequest::BlockStatus { len, .. } => (Command::BlockStatus, len),
            ValidRequest::Cache { len, .. } => (Command::Cache, len),
            ValidRequest::Disc => return None,
        };
        Some((counted.0, u64::from(counted.1)))
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The `errno` label of an NBD error value.
pub fn errno_label(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::Perm => "EPERM",
        NbdErrno::Io => "EIO",
        NbdErrno::NoMem => "ENOMEM",
        NbdErrno::Inval => "EINVAL",
        NbdErrno::NoSpc => "ENOSPC",
        NbdErrno::Overflow => "EOVERFLOW",
        NbdErrno::NotSup => "ENOTSUP",
        NbdErrno::Shutdown => "ESHUTDOWN",
    }
}

/// One command's counters.
#[derive(Debug, Default)]
struct CommandStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    latency: LatencyHistogram,
}

/// The counters of one export. Cheap to update from any thread: atomics only.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    commands: [CommandStats; Command::ALL.len()],
    errors: [AtomicU64; NbdErrno::ALL.len()],
    connections_total: AtomicU64,
    snapshot_done: AtomicU64,
    snapshot_total: AtomicU64,
    snapshot_running: AtomicU64,
}

/// What one command's counters held at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSnapshot {
    pub command: Command,
    pub requests: u64,
    pub bytes: u64,
    pub latency: crate::latency::HistogramSnapshot,
}

impl ExportMetrics {
    /// Counts one request of `command` over `bytes`, as it starts (so a client that has
    /// its reply always finds it counted).
    pub fn started(&self, command: Command, bytes: u64) {
        let s = &self.commands[command.index()];
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records the time one request of `command` took, up to its reply sent.
    pub fn finished(&self, command: Command, elapsed: Duration) {
        self.commands[command.index()].latency.observe(elapsed);
    }

    /// Counts one request answered with `errno` (failed on the device, or refused).
    pub fn error(&self, errno: NbdErrno) {
        if let Some(i) = NbdErrno::ALL.iter().position(|e| *e == errno) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection that entered transmission.
    pub fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of the export has covered `done` of `total` bytes.
    pub fn snapshot_progress(&self, done: u64, total: u64) {
        self.snapshot_total.store(total, Ordering::Relaxed);
        self.snapshot_done.store(done, Ordering::Relaxed);
    }

    /// A snapshot of the export started (`true`) or ended (`false`).
    pub fn snapshot_running(&self, running: bool) {
        self.snapshot_running
            .store(u64::from(running), Ordering::Relaxed);
    }

    /// Every command's counters now.
    pub fn commands(&self) -> Vec<CommandSnapshot> {
        Command::ALL
            .iter()
            .map(|&command| {
                let s = &self.commands[command.index()];
                CommandSnapshot {
                    command,
                    requests: s.requests.load(Ordering::Relaxed),
                    bytes: s.bytes.load(Ordering::Relaxed),
                    latency: s.latency.snapshot(),
                }
            })
            .collect()
    }

    /// Requests answered with each error value now.
    pub fn errors(&self) -> Vec<(NbdErrno, u64)> {
        NbdErrno::ALL
            .iter()
            .zip(self.errors.iter())
            .map(|(e, n)| (*e, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Connections that entered transmission since the daemon started.
    pub fn connections_total(&self) -> u64 {
        self.connections_total.load(Ordering::Relaxed)
    }

    /// (running, done, total) of the export's current or last snapshot.
    pub fn snapshot_state(&self) -> (bool, u64, u64) {
        (
            self.snapshot_running.load(Ordering::Relaxed) != 0,
            self.snapshot_done.load(Ordering::Relaxed),
            self.snapshot_total.load(Ordering::Relaxed),
        )
    }
}
