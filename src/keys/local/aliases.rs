//! Aliases and key references: the alias table (`aliases.json`), alias names, and
//! resolving a key id, an alias or the default to an existing key.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;

use crate::keys::{KeyError, Permission};

use super::admin::done_but_unaudited;
use super::default_key::DEFAULT_KEY_ALIAS;
use super::files::{io_err, ks_err, newer_format};
use super::record::is_key_id;
use super::{LocalKeystore, FORMAT_VERSION, KIND};

pub(super) const ALIASES_FILE: &str = "aliases.json";
pub(super) const MAX_ALIAS_NAME_LEN: usize = 256;

/// The alias table (`aliases.json`): each alias's key id and the local default key.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct AliasIndex {
    pub(super) version: u32,
    #[serde(default)]
    pub(super) default_key: Option<String>,
    #[serde(default)]
    pub(super) aliases: BTreeMap<String, String>,
}

impl Default for AliasIndex {
    fn default() -> Self {
        AliasIndex {
            version: FORMAT_VERSION,
            default_key: None,
            aliases: BTreeMap::new(),
        }
    }
}

impl AliasIndex {
    pub(super) fn aliases_of(&self, key_id: &str) -> Vec<String> {
        self.aliases
            .iter()
            .filter(|(_, id)| id.as_str() == key_id)
            .map(|(alias, _)| alias.clone())
            .collect()
    }
}

/// Checks an alias a user asks for (`alias/NAME`, AWS KMS rules, reserved prefixes).
pub(super) fn validate_alias(alias: &str) -> Result<(), String> {
    let Some(name) = alias.strip_prefix("alias/") else {
        return Err(format!(
            "invalid alias {:?}: aliases are written alias/NAME",
            alias.escape_debug().to_string()
        ));
    };
    if name.is_empty() || name.len() > MAX_ALIAS_NAME_LEN {
        return Err(format!(
            "invalid alias: NAME in alias/NAME must be 1 to {MAX_ALIAS_NAME_LEN} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
    {
        return Err(format!(
            "invalid alias {:?}: NAME may contain only letters, digits, '/', '_' and '-'",
            alias.escape_debug().to_string()
        ));
    }
    if alias.starts_with("alias/aws/") {
        return Err(format!(
            "invalid alias {alias}: the alias/aws/ prefix is reserved by AWS"
        ));
    }
    if alias.starts_with("alias/cryptvol/") {
        return Err(format!(
            "invalid alias {alias}: the alias/cryptvol/ prefix is reserved for aliases cryptvol manages"
        ));
    }
    Ok(())
}

pub(super) fn not_found(key: &str) -> KeyError {
    KeyError::NotFound {
        backend: KIND.to_string(),
        key: key.to_string(),
    }
}

/// The escaped label of a key reference a user gave (for messages and the audit log).
pub(super) fn label(key: Option<&str>) -> String {
    match key {
        Some(k) => k.escape_debug().to_string(),
        None => DEFAULT_KEY_ALIAS.to_string(),
    }
}

impl LocalKeystore {
    /// Resolves `None` (the local default key, created on first use), a key id, or
    /// `alias/NAME` to an existing key id.
    pub fn resolve(&self, key: Option<&str>) -> Result<String, KeyError> {
        match key {
            None => {
                let id = self.default_key_id()?;
                self.check_exists(&id)?;
                Ok(id)
            }
            Some(k) => self.resolve_existing(k),
        }
    }

    /// Resolves a key id or `alias/NAME` (also with a `local:` prefix) to an existing key.
    pub(super) fn resolve_existing(&self, key: &str) -> Result<String, KeyError> {
        let key = key.strip_prefix("local:").unwrap_or(key);
        let id = if key.starts_with("alias/") {
            self.load_index()?
                .aliases
                .get(key)
                .cloned()
                .ok_or_else(|| not_found(&label(Some(key))))?
        } else if is_key_id(key) {
            key.to_string()
        } else {
            return Err(not_found(&label(Some(key))));
        };
        if !is_key_id(&id) {
            return Err(ks_err(
                &self.dir.join(ALIASES_FILE),
                format!(
                    "names {:?}, which is not a key id",
                    id.escape_debug().to_string()
                ),
            ));
        }
        self.check_exists(&id)?;
        Ok(id)
    }

    pub(super) fn check_exists(&self, id: &str) -> Result<(), KeyError> {
        match fs::symlink_metadata(self.key_path(id)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(not_found(id)),
            Err(e) => Err(io_err(&self.key_path(id), "cannot inspect", e)),
        }
    }

    /// Points a new alias at a key (administer permission on the key).
    pub fn alias_add(&self, alias: &str, key: &str) -> Result<String, KeyError> {
        validate_alias(alias).map_err(|reason| ks_err(&self.dir, reason))?;
        self.alias_change("alias-add", alias, Some(key), |index, id| {
            if let Some(existing) = index.aliases.get(alias) {
                return Err(ks_err(
                    &self.dir,
                    format!(
                        "alias {alias} already names key {existing}; use `cryptvol key alias \
                         retarget` to point it elsewhere"
                    ),
                ));
            }
            index.aliases.insert(alias.to_string(), id.to_string());
            Ok(())
        })
    }

    /// Points an existing alias at another key (administer permission on both keys).
    pub fn alias_retarget(&self, alias: &str, key: &str) -> Result<String, KeyError> {
        validate_alias(alias).map_err(|reason| ks_err(&self.dir, reason))?;
        self.alias_change("alias-retarget", alias, Some(key), |index, id| {
            if !index.aliases.contains_key(alias) {
                return Err(not_found(alias));
            }
            index.aliases.insert(alias.to_string(), id.to_string());
            Ok(())
        })
    }

    /// Removes an alias (administer permission on the key it names). Returns that key.
    pub fn alias_remove(&self, alias: &str) -> Result<String, KeyError> {
        validate_alias(alias).map_err(|reason| ks_err(&self.dir, reason))?;
        self.alias_change("alias-remove", alias, None, |index, _| {
            index.aliases.remove(alias);
            Ok(())
        })
    }

    /// Shared body of the alias changes. `key` is the new target (None for removal);
    /// the administer permission is checked on the new target and on the current one.
    fn alias_change(
        &self,
        operation: &str,
        alias: &str,
        key: Option<&str>,
        change: impl FnOnce(&mut AliasIndex, &str) -> Result<(), KeyError>,
    ) -> Result<String, KeyError> {
        let writer = self.audit.open()?;
        let mut key_label = key.map(|k| label(Some(k))).unwrap_or_default();
        let result = (|| {
            if let Some(k) = key {
                // Checked before locking too (see `admin`).
                let id = self.resolve_existing(k)?;
                let meta = self.load_key(&id, false)?.meta;
                self.authorize(&meta, Permission::Administer, operation)?;
            }
            let _lock = self.lock()?;
            let mut index = self.load_index()?;
            let current = index.aliases.get(alias).cloned();
            let target = match key {
                Some(k) => self.resolve_existing(k)?,
                None => current.clone().ok_or_else(|| not_found(alias))?,
            };
            key_label = target.clone();
            for id in [Some(&target), current.as_ref()].into_iter().flatten() {
                if let Ok(master) = self.load_key(id, false) {
                    self.authorize(&master.meta, Permission::Administer, operation)?;
                }
            }
            change(&mut index, &target)?;
            self.save_index(&index)?;
            Ok(target)
        })();
        let detail = format!("alias={alias}");
        match &result {
            Ok(id) => self
                .audit_write(&writer, operation, id, None, Ok(()), Some(&detail))
                .map_err(|e| done_but_unaudited(operation, id, e))?,
            Err(e) => {
                let _ =
                    self.audit_write(&writer, operation, &key_label, None, Err(e), Some(&detail));
            }
        }
        result
    }

    pub(super) fn load_index(&self) -> Result<AliasIndex, KeyError> {
        let path = self.dir.join(ALIASES_FILE);
        let index: AliasIndex = self
            .read_json(ALIASES_FILE, "the alias table")?
            .unwrap_or_default();
        if index.version > FORMAT_VERSION {
            return Err(newer_format(&path, index.version));
        }
        Ok(index)
    }

    /// Writes the alias table; the caller holds the lock.
    pub(super) fn save_index(&self, index: &AliasIndex) -> Result<(), KeyError> {
        self.write_json(ALIASES_FILE, index)
    }
}
