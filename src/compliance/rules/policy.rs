//! What the operator asks for: the [`Policy`] built from the command line, and the
//! [`KeyIdentity`] of a key it names (with how AWS KMS key ARNs and key ids match).

use crate::keys::AWS_KMS;

/// Rotation period used by `--require-rotation` when `--max-key-age` is not given
/// (AWS KMS's default automatic rotation period).
pub const DEFAULT_ROTATION_DAYS: u32 = 365;

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
    pub(super) fn rotation_period_days(&self) -> Option<u32> {
        match (self.max_key_age_days, self.require_rotation) {
            (Some(d), _) => Some(d),
            (None, true) => Some(DEFAULT_ROTATION_DAYS),
            (None, false) => None,
        }
    }
}
