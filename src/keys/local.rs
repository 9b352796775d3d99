//! The local keystore backend: a directory of AES-256 master keys, wrapping DEKs
//! with AES-256-GCM and the encryption context as associated data.

use std::path::{Path, PathBuf};

use super::{EncryptionContext, KeyBackend, KeyDescription, KeyError, WrappedDek};
use crate::crypto::Dek;

/// `--keystore DIR`, else `CRYPTVOL_KEYSTORE`, else `/var/lib/cryptvol/keys` for root and
/// `$XDG_DATA_HOME/cryptvol/keys` (or `~/.local/share/cryptvol/keys`) otherwise.
pub fn default_keystore_dir() -> PathBuf {
    todo!()
}

/// Public facts about a local master key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub aliases: Vec<String>,
    pub created_at: String,
    pub default: bool,
}

/// A keystore directory (mode 0700, key files 0600; refuses one others can read).
pub struct LocalKeystore {
    _dir: PathBuf,
}

impl LocalKeystore {
    /// Opens (creating if `create` and missing) the keystore at `dir`.
    pub fn open(_dir: &Path, _create: bool) -> Result<LocalKeystore, KeyError> {
        todo!()
    }
    pub fn dir(&self) -> &Path {
        todo!()
    }
    /// Creates a new master key, optionally with an alias `alias/NAME`.
    pub fn create_key(&self, _alias: Option<&str>) -> Result<KeyInfo, KeyError> {
        todo!()
    }
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyError> {
        todo!()
    }
    /// Resolves `None` (the default key, created on first use), a key id, or `alias/NAME`.
    pub fn resolve(&self, _key: Option<&str>) -> Result<String, KeyError> {
        todo!()
    }
}

#[async_trait::async_trait]
impl KeyBackend for LocalKeystore {
    fn kind(&self) -> &'static str {
        "local"
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
