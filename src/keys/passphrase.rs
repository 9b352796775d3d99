//! The passphrase backend: Argon2id derives a key-encryption key from a passphrase;
//! AES-256-GCM wraps the DEK with the encryption context as associated data.

use std::path::PathBuf;

use super::{EncryptionContext, KeyBackend, KeyDescription, KeyError, WrappedDek};
use crate::crypto::{Dek, SecretBytes};

/// Argon2id cost, recorded in each passphrase keyslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub time: u32,
    pub lanes: u32,
}

impl Default for Argon2Params {
    fn default() -> Self {
        Argon2Params {
            memory_kib: 262_144,
            time: 3,
            lanes: 2,
        }
    }
}

/// Where a passphrase comes from. Never argv.
pub enum PassphraseSource {
    File(PathBuf),
    Fd(i32),
    Prompt,
}

impl PassphraseSource {
    /// Reads the passphrase (a trailing newline is stripped for files/fds).
    /// `confirm` asks twice when prompting (used on create).
    pub fn read(&self, _confirm: bool) -> Result<SecretBytes, KeyError> {
        todo!()
    }
}

/// Wraps/unwraps with a passphrase-derived key.
pub struct PassphraseBackend {
    _passphrase: SecretBytes,
    _params: Argon2Params,
}

impl PassphraseBackend {
    pub fn new(_passphrase: SecretBytes, _params: Argon2Params) -> PassphraseBackend {
        todo!()
    }
}

#[async_trait::async_trait]
impl KeyBackend for PassphraseBackend {
    fn kind(&self) -> &'static str {
        "passphrase"
    }
    async fn describe_key(&self, _key: Option<&str>) -> Result<KeyDescription, KeyError> {
        todo!()
    }
    async fn generate_dek(
        &self,
        _key: Option<&str>,
        _ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError> {
        todo!()
    }
    async fn wrap(
        &self,
        _key: Option<&str>,
        _dek: &Dek,
        _ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        todo!()
    }
    async fn unwrap(
        &self,
        _wrapped: &WrappedDek,
        _expected: &EncryptionContext,
    ) -> Result<Dek, KeyError> {
        todo!()
    }
}
