//! The local keystore backend: a directory of AES-256 master keys with AWS KMS-like key
//! states, rotation, aliases and per-key policies, wrapping DEKs with AES-256-GCM and the
//! encryption context as associated data.
//!
//! # On-disk format (keystore format version 2)
//!
//! ```text
//! DIR/                     mode 0700 (or 0750/2750: shared read-only with a group)
//!   .lock                  empty; flock(LOCK_EX) serialises every change
//!   aliases.json           the alias table and the local default key
//!   settings.json          keystore settings: the configured default key reference
//!   exec-backends.json     registered exec backends (programs)
//!   mk-<32 hex>.json       one file per master key
//!   audit.jsonl            the default audit log (see `audit.rs`)
//!   .tmp-*                 transient files of an interrupted atomic write (removed by purge)
//! ```
//!
//! Files are mode 0600 (0640 when the directory is group-readable). Key ids are `mk-`
//! followed by 32 lowercase hex digits (128 random bits); a key is stored in
//! `DIR/<key id>.json`:
//!
//! ```json
//! { "version": 2, "key_id": "mk-…", "spec": "AES_256", "state": "Enabled",
//!   "created_at": "2025-01-31T12:00:00Z", "creator_uid": 0,
//!   "deletion_date": "2025-03-02T12:00:00Z", "deletion_unix": 1740916800,
//!   "policy": { "generate": [1000], "unwrap": [1000, 998], "rewrap": [1000], "administer": [1000] },
//!   "materials": [ { "version": 1, "created_at": "…", "material": "<base64 of 32 bytes>" },
//!                  { "version": 2, "created_at": "…", "material": "…" } ] }
//! ```
//!
//! `state` is `Enabled`, `Disabled` or `PendingDeletion`; the deletion fields are present
//! only in `PendingDeletion` (`deletion_unix` is authoritative). `policy` lists, per
//! permission, the uids allowed; root (uid 0) is always allowed. New wraps use the highest
//! material version; every version is kept so that older keyslots still unwrap.
//! Version-1 files (a single `"material"`, no policy) are still read: their material is
//! version 1 and their policy gives everything to the file's owner.
//!
//! `aliases.json` maps each alias to a key id and names the local default key:
//!
//! ```json
//! { "version": 1, "default_key": "mk-…",
//!   "aliases": { "alias/cryptvol/default": "mk-…", "alias/db": "mk-…" } }
//! ```
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of the
//! directory) under the lock. A file with a `version` newer than this code knows is
//! refused. Alias names follow AWS KMS: `alias/NAME` with NAME made of ASCII letters,
//! digits, `/`, `_` and `-`, at most 256 characters; `alias/aws/` is refused and
//! `alias/cryptvol/` is reserved for the aliases cryptvol itself manages (the local
//! default key is `alias/cryptvol/default`, created on first use like AWS's `aws/ebs`).
//!
//! Wrapped DEKs carry `backend = "local"`, the resolved key id (never an alias), the
//! context, and `params = {"alg": "AES-256-GCM", "version": "1", "material_version": "N"}`
//! (a keyslot without `material_version` was wrapped by version 1). The blob is
//! `nonce(12) ‖ ciphertext(64) ‖ tag(16)`; the associated data binds the backend kind,
//! the key id and the canonical context.
//!
//! # Modules
//!
//! - `directory`: where the keystore is, creating it, entry modes, the lock.
//! - `files`: reading, atomically writing and shredding keystore files; error helpers.
//! - `record`: the key file format, key ids, loading and writing keys.
//! - `aliases`: the alias table and resolving key references.
//! - `default_key`: the local default key and the configured default key reference.
//! - `policy`: key policies, authorization, grant and revoke.
//! - `states`: enable, disable, deletion, rotation, purging expired keys.
//! - `admin`: the audited change runner, creating, listing and describing keys.
//! - `usage`: wrapping and unwrapping data keys.

mod admin;
mod aliases;
mod default_key;
mod directory;
mod files;
#[doc(hidden)]
pub(crate) mod fuzz_hooks;
mod policy;
mod record;
mod states;
mod usage;

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::crypto::Dek;
use crate::keys::audit::AuditLog;
use crate::keys::seal;
use crate::keys::{
    EncryptionContext, KeyBackend, KeyDescription, KeyError, KeyOp, Principal, WrappedDek,
};

use directory::{check_private_mode, create_keystore_dir};
use files::io_err;

pub use admin::{KeyDetails, KeyInfo};
pub use default_key::DEFAULT_KEY_ALIAS;
pub use directory::default_keystore_dir;
pub use policy::KeyPolicy;
pub use record::MaterialVersion;
pub use states::{MAX_DELETION_DAYS, MIN_DELETION_DAYS};

pub(super) use admin::done_but_unaudited;
pub(super) use files::ks_err;

const KIND: &str = "local";
/// Format version of the other JSON files.
const FORMAT_VERSION: u32 = 1;

/// A keystore directory (mode 0700, key files 0600; see the module documentation).
///
/// The handle holds only the path, the acting principal and the audit log: every
/// operation reads the files afresh, so several handles and processes can share one
/// keystore (changes are serialised by flock).
#[derive(Debug, Clone)]
pub struct LocalKeystore {
    dir: PathBuf,
    principal: Principal,
    audit: AuditLog,
}

impl LocalKeystore {
    /// Opens (creating if `create` and missing) the keystore at `dir`, acting as the
    /// process's effective user and auditing into `DIR/audit.jsonl`.
    ///
    /// Refuses a directory or keystore file that others can access or the group can
    /// write, and any symbolic link inside the keystore.
    pub fn open(dir: &Path, create: bool) -> Result<LocalKeystore, KeyError> {
        match fs::metadata(dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(ks_err(dir, "exists but is not a directory")),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !create {
                    return Err(ks_err(
                        dir,
                        "no keystore exists here; create one with `cryptvol key create` \
                         (or any `cryptvol create`), or point --keystore / CRYPTVOL_KEYSTORE \
                         at an existing keystore",
                    ));
                }
                create_keystore_dir(dir)?;
            }
            Err(e) => return Err(io_err(dir, "cannot inspect the keystore directory", e)),
        }
        let md = fs::metadata(dir).map_err(|e| io_err(dir, "cannot inspect", e))?;
        check_private_mode(dir, md.mode(), true)?;
        let keystore = LocalKeystore {
            dir: dir.to_path_buf(),
            principal: Principal::current(),
            audit: AuditLog::in_keystore(dir),
        };
        keystore.check_entries()?;
        Ok(keystore)
    }

    /// Audits into `log` instead of `DIR/audit.jsonl`.
    pub fn with_audit_log(mut self, log: AuditLog) -> LocalKeystore {
        self.audit = log;
        self
    }

    /// Acts as another principal (tests of the policy).
    #[cfg(test)]
    pub(crate) fn with_principal(mut self, principal: Principal) -> LocalKeystore {
        self.principal = principal;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }
}

#[async_trait::async_trait]
impl KeyBackend for LocalKeystore {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn describe_key(&self, key: Option<&str>) -> Result<KeyDescription, KeyError> {
        let keystore = self.clone();
        let key = key.map(str::to_owned);
        seal::blocking(move || keystore.describe_blocking(key.as_deref())).await
    }

    async fn generate_dek(
        &self,
        key: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError> {
        let dek = Dek::generate()?;
        let wrapped = self.wrap_as(key, &dek, ctx, KeyOp::Generate).await?;
        Ok((dek, wrapped))
    }

    async fn wrap(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        self.wrap_as(key, dek, ctx, KeyOp::Wrap).await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
    ) -> Result<Dek, KeyError> {
        self.unwrap_as(wrapped, expected, KeyOp::Unwrap).await
    }
}

#[cfg(test)]
mod tests;
