//! Key backends: master keys (CMKs) that wrap and unwrap volume data keys.
//!
//! The volume layer stores a [`WrappedDek`] per keyslot; a backend turns it back
//! into a [`Dek`] after checking the [`EncryptionContext`].

mod local;
mod passphrase;
mod seal;

pub use local::{default_keystore_dir, KeyInfo, LocalKeystore};
pub use passphrase::{Argon2Params, PassphraseBackend, PassphraseSource};

use std::collections::BTreeMap;

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
    /// with u32 little-endian lengths, keys in sorted order.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
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

/// Typed key-backend errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {key} not found in {backend} backend")]
    NotFound { backend: String, key: String },
    #[error("access denied: {principal} may not {operation} with key {key}")]
    AccessDenied {
        key: String,
        operation: String,
        principal: String,
    },
    #[error("key {key} is {state}; enable it (or use another key) before using it")]
    KeyUnusable { key: String, state: String },
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

/// A pluggable master-key backend.
#[async_trait::async_trait]
pub trait KeyBackend: Send + Sync {
    /// Backend kind as stored in keyslots (`"local"`, `"passphrase"`, ...).
    fn kind(&self) -> &'static str;
    /// Resolves a key reference (id or `alias/NAME`; `None` = the backend's default key)
    /// and describes it.
    async fn describe_key(&self, key: Option<&str>) -> Result<KeyDescription, KeyError>;
    /// A fresh random DEK and its wrapped form under `key`, bound to `ctx`.
    async fn generate_dek(
        &self,
        key: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError>;
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
