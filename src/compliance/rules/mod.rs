//! Pure rule evaluation: facts about one scanned item (gathered by `scan.rs`) and the
//! policy chosen on the command line go in; a verdict and findings come out. No I/O,
//! no clock: the caller passes the current time.
//!
//! - `verdict`: the verdict, the stable finding codes and their severity.
//! - `facts`: what the scanner found out about an item.
//! - `policy`: what the operator asks for, and how keys are named.
//! - `header`: integrity rules (header copies, geometry, allocation map, truncation,
//!   unfinished re-encryption).
//! - `keys`: key rules (passphrase-only, master key states, required and default keys).
//! - `rotation`: the rotation rule.
//! - `timestamp`: the keystore's UTC timestamps.

mod facts;
mod header;
mod keys;
mod policy;
mod rotation;
mod timestamp;
mod verdict;

pub use facts::{HeaderProblem, KeyFacts, RotationFacts, SlotFacts, Subject, VolumeFacts};
pub use header::{reencrypt_in_progress, REENCRYPT_FEATURE};
pub use policy::{KeyIdentity, Policy, DEFAULT_ROTATION_DAYS};
pub use timestamp::parse_rfc3339_utc;
pub use verdict::{Code, Finding, Severity, Verdict};

/// The verdict on an item and the findings behind it (notes included).
pub fn evaluate(subject: &Subject, policy: &Policy, now_unix: u64) -> (Verdict, Vec<Finding>) {
    let findings = match subject {
        Subject::Skipped(why) => {
            return (
                Verdict::Skipped,
                vec![Finding::new(Code::NotChecked, why.clone())],
            )
        }
        Subject::Unreadable(why) => vec![Finding::new(Code::ScanError, why.clone())],
        Subject::Foreign(kind) => vec![Finding::new(
            Code::NotAVolume,
            format!("not a cryptvol volume: {}", kind.describe()),
        )],
        Subject::BrokenVolume(p) => header::broken_volume(p),
        Subject::Volume(v) => volume_findings(v, policy, now_unix),
    };
    (verdict_of(&findings), findings)
}

/// NON_COMPLIANT if any finding is, else ERROR if any is an error, else COMPLIANT.
pub fn verdict_of(findings: &[Finding]) -> Verdict {
    let has = |s| findings.iter().any(|f| f.code.severity() == s);
    if has(Severity::NonCompliant) {
        Verdict::NonCompliant
    } else if has(Severity::Error) {
        Verdict::Error
    } else {
        Verdict::Compliant
    }
}

/// The findings on a volume with a usable header: integrity first, then keys.
fn volume_findings(v: &VolumeFacts, policy: &Policy, now: u64) -> Vec<Finding> {
    let mut out = Vec::new();
    header::integrity_findings(v, &mut out);
    keys::key_findings(v, policy, now, &mut out);
    out
}

#[cfg(test)]
mod tests;
