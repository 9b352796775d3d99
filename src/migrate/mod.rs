//! Migration in and out: `cryptvol import` turns an unencrypted disk (raw image file, block
//! device, or NBD export such as a qcow2 image served by `qemu-nbd`) into a new encrypted
//! volume; `cryptvol export` decrypts a volume to a raw file, a block device or an NBD export.
//!
//! - [`source`]: reading the unencrypted source (files with `SEEK_DATA`/`SEEK_HOLE`, block
//!   devices, NBD via [`crate::nbdclient`]) and its identity, for resume checks.
//! - [`journal`]: the import's resume journal (`.FILE.import`, JSON lines, locked).
//! - [`import`]: the import's design, its start, resume checks and the final rename;
//!   `copy.rs` the copy loop with checkpoints and the read-back verification.
//! - [`export`]: the decrypting copy out.
//!
//! Both directions are sparse: 64 KiB runs of zeros are not written (an import leaves them
//! unallocated in the volume; an export leaves holes in a raw file), and both print SHA-256
//! checksums of the plaintext.

mod copy;
pub mod export;
pub mod import;
pub mod journal;
pub mod source;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use export::{export, ExportReport, ExportRequest};
pub use import::{import, ImportReport, ImportRequest, ResumeMode};

use crate::nbdclient::NbdClientError;
use crate::ops::OpsError;
use crate::volume::VolumeError;

/// Granularity of zero detection: runs of this many zero bytes (aligned) are not written.
pub const ZERO_UNIT: usize = 64 << 10;
/// Bytes read and written per step.
pub const BLOCK: usize = 4 << 20;

/// Errors of import and export.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Nbd(#[from] NbdClientError),
    #[error("cannot open {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("I/O error on {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{0}")]
    BadSource(String),
    #[error("{path} already exists; refusing to overwrite it{hint}")]
    TargetExists { path: String, hint: String },
    #[error("another cryptvol import into {0} is running (its journal is locked)")]
    Busy(String),
    #[error("cannot resume the import into {target}: {reason}")]
    CannotResume { target: String, reason: String },
    #[error("the import journal {path} is damaged ({detail}); remove it and the partial volume next to it, or re-run with --restart")]
    BadJournal { path: String, detail: String },
    #[error("interrupted after {done} of {total} bytes; the progress is saved: run the same command again to resume")]
    Interrupted { done: u64, total: u64 },
    #[error(
        "the source changed during the import ({0}); re-run with --restart to import it again"
    )]
    SourceChanged(String),
    #[error("checksum mismatch: the source's SHA-256 is {source_sha256} but the volume reads back as {volume_sha256}; the unfinished volume is kept as {partial} for inspection (remove it and the journal, or re-run with --restart)")]
    ChecksumMismatch {
        source_sha256: String,
        volume_sha256: String,
        partial: String,
    },
    #[error("{0}")]
    BadDestination(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl MigrateError {
    pub(crate) fn io(path: &Path, err: std::io::Error) -> MigrateError {
        MigrateError::Io {
            path: path.display().to_string(),
            err,
        }
    }
}

/// A flag set from a signal handler (SIGINT/SIGTERM): long loops stop at the next step,
/// after saving their progress.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }
    /// Asks the running operation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Whether every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    // 16-byte words: the compiler vectorises this well.
    let (words, tail) = b.as_chunks::<16>();
    words.iter().all(|w| u128::from_ne_bytes(*w) == 0) && tail.iter().all(|&x| x == 0)
}

/// Feeds `len` zero bytes to `hasher`.
pub fn hash_zeros(hasher: &mut Sha256, mut len: u64) {
    static ZEROS: [u8; ZERO_UNIT] = [0u8; ZERO_UNIT];
    while len > 0 {
        let n = len.min(ZERO_UNIT as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// The final digest as hex.
pub fn finish_hex(hasher: Sha256) -> String {
    hex::encode(hasher.finalize())
}

/// Test-only slow-down of copy loops: `CRYPTVOL_TEST_IMPORT_DELAY_MS=N` sleeps N ms per
/// block, only when `CRYPTVOL_FAULT_INJECTION=1` (as [`crate::volume::crash_point`]), so
/// that tests can interrupt an import part-way.
pub(crate) fn test_delay() -> Option<Duration> {
    fault_injection()
        .then(|| std::env::var("CRYPTVOL_TEST_IMPORT_DELAY_MS").ok())
        .flatten()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// Test-only: `CRYPTVOL_TEST_IMPORT_WRITE_ZEROS=1` (with `CRYPTVOL_FAULT_INJECTION=1`)
/// makes an import write zero regions too instead of leaving them unallocated.
pub(crate) fn test_write_zeros() -> bool {
    fault_injection()
        && std::env::var_os("CRYPTVOL_TEST_IMPORT_WRITE_ZEROS").is_some_and(|v| v == "1")
}

fn fault_injection() -> bool {
    std::env::var_os("CRYPTVOL_FAULT_INJECTION").is_some_and(|v| v == "1")
}

/// `x` rounded up to a multiple of `unit` (> 0); `None` on overflow.
pub fn round_up(x: u64, unit: u64) -> Option<u64> {
    x.checked_next_multiple_of(unit)
}

/// Calls `f` on each maximal run of 64 KiB units of `buf` that are all zero (`zero ==
/// true`) or not, with the run's byte range within `buf`.
pub fn zero_runs(buf: &[u8], mut f: impl FnMut(std::ops::Range<usize>, bool)) {
    let mut start = 0;
    let mut current: Option<bool> = None;
    for (i, unit) in buf.chunks(ZERO_UNIT).enumerate() {
        let z = is_zero(unit);
        let at = i * ZERO_UNIT;
        match current {
            Some(c) if c == z => {}
            Some(c) => {
                f(start..at, c);
                start = at;
                current = Some(z);
            }
            None => current = Some(z),
        }
    }
    if let Some(c) = current {
        f(start..buf.len(), c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 100]));
        let mut v = vec![0u8; 100];
        v[99] = 1;
        assert!(!is_zero(&v));
        v[99] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn runs_split_at_64k_units() {
        let mut buf = vec![0u8; 5 * ZERO_UNIT + 10];
        buf[ZERO_UNIT + 5] = 1; // unit 1
        buf[2 * ZERO_UNIT] = 1; // unit 2
        buf[5 * ZERO_UNIT + 9] = 1; // the short tail unit
        let mut runs = Vec::new();
        zero_runs(&buf, |r, z| runs.push((r, z)));
        assert_eq!(
            runs,
            vec![
                (0..ZERO_UNIT, true),
                (ZERO_UNIT..3 * ZERO_UNIT, false),
                (3 * ZERO_UNIT..5 * ZERO_UNIT, true),
                (5 * ZERO_UNIT..5 * ZERO_UNIT + 10, false),
            ]
        );
        let mut none = Vec::new();
        zero_runs(&[], |r, z| none.push((r, z)));
        assert!(none.is_empty());
    }

    #[test]
    fn hex_round_trip_and_zero_hashing() {
        // The journal's hash state is written with `hex::encode` and read with `hex::decode`.
        assert_eq!(hex::encode([0, 0xab, 0x10]), "00ab10");
        assert_eq!(hex::decode("00ab10").ok(), Some(vec![0, 0xab, 0x10]));
        assert_eq!(hex::decode("00AB10").ok(), Some(vec![0, 0xab, 0x10]));
        assert_eq!(hex::decode("0").ok(), None);
        assert_eq!(hex::decode("zz").ok(), None);
        let mut a = Sha256::new();
        hash_zeros(&mut a, 200_000);
        let mut b = Sha256::new();
        b.update(vec![0u8; 200_000]);
        assert_eq!(finish_hex(a), finish_hex(b));
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(0, 4096), Some(0));
        assert_eq!(round_up(1, 4096), Some(4096));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(u64::MAX, 4096), None);
    }
}
