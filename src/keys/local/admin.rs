//! Administration: the audited change runner every administrative operation goes
//! through, creating keys, and listing and describing them.

use std::collections::BTreeMap;

use crate::keys::audit::{AuditEvent, AuditWriter};
use crate::keys::{EncryptionContext, KeyDescription, KeyError, KeyState, Permission, Principal};

use super::aliases::{label, validate_alias};
use super::files::ks_err;
use super::record::{MasterKey, MaterialVersion};
use super::{LocalKeystore, KIND};

/// Public facts about a local master key (`cryptvol key list`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub aliases: Vec<String>,
    pub state: KeyState,
    pub created_at: String,
    /// When a key pending deletion is destroyed.
    pub deletion_date: Option<String>,
    /// Whether this is the local default key (`alias/cryptvol/default`).
    pub default: bool,
}

/// Everything `cryptvol key describe` shows (never key material).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyDetails {
    pub key_id: String,
    pub aliases: Vec<String>,
    pub state: KeyState,
    pub created_at: String,
    pub deletion_date: Option<String>,
    pub default: bool,
    pub creator: String,
    /// The version new wraps use.
    pub current_material_version: u32,
    pub material_versions: Vec<MaterialVersion>,
    /// Permission → principals (user names, or `uid:N`); root is always allowed.
    pub policy: BTreeMap<String, Vec<String>>,
}

impl LocalKeystore {
    pub(in crate::keys) fn audit_write(
        &self,
        writer: &AuditWriter,
        operation: &str,
        key_id: &str,
        ctx: Option<&EncryptionContext>,
        outcome: Result<(), &KeyError>,
        detail: Option<&str>,
    ) -> Result<(), KeyError> {
        writer.write(&AuditEvent {
            operation,
            backend: KIND,
            key_id,
            context: ctx,
            principal: &self.principal,
            outcome,
            detail,
        })
    }

    /// Runs an administrative change under the lock and audits it: `f` gets the loaded
    /// key (with material) after the administer permission was checked, changes it and
    /// returns a value and an audit detail; the key file is then rewritten.
    pub(super) fn admin<T>(
        &self,
        operation: &str,
        key: &str,
        f: impl FnOnce(&mut MasterKey) -> Result<(T, Option<String>), KeyError>,
    ) -> Result<T, KeyError> {
        let writer = self.audit.open()?;
        let mut key_label = label(Some(key));
        let result = (|| {
            // Checked before locking too: a principal who may only read the keystore gets
            // "access denied", not a lock error.
            let id = self.resolve_existing(key)?;
            key_label = id.clone();
            let meta = self.load_key(&id, false)?.meta;
            self.authorize(&meta, Permission::Administer, operation)?;
            let _lock = self.lock()?;
            let id = self.resolve_existing(key)?;
            key_label = id.clone();
            let mut master = self.load_key(&id, true)?;
            self.authorize(&master.meta, Permission::Administer, operation)?;
            let (value, detail) = f(&mut master)?;
            self.write_key(&master)?;
            Ok((value, detail))
        })();
        match result {
            Ok((value, detail)) => {
                self.audit_write(
                    &writer,
                    operation,
                    &key_label,
                    None,
                    Ok(()),
                    detail.as_deref(),
                )
                .map_err(|e| done_but_unaudited(operation, &key_label, e))?;
                Ok(value)
            }
            Err(e) => {
                let _ = self.audit_write(&writer, operation, &key_label, None, Err(&e), None);
                Err(e)
            }
        }
    }

    /// Creates a new master key, optionally with an alias `alias/NAME`. The creator may
    /// do everything with it (and root always may).
    pub fn create_key(&self, alias: Option<&str>) -> Result<KeyInfo, KeyError> {
        let writer = self.audit.open()?;
        let result = (|| {
            if let Some(alias) = alias {
                validate_alias(alias).map_err(|reason| ks_err(&self.dir, reason))?;
            }
            let _lock = self.lock()?;
            let mut index = self.load_index()?;
            if let Some(alias) = alias {
                if let Some(existing) = index.aliases.get(alias) {
                    return Err(ks_err(
                        &self.dir,
                        format!("alias {alias} already names key {existing}; choose another alias"),
                    ));
                }
            }
            let meta = self.write_new_key()?;
            if let Some(alias) = alias {
                index.aliases.insert(alias.to_string(), meta.key_id.clone());
                self.save_index(&index)?;
            }
            Ok(KeyInfo {
                aliases: index.aliases_of(&meta.key_id),
                default: false,
                key_id: meta.key_id,
                state: meta.state,
                created_at: meta.created_at,
                deletion_date: None,
            })
        })();
        let detail = alias.map(|a| format!("alias={a}"));
        match &result {
            Ok(info) => self
                .audit_write(
                    &writer,
                    "create-key",
                    &info.key_id,
                    None,
                    Ok(()),
                    detail.as_deref(),
                )
                .map_err(|e| done_but_unaudited("create-key", &info.key_id, e))?,
            Err(e) => {
                let _ =
                    self.audit_write(&writer, "create-key", "", None, Err(e), detail.as_deref());
            }
        }
        result
    }

    /// All keys, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let index = self.load_index()?;
        let mut keys = Vec::new();
        for id in self.key_ids()? {
            let meta = self.load_key(&id, false)?.meta;
            keys.push(KeyInfo {
                aliases: index.aliases_of(&meta.key_id),
                default: index.default_key.as_deref() == Some(meta.key_id.as_str()),
                deletion_date: meta.deletion_date(),
                key_id: meta.key_id,
                state: meta.state,
                created_at: meta.created_at,
            });
        }
        keys.sort_by(|a, b| (&a.created_at, &a.key_id).cmp(&(&b.created_at, &b.key_id)));
        Ok(keys)
    }

    /// Everything about one key (any state; never material).
    pub fn describe(&self, key: &str) -> Result<KeyDetails, KeyError> {
        let id = self.resolve_existing(key)?;
        let meta = self.load_key(&id, false)?.meta;
        let index = self.load_index()?;
        let mut policy = BTreeMap::new();
        for p in Permission::ALL {
            let names: Vec<String> = meta
                .policy
                .set(p)
                .iter()
                .map(|uid| Principal::from_uid(*uid).short())
                .collect();
            policy.insert(p.as_str().to_string(), names);
        }
        Ok(KeyDetails {
            aliases: index.aliases_of(&id),
            default: index.default_key.as_deref() == Some(id.as_str()),
            deletion_date: meta.deletion_date(),
            creator: Principal::from_uid(meta.creator_uid).short(),
            current_material_version: meta.current_version(),
            material_versions: meta.versions.clone(),
            policy,
            key_id: id,
            state: meta.state,
            created_at: meta.created_at,
        })
    }

    pub(super) fn describe_blocking(&self, key: Option<&str>) -> Result<KeyDescription, KeyError> {
        let key_id = self.resolve(key)?;
        let meta = self.load_key(&key_id, false)?.meta;
        let index = self.load_index()?;
        Ok(KeyDescription {
            backend: KIND.to_string(),
            aliases: index.aliases_of(&key_id),
            key_id,
            state: meta.state,
            created_at: meta.created_at,
        })
    }
}

/// The error for a change that was made but whose audit record could not be written.
pub(in crate::keys) fn done_but_unaudited(operation: &str, key: &str, e: KeyError) -> KeyError {
    match e {
        KeyError::Audit { path, reason } => KeyError::Audit {
            path,
            reason: format!("{operation} of key {key} was done, but {reason}"),
        },
        other => other,
    }
}
