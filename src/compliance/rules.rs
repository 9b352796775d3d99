//! Pure rule evaluation: facts about one scanned item (gathered by `scan.rs`) and the
//! policy chosen on the command line go in; a verdict and findings come out. No I/O,
//! no clock: the caller passes the current time.

use super::detect::DataKind;
use crate::keys::{KeyState, AWS_KMS, PASSPHRASE};
use crate::volume::{CopyStatus, HeaderHealth};

/// The required feature the online re-encryption marks an in-progress re-encryption
/// with (set when it starts, cleared when it finishes).
pub const REENCRYPT_FEATURE: &str = "reencrypt";

/// Rotation period used by `--require-rotation` when `--max-key-age` is not given
/// (AWS KMS's default automatic rotation period).
pub const DEFAULT_ROTATION_DAYS: u32 = 365;

const SECS_PER_DAY: u64 = 86_400;

/// Whether a header's required features say a re-encryption was started and has not
/// finished (an interrupted or still running re-encryption).
pub fn reencrypt_in_progress<S: AsRef<str>>(required_features: &[S]) -> bool {
    required_features
        .iter()
        .any(|f| f.as_ref() == REENCRYPT_FEATURE)
}

/// The verdict on one scanned item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// A cryptvol volume with no finding.
    Compliant,
    /// At least one finding.
    NonCompliant,
    /// The item could not be checked completely (and nothing non-compliant was found).
    Error,
    /// Not a file that can hold a volume (socket, FIFO, character device, the keystore
    /// directory): listed, never checked.
    Skipped,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Compliant => "COMPLIANT",
            Verdict::NonCompliant => "NON_COMPLIANT",
            Verdict::Error => "ERROR",
            Verdict::Skipped => "SKIPPED",
        }
    }
}

/// Stable finding codes (documented in docs/compliance.md; never renamed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    NotAVolume,
    HeaderBothCopiesDamaged,
    HeaderCopyDamaged,
    HeaderCopyStale,
    /// The header's geometry cannot be right for the file (damaged or forged).
    HeaderInvalid,
    AllocationMapDamaged,
    VolumeTruncated,
    UnsupportedVersion,
    UnsupportedFeature,
    ReencryptionInterrupted,
    PassphraseOnly,
    KeyDisabled,
    KeyPendingDeletion,
    KeyMissing,
    KeyBackendUnsupported,
    KeyNotRequired,
    DefaultKey,
    KeyRotationOff,
    KeyRotationOverdue,
    /// Informational: a rotation rule does not apply to this backend's keys.
    KeyRotationNotChecked,
    /// The key could not be looked up (keystore unreadable, backend unreachable).
    KeyLookupFailed,
    /// The item could not be read.
    ScanError,
    /// Informational: the item is not a file that can hold a volume.
    NotChecked,
}

impl Code {
    /// Every code, in documentation order.
    pub const ALL: [Code; 23] = [
        Code::NotAVolume,
        Code::HeaderBothCopiesDamaged,
        Code::HeaderCopyDamaged,
        Code::HeaderCopyStale,
        Code::HeaderInvalid,
        Code::AllocationMapDamaged,
        Code::VolumeTruncated,
        Code::UnsupportedVersion,
        Code::UnsupportedFeature,
        Code::ReencryptionInterrupted,
        Code::PassphraseOnly,
        Code::KeyDisabled,
        Code::KeyPendingDeletion,
        Code::KeyMissing,
        Code::KeyBackendUnsupported,
        Code::KeyNotRequired,
        Code::DefaultKey,
        Code::KeyRotationOff,
        Code::KeyRotationOverdue,
        Code::KeyRotationNotChecked,
        Code::KeyLookupFailed,
        Code::ScanError,
        Code::NotChecked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::NotAVolume => "NOT_A_VOLUME",
            Code::HeaderBothCopiesDamaged => "HEADER_BOTH_COPIES_DAMAGED",
            Code::HeaderCopyDamaged => "HEADER_COPY_DAMAGED",
            Code::HeaderCopyStale => "HEADER_COPY_STALE",
            Code::HeaderInvalid => "HEADER_INVALID",
            Code::AllocationMapDamaged => "ALLOCATION_MAP_DAMAGED",
            Code::VolumeTruncated => "VOLUME_TRUNCATED",
            Code::UnsupportedVersion => "UNSUPPORTED_VERSION",
            Code::UnsupportedFeature => "UNSUPPORTED_FEATURE",
            Code::ReencryptionInterrupted => "REENCRYPTION_INTERRUPTED",
            Code::PassphraseOnly => "PASSPHRASE_ONLY",
            Code::KeyDisabled => "KEY_DISABLED",
            Code::KeyPendingDeletion => "KEY_PENDING_DELETION",
            Code::KeyMissing => "KEY_MISSING",
            Code::KeyBackendUnsupported => "KEY_BACKEND_UNSUPPORTED",
            Code::KeyNotRequired => "KEY_NOT_REQUIRED",
            Code::DefaultKey => "DEFAULT_KEY",
            Code::KeyRotationOff => "KEY_ROTATION_OFF",
            Code::KeyRotationOverdue => "KEY_ROTATION_OVERDUE",
            Code::KeyRotationNotChecked => "KEY_ROTATION_NOT_CHECKED",
            Code::KeyLookupFailed => "KEY_LOOKUP_FAILED",
            Code::ScanError => "SCAN_ERROR",
            Code::NotChecked => "NOT_CHECKED",
        }
    }

    /// How a finding with this code counts.
    pub fn severity(self) -> Severity {
        match self {
            Code::KeyLookupFailed | Code::ScanError => Severity::Error,
            Code::KeyRotationNotChecked | Code::NotChecked => Severity::Note,
            _ => Severity::NonCompliant,
        }
    }
}

/// How a finding counts towards the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Makes the item NON_COMPLIANT.
    NonCompliant,
    /// The check could not be completed: ERROR unless something is NON_COMPLIANT.
    Error,
    /// Shown, never changes the verdict.
    Note,
}

/// One reason for a verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub code: Code,
    pub message: String,
    /// The keyslot the finding is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyslot: Option<usize>,
}

impl Finding {
    fn new(code: Code, message: impl Into<String>) -> Finding {
        Finding {
            code,
            message: message.into(),
            keyslot: None,
        }
    }
    fn slot(code: Code, slot: usize, message: impl Into<String>) -> Finding {
        Finding {
            code,
            message: message.into(),
            keyslot: Some(slot),
        }
    }
}

/// A key named on the command line or configured as a default, resolved to the form
/// keyslots store (`backend`, `key_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    pub backend: String,
    pub key_id: String,
    /// How to show it (what the user typed, or the alias).
    pub label: String,
}

impl KeyIdentity {
    /// Whether a keyslot's (`backend`, `key_id`) names this key. AWS KMS keys match by
    /// ARN, or by key id when one side is a bare key id.
    pub fn matches(&self, backend: &str, key_id: &str) -> bool {
        if self.backend != backend {
            return false;
        }
        if self.key_id == key_id {
            return true;
        }
        backend == AWS_KMS
            && (!self.key_id.starts_with("arn:") || !key_id.starts_with("arn:"))
            && kms_key_id(&self.key_id) == kms_key_id(key_id)
    }
}

/// The key id part of an AWS KMS key ARN (`arn:aws:kms:R:A:key/ID` → `ID`); a bare id
/// is returned as is.
fn kms_key_id(s: &str) -> &str {
    match s.strip_prefix("arn:") {
        Some(rest) => rest.rsplit_once(":key/").map(|(_, id)| id).unwrap_or(s),
        None => s,
    }
}

/// What the operator asks for.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `--require-key` (each may be given several times): every non-passphrase keyslot
    /// must use one of them, and at least one keyslot must.
    pub required_keys: Vec<KeyIdentity>,
    /// `--no-default-key`: no keyslot may use a default key.
    pub forbid_default_key: bool,
    /// The default keys (the configured default and the local default key): resolved
    /// only when `required_keys` is non-empty or `forbid_default_key` is set.
    pub default_keys: Vec<KeyIdentity>,
    /// `--max-key-age DAYS`: the newest material of each master key must be younger.
    pub max_key_age_days: Option<u32>,
    /// `--require-rotation`: each master key must have been rotated within the rotation
    /// period (`max_key_age_days`, else [`DEFAULT_ROTATION_DAYS`]).
    pub require_rotation: bool,
}

impl Policy {
    fn rotation_period_days(&self) -> Option<u32> {
        match (self.max_key_age_days, self.require_rotation) {
            (Some(d), _) => Some(d),
            (None, true) => Some(DEFAULT_ROTATION_DAYS),
            (None, false) => None,
        }
    }
}

/// Rotation facts of a master key (local keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationFacts {
    /// Material versions the key has (1 = never rotated).
    pub versions: u32,
    /// When the newest material was created (Unix seconds).
    pub current_since_unix: u64,
}

/// What the key backend says about a keyslot's master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFacts {
    /// A passphrase keyslot (no master key).
    Passphrase,
    /// The key exists.
    Found {
        state: KeyState,
        /// For PendingDeletion: when the material is destroyed.
        deletion_date: Option<String>,
        /// `None`: the backend does not tell (aws-kms, exec).
        rotation: Option<RotationFacts>,
    },
    /// The backend says the key does not exist (deleted, purged, never existed here).
    Missing(String),
    /// A keyslot backend this cryptvol does not know.
    UnsupportedBackend,
    /// The lookup failed (keystore unreadable, backend unreachable, access denied).
    LookupFailed(String),
}

/// One keyslot of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFacts {
    pub backend: String,
    pub key_id: String,
    pub key: KeyFacts,
}

impl SlotFacts {
    fn label(&self) -> String {
        if self.key_id.is_empty() {
            self.backend.clone()
        } else {
            format!("{} key {}", self.backend, self.key_id)
        }
    }
}

/// A file with a usable cryptvol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFacts {
    pub uuid: uuid::Uuid,
    pub health: HeaderHealth,
    pub required_features: Vec<String>,
    /// `data_offset + size`: the length the file must have.
    pub needed_len: u64,
    /// The file's (or device's) length, when known.
    pub file_len: Option<u64>,
    pub slots: Vec<SlotFacts>,
    /// What is wrong with the allocation map (thin volumes), if anything.
    pub map_problem: Option<String>,
    /// Why the header's geometry cannot be right for the file (checked without a key,
    /// before anything is allocated from it), if it cannot.
    pub header_invalid: Option<String>,
}

/// Why a file with cryptvol magic has no usable header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    BothCopiesDamaged { primary: String, secondary: String },
    Truncated(String),
    UnsupportedVersion { version: u32, supported: String },
    UnsupportedFeature { features: Vec<String> },
}

/// Everything known about one scanned item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Volume(VolumeFacts),
    BrokenVolume(HeaderProblem),
    /// Not a cryptvol volume: what its content looks like.
    Foreign(DataKind),
    /// Could not be read: why.
    Unreadable(String),
    /// Not checked: why.
    Skipped(String),
}

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
        Subject::BrokenVolume(p) => broken_volume(p),
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

fn broken_volume(p: &HeaderProblem) -> Vec<Finding> {
    match p {
        HeaderProblem::BothCopiesDamaged { primary, secondary } => vec![Finding::new(
            Code::HeaderBothCopiesDamaged,
            format!(
                "both header copies are damaged (primary: {primary}; secondary: {secondary}); \
                 the volume cannot be opened: restore the header from a backup"
            ),
        )],
        HeaderProblem::Truncated(detail) => vec![Finding::new(
            Code::HeaderBothCopiesDamaged,
            format!("cryptvol magic, but the header area is truncated ({detail})"),
        )],
        HeaderProblem::UnsupportedVersion { version, supported } => vec![Finding::new(
            Code::UnsupportedVersion,
            format!(
                "format version {version} is not supported (this cryptvol understands \
                 {supported}); its keys and header cannot be checked: upgrade cryptvol"
            ),
        )],
        HeaderProblem::UnsupportedFeature { features } => {
            let mut out = Vec::new();
            if reencrypt_in_progress(features) {
                out.push(reencrypt_finding());
            }
            let others: Vec<&str> = features
                .iter()
                .map(String::as_str)
                .filter(|f| *f != REENCRYPT_FEATURE)
                .collect();
            if !others.is_empty() || out.is_empty() {
                out.push(Finding::new(
                    Code::UnsupportedFeature,
                    format!(
                        "the volume requires feature(s) {} that this cryptvol does not know; \
                         its keys cannot be checked: upgrade cryptvol",
                        if others.is_empty() {
                            features.join(", ")
                        } else {
                            others.join(", ")
                        }
                    ),
                ));
            }
            out
        }
    }
}

fn reencrypt_finding() -> Finding {
    Finding::new(
        Code::ReencryptionInterrupted,
        "a re-encryption under a new data key was started and has not finished: part of the \
         volume is still under the old data key; resume it (`cryptvol reencrypt`, or serve the \
         volume)",
    )
}

fn copy_finding(which: &str, status: &CopyStatus) -> Option<Finding> {
    match status {
        CopyStatus::Ok => None,
        CopyStatus::Stale(seq) => Some(Finding::new(
            Code::HeaderCopyStale,
            format!(
                "the {which} header copy is stale (sequence {seq}): a header update was \
                 interrupted; the next header update (e.g. `cryptvol rekey`) rewrites it"
            ),
        )),
        CopyStatus::Damaged(reason) => Some(Finding::new(
            Code::HeaderCopyDamaged,
            format!(
                "the {which} header copy is damaged ({reason}): the volume has no header \
                 redundancy left; the next header update (e.g. `cryptvol rekey`) rewrites it"
            ),
        )),
    }
}

fn volume_findings(v: &VolumeFacts, policy: &Policy, now: u64) -> Vec<Finding> {
    let mut out = Vec::new();
    out.extend(copy_finding("primary", &v.health.primary));
    out.extend(copy_finding("secondary", &v.health.secondary));
    if let Some(why) = &v.header_invalid {
        out.push(Finding::new(
            Code::HeaderInvalid,
            format!(
                "the header cannot be right for this file ({why}); the volume cannot be \
                 opened: restore the header from a backup (or the file, if it was cut \
                 short)"
            ),
        ));
    }
    if let Some(p) = &v.map_problem {
        out.push(Finding::new(
            Code::AllocationMapDamaged,
            format!(
                "the allocation map is damaged ({p}); opening the volume read-write (cryptvol \
                 serve) rewrites it from the surviving copy, or marks the pages without one as \
                 allocated"
            ),
        ));
    }
    if let Some(len) = v.file_len {
        if len < v.needed_len {
            out.push(Finding::new(
                Code::VolumeTruncated,
                format!(
                    "the file holds {len} bytes, but the header needs {} (data offset + \
                     size): the end of the volume is missing",
                    v.needed_len
                ),
            ));
        }
    }
    if reencrypt_in_progress(&v.required_features) {
        out.push(reencrypt_finding());
    }
    if !v.slots.is_empty() && v.slots.iter().all(|s| s.backend == PASSPHRASE) {
        out.push(Finding::new(
            Code::PassphraseOnly,
            "every keyslot is a passphrase: no master key protects the data key (no key \
             states, policies or audit); add a key with `cryptvol keyslot add --key KEY`",
        ));
    }
    for (i, slot) in v.slots.iter().enumerate() {
        slot_findings(i, slot, policy, now, &mut out);
    }
    if !policy.required_keys.is_empty()
        && !v.slots.iter().any(|s| {
            policy
                .required_keys
                .iter()
                .any(|k| k.matches(&s.backend, &s.key_id))
        })
    {
        out.push(Finding::new(
            Code::KeyNotRequired,
            format!(
                "no keyslot uses the required key ({}); move it with `cryptvol rekey FILE \
                 --to-key KEY`",
                labels(&policy.required_keys)
            ),
        ));
    }
    out
}

fn labels(keys: &[KeyIdentity]) -> String {
    keys.iter()
        .map(|k| k.label.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

fn slot_findings(i: usize, s: &SlotFacts, policy: &Policy, now: u64, out: &mut Vec<Finding>) {
    let label = s.label();
    match &s.key {
        KeyFacts::Passphrase => return,
        KeyFacts::Missing(detail) => out.push(Finding::slot(
            Code::KeyMissing,
            i,
            format!(
                "keyslot {i} ({label}): the master key does not exist ({detail}); unless \
                 another keyslot opens it, the volume cannot be attached again"
            ),
        )),
        KeyFacts::UnsupportedBackend => out.push(Finding::slot(
            Code::KeyBackendUnsupported,
            i,
            format!("keyslot {i} ({label}): this cryptvol does not know that key backend"),
        )),
        KeyFacts::LookupFailed(why) => out.push(Finding::slot(
            Code::KeyLookupFailed,
            i,
            format!("keyslot {i} ({label}): cannot look up the master key: {why}"),
        )),
        KeyFacts::Found {
            state,
            deletion_date,
            rotation,
        } => {
            match state {
                KeyState::Enabled => {}
                KeyState::Disabled => out.push(Finding::slot(
                    Code::KeyDisabled,
                    i,
                    format!(
                        "keyslot {i} ({label}): the master key is disabled: the volume cannot \
                         be attached again until it is enabled"
                    ),
                )),
                KeyState::PendingDeletion => out.push(Finding::slot(
                    Code::KeyPendingDeletion,
                    i,
                    format!(
                        "keyslot {i} ({label}): the master key is pending deletion{}: cancel \
                         the deletion or rekey the volume before then",
                        deletion_date
                            .as_deref()
                            .map(|d| format!(" (destroyed after {d})"))
                            .unwrap_or_default()
                    ),
                )),
            }
            rotation_findings(i, &label, s, rotation.as_ref(), policy, now, out);
        }
    }
    key_choice_findings(i, &label, s, policy, out);
}

fn rotation_findings(
    i: usize,
    label: &str,
    s: &SlotFacts,
    rotation: Option<&RotationFacts>,
    policy: &Policy,
    now: u64,
    out: &mut Vec<Finding>,
) {
    let Some(days) = policy.rotation_period_days() else {
        return;
    };
    let Some(r) = rotation else {
        out.push(Finding::slot(
            Code::KeyRotationNotChecked,
            i,
            format!(
                "keyslot {i} ({label}): the {} backend does not tell cryptvol when its keys \
                 were rotated; check rotation in the key service itself",
                s.backend
            ),
        ));
        return;
    };
    let age = now.saturating_sub(r.current_since_unix);
    if age < u64::from(days) * SECS_PER_DAY {
        return;
    }
    let age_days = age / SECS_PER_DAY;
    let fix = format!("rotate it (`cryptvol key rotate {}`)", s.key_id);
    if policy.require_rotation && r.versions <= 1 {
        out.push(Finding::slot(
            Code::KeyRotationOff,
            i,
            format!(
                "keyslot {i} ({label}): the master key has never been rotated and its material \
                 is {age_days} day(s) old (rotation period {days} day(s)); {fix}"
            ),
        ));
    } else {
        out.push(Finding::slot(
            Code::KeyRotationOverdue,
            i,
            format!(
                "keyslot {i} ({label}): the master key's newest material (version {}) is \
                 {age_days} day(s) old; it must be rotated every {days} day(s); {fix}",
                r.versions
            ),
        ));
    }
}

fn key_choice_findings(
    i: usize,
    label: &str,
    s: &SlotFacts,
    policy: &Policy,
    out: &mut Vec<Finding>,
) {
    let required = policy
        .required_keys
        .iter()
        .any(|k| k.matches(&s.backend, &s.key_id));
    if required {
        return;
    }
    let default = policy
        .default_keys
        .iter()
        .find(|k| k.matches(&s.backend, &s.key_id));
    let customer_key_required = policy.forbid_default_key || !policy.required_keys.is_empty();
    if let (Some(d), true) = (default, customer_key_required) {
        out.push(Finding::slot(
            Code::DefaultKey,
            i,
            format!(
                "keyslot {i} ({label}) uses the default key ({}) where a customer key is \
                 required; rekey it (`cryptvol rekey FILE --to-key KEY`)",
                d.label
            ),
        ));
    } else if !policy.required_keys.is_empty() {
        out.push(Finding::slot(
            Code::KeyNotRequired,
            i,
            format!(
                "keyslot {i} ({label}) uses a key other than the required one ({}); rekey or \
                 remove it",
                labels(&policy.required_keys)
            ),
        ));
    }
}

/// Parses the UTC timestamps the keystore writes (`YYYY-MM-DDTHH:MM:SSZ`, optionally with
/// a fraction of a second) to Unix seconds. `None` for anything else.
pub fn parse_rfc3339_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if !s.is_ascii()
        || b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
    {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let rest = &s[19..];
    let rest = match rest.strip_prefix('.') {
        Some(frac) => {
            let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            &frac[digits..]
        }
        None => rest,
    };
    if rest != "Z" && rest != "z" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if year < 1970 || !(1..=12).contains(&month) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let leap = is_leap(year);
    let month_len = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day < 1 || day > month_len[(month - 1) as usize] {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * SECS_PER_DAY + hour * 3600 + min * 60 + sec)
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

/// Days from 1970-01-01 to the given date (proleptic Gregorian, year ≥ 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let mut days = 0;
    for y in 1970..year {
        days += if is_leap(y) { 366 } else { 365 };
    }
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    days += cumulative[(month - 1) as usize];
    if month > 2 && is_leap(year) {
        days += 1;
    }
    days + day - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{EncryptionContext, WrappedDek, EXEC, LOCAL};
    use crate::volume::Header;

    const NOW: u64 = 1_750_000_000;
    const DAY: u64 = SECS_PER_DAY;

    fn healthy() -> HeaderHealth {
        HeaderHealth {
            primary: CopyStatus::Ok,
            secondary: CopyStatus::Ok,
        }
    }

    fn enabled(versions: u32, since: u64) -> KeyFacts {
        KeyFacts::Found {
            state: KeyState::Enabled,
            deletion_date: None,
            rotation: Some(RotationFacts {
                versions,
                current_since_unix: since,
            }),
        }
    }

    fn local(id: &str, key: KeyFacts) -> SlotFacts {
        SlotFacts {
            backend: LOCAL.into(),
            key_id: id.into(),
            key,
        }
    }

    fn pass() -> SlotFacts {
        SlotFacts {
            backend: PASSPHRASE.into(),
            key_id: String::new(),
            key: KeyFacts::Passphrase,
        }
    }

    fn vol(slots: Vec<SlotFacts>) -> VolumeFacts {
        VolumeFacts {
            uuid: uuid::Uuid::nil(),
            health: healthy(),
            required_features: Vec::new(),
            needed_len: 2 << 20,
            file_len: Some(2 << 20),
            slots,
            map_problem: None,
            header_invalid: None,
        }
    }

    #[test]
    fn an_invalid_header_geometry_is_non_compliant() {
        let mut v = vol(Vec::new());
        v.header_invalid = Some("allocation map of 9 pages does not fit".into());
        let f = volume_findings(&v, &Policy::default(), 0);
        assert!(f.iter().any(|f| f.code == Code::HeaderInvalid
            && f.code.severity() == Severity::NonCompliant
            && f.message.contains("9 pages")
            && f.message.contains("restore the header from a backup")));
    }

    #[test]
    fn a_damaged_allocation_map_is_non_compliant() {
        let mut v = vol(Vec::new());
        v.map_problem = Some("1 of 1 pages damaged in both copies".into());
        let f = volume_findings(&v, &Policy::default(), 0);
        assert!(f.iter().any(|f| f.code == Code::AllocationMapDamaged
            && f.code.severity() == Severity::NonCompliant
            && f.message.contains("1 of 1 pages")));
    }

    fn ident(backend: &str, id: &str, label: &str) -> KeyIdentity {
        KeyIdentity {
            backend: backend.into(),
            key_id: id.into(),
            label: label.into(),
        }
    }

    fn eval(v: VolumeFacts, p: &Policy) -> (Verdict, Vec<Code>) {
        let (verdict, f) = evaluate(&Subject::Volume(v), p, NOW);
        (verdict, f.iter().map(|f| f.code).collect())
    }

    fn good() -> SlotFacts {
        local("mk-a", enabled(1, NOW - DAY))
    }

    #[test]
    fn a_healthy_volume_is_compliant() {
        let (v, codes) = eval(vol(vec![good()]), &Policy::default());
        assert_eq!((v, codes), (Verdict::Compliant, vec![]));
        // A recovery passphrase next to a key is fine.
        let (v, _) = eval(vol(vec![good(), pass()]), &Policy::default());
        assert_eq!(v, Verdict::Compliant);
    }

    #[test]
    fn foreign_data_is_not_a_volume() {
        for kind in [
            DataKind::Qcow2 { version: 3 },
            DataKind::Empty,
            DataKind::Zeros,
        ] {
            let (v, f) = evaluate(&Subject::Foreign(kind.clone()), &Policy::default(), NOW);
            assert_eq!(v, Verdict::NonCompliant);
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].code, Code::NotAVolume);
            assert!(f[0].message.contains(&kind.describe()), "{}", f[0].message);
        }
    }

    #[test]
    fn unreadable_is_an_error_and_skipped_is_skipped() {
        let (v, f) = evaluate(
            &Subject::Unreadable("permission denied".into()),
            &Policy::default(),
            NOW,
        );
        assert_eq!(v, Verdict::Error);
        assert_eq!(f[0].code, Code::ScanError);
        let (v, f) = evaluate(&Subject::Skipped("socket".into()), &Policy::default(), NOW);
        assert_eq!((v, f.len()), (Verdict::Skipped, 1));
        assert_eq!(f[0].code.severity(), Severity::Note);
    }

    #[test]
    fn key_states() {
        let cases = [
            (
                KeyFacts::Found {
                    state: KeyState::Disabled,
                    deletion_date: None,
                    rotation: None,
                },
                Code::KeyDisabled,
            ),
            (
                KeyFacts::Found {
                    state: KeyState::PendingDeletion,
                    deletion_date: Some("2030-01-01T00:00:00Z".into()),
                    rotation: None,
                },
                Code::KeyPendingDeletion,
            ),
            (KeyFacts::Missing("gone".into()), Code::KeyMissing),
            (KeyFacts::UnsupportedBackend, Code::KeyBackendUnsupported),
        ];
        for (facts, code) in cases {
            let (v, codes) = eval(vol(vec![local("mk-a", facts)]), &Policy::default());
            assert_eq!((v, codes), (Verdict::NonCompliant, vec![code]));
        }
        // Only one bad slot among good ones still counts.
        let (v, codes) = eval(
            vol(vec![
                good(),
                local("mk-b", KeyFacts::Missing("gone".into())),
            ]),
            &Policy::default(),
        );
        assert_eq!((v, codes), (Verdict::NonCompliant, vec![Code::KeyMissing]));
    }

    #[test]
    fn pending_deletion_message_has_the_date() {
        let facts = KeyFacts::Found {
            state: KeyState::PendingDeletion,
            deletion_date: Some("2030-01-01T00:00:00Z".into()),
            rotation: None,
        };
        let (_, f) = evaluate(
            &Subject::Volume(vol(vec![local("mk-a", facts)])),
            &Policy::default(),
            NOW,
        );
        assert!(f[0].message.contains("2030-01-01"), "{}", f[0].message);
        assert_eq!(f[0].keyslot, Some(0));
    }

    #[test]
    fn lookup_failure_is_an_error_unless_something_is_non_compliant() {
        let failed = local("mk-a", KeyFacts::LookupFailed("EACCES".into()));
        let (v, codes) = eval(vol(vec![failed.clone()]), &Policy::default());
        assert_eq!((v, codes), (Verdict::Error, vec![Code::KeyLookupFailed]));
        let mut broken = vol(vec![failed]);
        broken.health.primary = CopyStatus::Damaged("checksum mismatch".into());
        let (v, codes) = eval(broken, &Policy::default());
        assert_eq!(v, Verdict::NonCompliant);
        assert_eq!(codes, vec![Code::HeaderCopyDamaged, Code::KeyLookupFailed]);
    }

    #[test]
    fn header_copies() {
        let mut v = vol(vec![good()]);
        v.health.secondary = CopyStatus::Damaged("checksum mismatch".into());
        let (_, f) = evaluate(&Subject::Volume(v), &Policy::default(), NOW);
        assert_eq!(f[0].code, Code::HeaderCopyDamaged);
        assert!(
            f[0].message.contains("secondary") && f[0].message.contains("checksum"),
            "{}",
            f[0].message
        );
        let mut v = vol(vec![good()]);
        v.health.primary = CopyStatus::Stale(3);
        let (verdict, codes) = eval(v, &Policy::default());
        assert_eq!(
            (verdict, codes),
            (Verdict::NonCompliant, vec![Code::HeaderCopyStale])
        );
    }

    #[test]
    fn broken_headers() {
        let cases = [
            (
                HeaderProblem::BothCopiesDamaged {
                    primary: "a".into(),
                    secondary: "b".into(),
                },
                vec![Code::HeaderBothCopiesDamaged],
            ),
            (
                HeaderProblem::Truncated("100 bytes".into()),
                vec![Code::HeaderBothCopiesDamaged],
            ),
            (
                HeaderProblem::UnsupportedVersion {
                    version: 7,
                    supported: "1".into(),
                },
                vec![Code::UnsupportedVersion],
            ),
            (
                HeaderProblem::UnsupportedFeature {
                    features: vec!["sparse-map".into()],
                },
                vec![Code::UnsupportedFeature],
            ),
            (
                HeaderProblem::UnsupportedFeature {
                    features: vec!["reencrypt".into()],
                },
                vec![Code::ReencryptionInterrupted],
            ),
            (
                HeaderProblem::UnsupportedFeature {
                    features: vec!["reencrypt".into(), "x".into()],
                },
                vec![Code::ReencryptionInterrupted, Code::UnsupportedFeature],
            ),
        ];
        for (p, want) in cases {
            let (v, f) = evaluate(&Subject::BrokenVolume(p), &Policy::default(), NOW);
            assert_eq!(v, Verdict::NonCompliant);
            assert_eq!(f.iter().map(|f| f.code).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn reencrypt_detection_on_a_header_value() {
        let uuid = uuid::Uuid::new_v4();
        let mut header = Header {
            format_version: 1,
            sequence: 1,
            uuid,
            size: 1 << 20,
            sector_size: 4096,
            data_offset: 1 << 20,
            cipher: crate::volume::CIPHER.into(),
            keyslots: vec![WrappedDek {
                backend: LOCAL.into(),
                key_id: "mk-a".into(),
                blob: vec![0; 92],
                context: EncryptionContext::for_volume(&uuid),
                params: Default::default(),
            }],
            iv_unit: 4096,
            required_features: Vec::new(),
            compatible_features: Vec::new(),
            allocation_map: None,
            reencrypt: None,
            key_check: [0; 32],
            header_mac: [0; 32],
        };
        assert!(!reencrypt_in_progress(&header.required_features));
        header.required_features.push("reencrypt".into());
        assert!(reencrypt_in_progress(&header.required_features));
        // A compatible feature of that name does not count: only a required one marks it.
        assert!(!reencrypt_in_progress(&["reencrypt-done"]));
        let mut v = vol(vec![good()]);
        v.required_features = header.required_features.clone();
        let (verdict, codes) = eval(v, &Policy::default());
        assert_eq!(
            (verdict, codes),
            (Verdict::NonCompliant, vec![Code::ReencryptionInterrupted])
        );
    }

    #[test]
    fn truncated_data_area() {
        let mut v = vol(vec![good()]);
        v.file_len = Some(v.needed_len - 4096);
        let (_, codes) = eval(v.clone(), &Policy::default());
        assert_eq!(codes, vec![Code::VolumeTruncated]);
        v.file_len = None;
        assert_eq!(eval(v, &Policy::default()).0, Verdict::Compliant);
    }

    #[test]
    fn passphrase_only() {
        let (v, codes) = eval(vol(vec![pass(), pass()]), &Policy::default());
        assert_eq!(
            (v, codes),
            (Verdict::NonCompliant, vec![Code::PassphraseOnly])
        );
        // With a required key, it also says that no slot uses it.
        let p = Policy {
            required_keys: vec![ident(LOCAL, "mk-a", "alias/a")],
            ..Policy::default()
        };
        let (_, codes) = eval(vol(vec![pass()]), &p);
        assert_eq!(codes, vec![Code::PassphraseOnly, Code::KeyNotRequired]);
    }

    #[test]
    fn required_key() {
        let p = Policy {
            required_keys: vec![ident(LOCAL, "mk-a", "alias/a")],
            ..Policy::default()
        };
        assert_eq!(eval(vol(vec![good()]), &p).0, Verdict::Compliant);
        assert_eq!(eval(vol(vec![good(), pass()]), &p).0, Verdict::Compliant);
        let other = local("mk-b", enabled(1, NOW));
        let (v, codes) = eval(vol(vec![other.clone()]), &p);
        assert_eq!(v, Verdict::NonCompliant);
        assert_eq!(codes, vec![Code::KeyNotRequired, Code::KeyNotRequired]);
        // A second key next to the required one is flagged too.
        let (_, f) = evaluate(&Subject::Volume(vol(vec![good(), other])), &p, NOW);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].code, f[0].keyslot), (Code::KeyNotRequired, Some(1)));
        assert!(f[0].message.contains("alias/a"), "{}", f[0].message);
        // Same id, other backend: not the required key.
        let exec = SlotFacts {
            backend: EXEC.into(),
            key_id: "mk-a".into(),
            key: enabled(1, NOW),
        };
        assert_eq!(eval(vol(vec![exec]), &p).0, Verdict::NonCompliant);
    }

    #[test]
    fn default_key() {
        let dflt = ident(LOCAL, "mk-d", "alias/cryptvol/default");
        let on_default = || vol(vec![local("mk-d", enabled(1, NOW))]);
        // Not asked for: fine.
        let p = Policy {
            default_keys: vec![dflt.clone()],
            ..Policy::default()
        };
        assert_eq!(eval(on_default(), &p).0, Verdict::Compliant);
        // --no-default-key.
        let p = Policy {
            default_keys: vec![dflt.clone()],
            forbid_default_key: true,
            ..Policy::default()
        };
        assert_eq!(eval(on_default(), &p).1, vec![Code::DefaultKey]);
        assert_eq!(eval(vol(vec![good()]), &p).0, Verdict::Compliant);
        // --require-key another key: DEFAULT_KEY for the slot (not KEY_NOT_REQUIRED too),
        // plus "no keyslot uses the required key".
        let p = Policy {
            default_keys: vec![dflt.clone()],
            required_keys: vec![ident(LOCAL, "mk-a", "alias/a")],
            ..Policy::default()
        };
        assert_eq!(
            eval(on_default(), &p).1,
            vec![Code::DefaultKey, Code::KeyNotRequired]
        );
        // --require-key the default key itself: compliant.
        let p = Policy {
            default_keys: vec![dflt.clone()],
            required_keys: vec![dflt],
            forbid_default_key: false,
            ..Policy::default()
        };
        assert_eq!(eval(on_default(), &p).0, Verdict::Compliant);
    }

    #[test]
    fn kms_keys_match_by_arn_or_key_id() {
        let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let k = ident(AWS_KMS, arn, "aws-kms:alias/ebs");
        assert!(k.matches(AWS_KMS, arn));
        assert!(k.matches(AWS_KMS, "1234abcd-12ab-34cd-56ef-1234567890ab"));
        assert!(!k.matches(AWS_KMS, "ffff"));
        assert!(!k.matches(LOCAL, arn));
        // Two ARNs of different accounts with the same id are different keys.
        let other = "arn:aws:kms:us-east-1:999999999999:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert!(!k.matches(AWS_KMS, other));
        let bare = ident(AWS_KMS, "1234abcd-12ab-34cd-56ef-1234567890ab", "x");
        assert!(bare.matches(AWS_KMS, arn));
    }

    #[test]
    fn rotation_rules() {
        let old = NOW - 400 * DAY;
        let young = NOW - 10 * DAY;
        let never_rotated_old = || vol(vec![local("mk-a", enabled(1, old))]);
        let rotated_old = || vol(vec![local("mk-a", enabled(3, old))]);
        let rotated_young = || vol(vec![local("mk-a", enabled(2, young))]);
        // No rotation rule: nothing.
        assert_eq!(
            eval(never_rotated_old(), &Policy::default()).0,
            Verdict::Compliant
        );
        // --require-rotation: default period 365 days.
        let p = Policy {
            require_rotation: true,
            ..Policy::default()
        };
        assert_eq!(eval(never_rotated_old(), &p).1, vec![Code::KeyRotationOff]);
        assert_eq!(eval(rotated_old(), &p).1, vec![Code::KeyRotationOverdue]);
        assert_eq!(eval(rotated_young(), &p).0, Verdict::Compliant);
        let young_never = vol(vec![local("mk-a", enabled(1, young))]);
        assert_eq!(eval(young_never, &p).0, Verdict::Compliant);
        // --max-key-age alone: overdue, whatever the history.
        let p = Policy {
            max_key_age_days: Some(30),
            ..Policy::default()
        };
        assert_eq!(
            eval(never_rotated_old(), &p).1,
            vec![Code::KeyRotationOverdue]
        );
        assert_eq!(eval(rotated_young(), &p).0, Verdict::Compliant);
        // --max-key-age 0: everything is due.
        let p = Policy {
            max_key_age_days: Some(0),
            ..Policy::default()
        };
        let now_key = vol(vec![local("mk-a", enabled(2, NOW))]);
        assert_eq!(eval(now_key, &p).1, vec![Code::KeyRotationOverdue]);
        // Both: the period is --max-key-age; never rotated says "off".
        let p = Policy {
            max_key_age_days: Some(5),
            require_rotation: true,
            ..Policy::default()
        };
        assert_eq!(eval(rotated_young(), &p).1, vec![Code::KeyRotationOverdue]);
        // A clock before the material (skew) is not overdue.
        let future = vol(vec![local("mk-a", enabled(1, NOW + DAY))]);
        assert_eq!(
            eval(
                future,
                &Policy {
                    max_key_age_days: Some(1),
                    ..Policy::default()
                }
            )
            .0,
            Verdict::Compliant
        );
    }

    #[test]
    fn rotation_of_other_backends_is_a_note() {
        let kms = SlotFacts {
            backend: AWS_KMS.into(),
            key_id: "arn:aws:kms:r:a:key/k".into(),
            key: KeyFacts::Found {
                state: KeyState::Enabled,
                deletion_date: None,
                rotation: None,
            },
        };
        let p = Policy {
            require_rotation: true,
            ..Policy::default()
        };
        let (v, codes) = eval(vol(vec![kms]), &p);
        assert_eq!(
            (v, codes),
            (Verdict::Compliant, vec![Code::KeyRotationNotChecked])
        );
    }

    #[test]
    fn codes_are_stable_strings() {
        for c in Code::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        assert_eq!(Code::ALL.len(), 23);
        let v = serde_json::to_string(&Verdict::NonCompliant).unwrap();
        assert_eq!(v, "\"NON_COMPLIANT\"");
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_utc("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(
            parse_rfc3339_utc("2024-12-31T23:59:59Z"),
            Some(1_735_689_599)
        );
        assert_eq!(
            parse_rfc3339_utc("2024-02-29T00:00:00.123Z"),
            Some(1_709_164_800)
        );
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00+01:00",
            "1969-12-31T23:59:59Z",
            "2024-01-01 00:00:00Z",
            "20x4-01-01T00:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T24:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }

    /// Pins the calendar arithmetic on leap years, century years and month ends (and the
    /// accepted spellings), so that replacing the date code cannot change a result.
    #[test]
    fn timestamps_on_calendar_edges() {
        for (s, want) in [
            ("1970-01-31T00:00:00Z", 2_592_000),
            ("2000-02-29T00:00:00Z", 951_782_400),
            ("2023-12-31T23:59:59Z", 1_704_067_199),
            ("2024-03-01T00:00:00Z", 1_709_251_200),
            ("2024-04-30T12:00:00Z", 1_714_478_400),
            ("2038-01-19T03:14:08Z", 2_147_483_648),
            ("2100-02-28T23:59:59Z", 4_107_542_399),
            ("2100-03-01T00:00:00Z", 4_107_542_400),
            ("9999-12-31T23:59:59Z", 253_402_300_799),
            // Lower-case separators and a long fraction are accepted (the fraction is
            // dropped).
            ("2024-03-01t00:00:00z", 1_709_251_200),
            ("2024-03-01T00:00:00.123456789012Z", 1_709_251_200),
            // A leap second counts as the next second.
            ("2016-12-31T23:59:60Z", 1_483_228_800),
        ] {
            assert_eq!(parse_rfc3339_utc(s), Some(want), "{s}");
        }
        for bad in [
            "2100-02-29T00:00:00Z",
            "1900-02-28T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-06-31T00:00:00Z",
            "2024-00-10T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-01-32T00:00:00Z",
            "2024-01-01T00:60:00Z",
            "2024-01-01T00:00:61Z",
            "+024-01-01T00:00:00Z",
            "2024-01-01T00:00:00ZZ",
            "2024-01-01T00:00:00.5",
            "2024-1-01T00:00:00Z",
            "2024-01-01T00:00:0\u{e9}Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }
}
