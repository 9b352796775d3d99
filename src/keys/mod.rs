//! Key backends: master keys (CMKs) that wrap and unwrap volume data keys.
//!
//! The volume layer stores a [`WrappedDek`] per keyslot; a backend turns it back
//! into a [`Dek`] after checking the [`EncryptionContext`].
//!
//! - [`LocalKeystore`]: master keys in a directory, with AWS KMS-like key states,
//!   rotation, aliases and per-key policies.
//! - [`PassphraseBackend`]: an Argon2id-derived key.
//! - [`ExecBackend`]: an external program speaking a JSON protocol (Vault, TPM, HSM, ...).
//! - [`AwsKmsBackend`]: AWS KMS (GenerateDataKey / Decrypt / ReEncrypt), standard AWS
//!   configuration chain.
//!
//! [`KeyService`] dispatches a [`KeyRef`] or a keyslot to its backend and writes the
//! [`AuditLog`]. See `docs/keys.md`.

mod audit;
mod aws_kms;
mod clock;
mod exec;
#[doc(hidden)]
pub(crate) use exec::fuzz_hooks as exec_fuzz_hooks;
#[doc(hidden)]
pub(crate) use local::fuzz_hooks as keystore_fuzz_hooks;
mod keyref;
mod local;
mod passphrase;
mod principal;
mod seal;
mod service;
pub mod stats;

pub use audit::{AccessEvent, AuditEvent, AuditLog, AuditWriter, AUDIT_FILE};
pub use aws_kms::AwsKmsBackend;
pub use exec::{ExecBackend, ExecSpec, EXEC_PROTOCOL_VERSION};
pub use keyref::{BareRefs, KeyRef, AWS_KMS, EXEC, LOCAL, PASSPHRASE};
pub use local::{
    default_keystore_dir, KeyDetails, KeyInfo, KeyPolicy, LocalKeystore, MaterialVersion,
    DEFAULT_KEY_ALIAS, MAX_DELETION_DAYS, MIN_DELETION_DAYS,
};
pub use passphrase::{
    set_host_max_memory_kib, Argon2Limits, Argon2Params, PassphraseBackend, PassphraseSource,
    MAX_MEMORY_ENV as ARGON2_MAX_MEMORY_ENV, MAX_MEMORY_KIB as ARGON2_MAX_MEMORY_KIB,
};
pub use principal::Principal;
pub use service::KeyService;

use std::collections::BTreeMap;

use crate::crypto::canonical::{CanonicalWriter, KEYWRAP_V1};
use crate::crypto::Dek;

/// Canonical, ordered key/value map bound to a wrapped key as associated data
/// (the AWS KMS "encryption context"). Always holds at least `cryptvol:volume-uuid`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct EncryptionContext(pub BTreeMap<String, String>);

impl EncryptionContext {
    /// The context binding a DEK to one volume.
    pub fn for_volume(uuid: &uuid::Uuid) -> EncryptionContext {
        let mut m = BTreeMap::new();
        m.insert("cryptvol:volume-uuid".to_string(), uuid.to_string());
        EncryptionContext(m)
    }
    /// Canonical byte encoding used as AEAD associated data: `len(k) k len(v) v ...`
    /// with u32 little-endian lengths, keys in sorted order (the
    /// [`KEYWRAP_V1`](crate::crypto::canonical::KEYWRAP_V1) profile's `pairs`).
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, KeyError> {
        let mut w = CanonicalWriter::new(KEYWRAP_V1);
        self.write_canonical(&mut w);
        Ok(w.finish()?)
    }

    /// Appends the canonical encoding (see [`EncryptionContext::canonical_bytes`]).
    pub(crate) fn write_canonical(&self, w: &mut CanonicalWriter) {
        w.pairs(&self.0);
    }
}

/// A DEK wrapped by a master key, self-describing: this is what a keyslot stores.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedDek {
    /// Backend kind: `"local"`, `"passphrase"`, ...
    pub backend: String,
    /// The resolved key id (never an alias). Empty for passphrase slots.
    pub key_id: String,
    /// Opaque ciphertext (for AES-GCM: nonce ‖ ciphertext ‖ tag).
    pub blob: Vec<u8>,
    /// The encryption context used when wrapping.
    pub context: EncryptionContext,
    /// Backend parameters needed to unwrap (e.g. Argon2id cost and salt), string-valued.
    pub params: BTreeMap<String, String>,
}

/// The permission classes of a key policy (what a principal may do with a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Generate a new data key, or wrap one (KMS GenerateDataKey / Encrypt).
    Generate,
    /// Unwrap a data key (KMS Decrypt): what attaching a volume needs.
    Unwrap,
    /// Move a data key from or to this key (KMS ReEncryptFrom / ReEncryptTo).
    Rewrap,
    /// Change the key: state, rotation, aliases, policy, deletion.
    Administer,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::Generate,
        Permission::Unwrap,
        Permission::Rewrap,
        Permission::Administer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Generate => "generate",
            Permission::Unwrap => "unwrap",
            Permission::Rewrap => "rewrap",
            Permission::Administer => "administer",
        }
    }

    /// Parses a comma-separated list (`generate` (or `wrap`), `unwrap`, `rewrap`,
    /// `administer`, `all`).
    pub fn parse_list(s: &str) -> Result<Vec<Permission>, KeyError> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let add: &[Permission] = match item {
                "generate" | "wrap" => &[Permission::Generate],
                "unwrap" => &[Permission::Unwrap],
                "rewrap" => &[Permission::Rewrap],
                "administer" | "admin" => &[Permission::Administer],
                "all" => &Permission::ALL,
                other => {
                    return Err(KeyError::Unsupported(format!(
                        "unknown operation {:?}: use generate, unwrap, rewrap, administer or all",
                        other.escape_debug().to_string()
                    )))
                }
            };
            for p in add {
                if !out.contains(p) {
                    out.push(*p);
                }
            }
        }
        if out.is_empty() {
            return Err(KeyError::Unsupported(
                "no operations given: use generate, unwrap, rewrap, administer or all".into(),
            ));
        }
        out.sort();
        Ok(out)
    }
}

/// A cryptographic use of a master key, as recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOp {
    /// A new volume's data key is wrapped.
    Generate,
    /// An existing data key is wrapped (the `KeyBackend::wrap` API).
    Wrap,
    /// A data key is unwrapped to attach a volume.
    Unwrap,
    /// A data key is unwrapped to move it to another key or keyslot (rekey, keyslot changes).
    RewrapFrom,
    /// A data key is wrapped under its new key (rekey, keyslot add).
    RewrapTo,
    /// A data key is unwrapped to be handed out of cryptvol (`cryptvol break-glass`):
    /// needs the unwrap permission, audited under its own name.
    BreakGlass,
}

impl KeyOp {
    /// The `operation` field of the audit record.
    pub fn name(self) -> &'static str {
        match self {
            KeyOp::Generate => "generate",
            KeyOp::Wrap => "wrap",
            KeyOp::Unwrap => "unwrap",
            KeyOp::RewrapFrom => "rewrap-from",
            KeyOp::RewrapTo => "rewrap-to",
            KeyOp::BreakGlass => "break-glass-unwrap",
        }
    }

    /// The policy permission the operation needs.
    pub fn permission(self) -> Permission {
        match self {
            KeyOp::Generate | KeyOp::Wrap => Permission::Generate,
            KeyOp::Unwrap | KeyOp::BreakGlass => Permission::Unwrap,
            KeyOp::RewrapFrom | KeyOp::RewrapTo => Permission::Rewrap,
        }
    }
}

/// State of a master key, as AWS KMS names them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
}

/// What a backend tells about a key (never key material).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyDescription {
    pub backend: String,
    pub key_id: String,
    pub aliases: Vec<String>,
    pub state: KeyState,
    pub created_at: String,
}

/// Who AWS refused what ([`KeyError::KmsAccessDenied`]).
#[derive(Debug)]
pub struct KmsDenial {
    /// The key ARN (or the reference as given, when it did not resolve).
    pub key: String,
    /// The cryptvol key operation that needed the call (`unwrap`, `generate`, ...).
    pub operation: String,
    /// The KMS action refused (`kms:Decrypt`).
    pub action: String,
    /// The AWS principal (an ARN when known).
    pub principal: String,
    /// What AWS answered.
    pub aws_said: String,
    /// What to do.
    pub remedy: String,
}

impl std::fmt::Display for KmsDenial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "access denied by AWS KMS: {} may not perform {} on key {} (needed for {}); AWS \
             said \"{}\"; to fix: {}",
            self.principal, self.action, self.key, self.operation, self.aws_said, self.remedy
        )
    }
}

/// Typed key-backend errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {key} not found in the {backend} backend")]
    NotFound { backend: String, key: String },
    #[error("access denied: {principal} may not use key {key} for {operation}; the key's policy does not allow it (for a local key see `cryptvol key describe`; an administrator of the key can `cryptvol key grant` it)")]
    AccessDenied {
        key: String,
        operation: String,
        principal: String,
    },
    /// AWS refused a KMS call: an IAM policy, a key policy or the credentials.
    #[error("{0}")]
    KmsAccessDenied(Box<KmsDenial>),
    /// `state` says what the key is and how to make it usable again.
    #[error("key {key} is {state}")]
    KeyUnusable { key: String, state: String },
    #[error("key {key}: {reason}")]
    InvalidState { key: String, reason: String },
    #[error("audit log {path}: {reason}")]
    Audit { path: String, reason: String },
    #[error("exec backend {name}: {reason}")]
    Exec { name: String, reason: String },
    #[error("encryption context mismatch: this wrapped key belongs to {found}, not {expected}")]
    ContextMismatch { expected: String, found: String },
    #[error("wrong key or passphrase: the wrapped data key did not authenticate under {key}")]
    WrongKey { key: String },
    #[error("keystore problem at {path}: {reason}")]
    Keystore { path: String, reason: String },
    #[error("cannot read the passphrase from {source_name}: {reason}")]
    Passphrase { source_name: String, reason: String },
    #[error("transient key backend failure (retry later): {0}")]
    Transient(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid wrapped key: {0}")]
    Malformed(String),
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

impl KeyError {
    /// The variant name, as written in the audit log's `error` field.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyError::NotFound { .. } => "NotFound",
            KeyError::AccessDenied { .. } | KeyError::KmsAccessDenied(_) => "AccessDenied",
            KeyError::KeyUnusable { .. } => "KeyUnusable",
            KeyError::InvalidState { .. } => "InvalidState",
            KeyError::Audit { .. } => "Audit",
            KeyError::Exec { .. } => "Exec",
            KeyError::ContextMismatch { .. } => "ContextMismatch",
            KeyError::WrongKey { .. } => "WrongKey",
            KeyError::Keystore { .. } => "Keystore",
            KeyError::Passphrase { .. } => "Passphrase",
            KeyError::Transient(_) => "Transient",
            KeyError::Unsupported(_) => "Unsupported",
            KeyError::Malformed(_) => "Malformed",
            KeyError::Crypto(_) => "Crypto",
        }
    }
}

/// A pluggable master-key backend.
#[async_trait::async_trait]
pub trait KeyBackend: Send + Sync {
    /// Backend kind as stored in keyslots (`"local"`, `"passphrase"`, ...).
    fn kind(&self) -> &'static str;
    /// Resolves a key reference (id or `alias/NAME`; `None` = the backend's default key)
    /// and describes it.
    async fn describe_key(&self, key: Option<&str>) -> Result<KeyDescription, KeyError>;
    /// A fresh random DEK and its wrapped form under `key`, bound to `ctx`. The default
    /// draws the DEK from the OS RNG and wraps it; a key service that generates data keys
    /// itself (as KMS `GenerateDataKey`) overrides it.
    async fn generate_dek(
        &self,
        key: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError> {
        let dek = Dek::generate()?;
        let wrapped = self.wrap(key, &dek, ctx).await?;
        Ok((dek, wrapped))
    }
    /// Wraps a DEK we already hold under `key`, bound to `ctx`.
    async fn wrap(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError>;
    /// Unwraps; fails with `ContextMismatch` if `expected` differs from the context the
    /// DEK was wrapped with, `WrongKey` if it does not authenticate.
    async fn unwrap(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
    ) -> Result<Dek, KeyError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_lists() {
        assert_eq!(
            Permission::parse_list("unwrap, wrap").unwrap(),
            vec![Permission::Generate, Permission::Unwrap]
        );
        assert_eq!(
            Permission::parse_list("all").unwrap(),
            Permission::ALL.to_vec()
        );
        assert_eq!(
            Permission::parse_list("admin,administer").unwrap(),
            vec![Permission::Administer]
        );
        assert!(Permission::parse_list("").is_err());
        let err = Permission::parse_list("unwrap,decrypt").err().unwrap();
        assert!(err.to_string().contains("decrypt"), "{err}");
    }

    #[test]
    fn key_ops_map_to_permissions() {
        assert_eq!(KeyOp::Generate.permission(), Permission::Generate);
        assert_eq!(KeyOp::Wrap.permission(), Permission::Generate);
        assert_eq!(KeyOp::Unwrap.permission(), Permission::Unwrap);
        assert_eq!(KeyOp::RewrapFrom.permission(), Permission::Rewrap);
        assert_eq!(KeyOp::RewrapTo.permission(), Permission::Rewrap);
        assert_eq!(KeyOp::RewrapFrom.name(), "rewrap-from");
        assert_eq!(KeyOp::BreakGlass.permission(), Permission::Unwrap);
        assert_eq!(KeyOp::BreakGlass.name(), "break-glass-unwrap");
    }
}
