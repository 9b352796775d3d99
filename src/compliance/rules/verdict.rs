//! The vocabulary of a check's outcome: the [`Verdict`] on an item, the stable finding
//! [`Code`]s with their [`Severity`], and one [`Finding`].

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
    pub(super) fn new(code: Code, message: impl Into<String>) -> Finding {
        Finding {
            code,
            message: message.into(),
            keyslot: None,
        }
    }
    pub(super) fn slot(code: Code, slot: usize, message: impl Into<String>) -> Finding {
        Finding {
            code,
            message: message.into(),
            keyslot: Some(slot),
        }
    }
}
