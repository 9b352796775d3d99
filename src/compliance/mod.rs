//! `cryptvol check`: a compliance scanner for a fleet of volume files, in the spirit of
//! the AWS Config rules for EBS encryption. It reads headers and key metadata only: it
//! never needs a data key or a passphrase, never unwraps, never writes, and works on
//! volumes that are being served (the header is read under a shared `flock`, which the
//! server does not hold; header writers hold it exclusively only while they write).
//!
//! - [`detect`]: what a file that is not a volume holds (image, partition table,
//!   filesystem signatures). Pure.
//! - [`rules`]: the rules: facts + policy → verdict and findings. Pure.
//! - [`scan`]: the I/O: directory walk, header reads, content probes, key lookups.
//!
//! Finding codes and the exit status are documented in `docs/compliance.md`.

pub mod detect;
pub mod rules;
pub mod scan;

pub use detect::DataKind;
pub use rules::{
    evaluate, reencrypt_in_progress, Code, Finding, KeyIdentity, Policy, Severity, Verdict,
    DEFAULT_ROTATION_DAYS, REENCRYPT_FEATURE,
};
pub use scan::{CheckOptions, Scanner};

use crate::keys::KeyError;

/// Exit status: every item compliant (skipped items do not count).
pub const EXIT_COMPLIANT: u8 = 0;
/// Exit status: at least one item is non-compliant, and everything was checked.
pub const EXIT_NON_COMPLIANT: u8 = 1;
/// Exit status: usage error, or the scan could not check everything (an unreadable
/// item, a key that could not be looked up). Takes precedence over 1.
pub const EXIT_ERROR: u8 = 2;

/// Errors that stop a scan before it starts (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ComplianceError {
    #[error("cannot resolve --require-key {key}")]
    RequiredKey {
        key: String,
        #[source]
        source: KeyError,
    },
    #[error("cannot resolve the default key {key} (needed by --no-default-key and --require-key)")]
    DefaultKey {
        key: String,
        #[source]
        source: KeyError,
    },
}

/// Header copy health as shown in a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderReport {
    pub primary: String,
    pub secondary: String,
}

/// One keyslot in a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotReport {
    pub slot: usize,
    pub backend: String,
    /// Empty for passphrase keyslots.
    pub key_id: String,
    /// `Enabled`, `Disabled`, `PendingDeletion`, `Missing`, `Unsupported`, `Unknown`;
    /// `None` for passphrase keyslots.
    pub key_state: Option<String>,
}

/// The result for one scanned item: one JSON object per line with `--json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ItemReport {
    pub path: String,
    pub verdict: Verdict,
    /// `cryptvol`, a [`DataKind::name`], `unreadable`, or what was skipped (`socket`,
    /// `fifo`, `character device`, `keystore`, `directory`).
    pub content: String,
    pub volume_uuid: Option<String>,
    pub header: Option<HeaderReport>,
    pub keyslots: Vec<SlotReport>,
    /// Why the item is not compliant (or could not be checked).
    pub reasons: Vec<Finding>,
    /// Informational findings that do not change the verdict.
    pub notes: Vec<Finding>,
}

/// Counts over a scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub compliant: u64,
    pub non_compliant: u64,
    pub errors: u64,
    pub skipped: u64,
    /// Items judged NON_COMPLIANT that also had a check fail (e.g. a key lookup).
    pub incomplete: u64,
}

impl Summary {
    /// The process exit status for this scan: 2 if anything could not be checked, else
    /// 1 if anything is non-compliant, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.errors > 0 || self.incomplete > 0 {
            EXIT_ERROR
        } else if self.non_compliant > 0 {
            EXIT_NON_COMPLIANT
        } else {
            EXIT_COMPLIANT
        }
    }

    pub fn total(&self) -> u64 {
        self.compliant + self.non_compliant + self.errors + self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let mut s = Summary::default();
        assert_eq!(s.exit_code(), 0);
        s.compliant = 3;
        s.skipped = 2;
        assert_eq!(s.exit_code(), 0);
        s.non_compliant = 1;
        assert_eq!(s.exit_code(), 1);
        s.incomplete = 1;
        assert_eq!(s.exit_code(), 2);
        s.incomplete = 0;
        s.errors = 1;
        assert_eq!(s.exit_code(), 2);
        assert_eq!(s.total(), 7);
    }
}
