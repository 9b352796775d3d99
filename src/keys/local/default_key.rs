//! The default key: the local default key (`alias/cryptvol/default`, created on first
//! use) and the configured default key reference in `settings.json`.

use crate::keys::{KeyError, KeyRef, Permission};

use super::admin::done_but_unaudited;
use super::files::{json_err, newer_format, read_private_file};
use super::{LocalKeystore, FORMAT_VERSION};

/// Alias of the local default key, created on first use.
pub const DEFAULT_KEY_ALIAS: &str = "alias/cryptvol/default";
const SETTINGS_FILE: &str = "settings.json";

/// The keystore settings (`settings.json`).
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Settings {
    pub(super) version: u32,
    /// The key reference used when none is given (`cryptvol key set-default`).
    #[serde(default)]
    pub(super) default_key: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            version: FORMAT_VERSION,
            default_key: None,
        }
    }
}

impl LocalKeystore {
    /// The configured default key reference (`cryptvol key set-default`), if any.
    pub fn default_key_ref(&self) -> Result<Option<String>, KeyError> {
        Ok(self.load_settings()?.default_key)
    }

    /// Sets (or with `None` resets) the default key reference. A local key must exist
    /// and the caller must hold the administer permission on it; other backends are
    /// checked by the caller ([`crate::keys::KeyService::set_default_key`]).
    pub fn set_default_key_ref(&self, reference: Option<&KeyRef>) -> Result<(), KeyError> {
        let writer = self.audit.open()?;
        let text = reference.map(KeyRef::to_string);
        let mut key_label = text.clone().unwrap_or_default();
        let result = (|| {
            let _lock = self.lock()?;
            if let Some(KeyRef::Local(Some(k))) = reference {
                let id = self.resolve_existing(k)?;
                key_label = id.clone();
                let meta = self.load_key(&id, false)?.meta;
                self.authorize(&meta, Permission::Administer, "set-default")?;
            }
            let mut settings = self.load_settings()?;
            settings.default_key = text.clone();
            self.save_settings(&settings)
        })();
        let detail = format!(
            "default_key={}",
            text.as_deref().unwrap_or("(reset: the local default key)")
        );
        match &result {
            Ok(()) => self
                .audit_write(
                    &writer,
                    "set-default",
                    &key_label,
                    None,
                    Ok(()),
                    Some(&detail),
                )
                .map_err(|e| done_but_unaudited("set-default", &key_label, e))?,
            Err(e) => {
                let _ = self.audit_write(
                    &writer,
                    "set-default",
                    &key_label,
                    None,
                    Err(e),
                    Some(&detail),
                );
            }
        }
        result
    }

    pub(super) fn load_settings(&self) -> Result<Settings, KeyError> {
        let path = self.dir.join(SETTINGS_FILE);
        let Some(buf) = read_private_file(&path)? else {
            return Ok(Settings::default());
        };
        let s: Settings = serde_json::from_slice(&buf.bytes)
            .map_err(|e| json_err(&path, "the settings file", &e))?;
        if s.version > FORMAT_VERSION {
            return Err(newer_format(&path, s.version));
        }
        Ok(s)
    }

    pub(super) fn save_settings(&self, s: &Settings) -> Result<(), KeyError> {
        self.write_json(SETTINGS_FILE, s)
    }

    /// The local default key's id, creating the key (under the lock) if there is none.
    pub(super) fn default_key_id(&self) -> Result<String, KeyError> {
        if let Some(id) = self.load_index()?.default_key {
            return Ok(id);
        }
        let writer = self.audit.open()?;
        let _lock = self.lock()?;
        // Re-read under the lock: another process or thread may have created it.
        let mut index = self.load_index()?;
        if let Some(id) = &index.default_key {
            return Ok(id.clone());
        }
        let (id, created) = match index.aliases.get(DEFAULT_KEY_ALIAS) {
            Some(id) => (id.clone(), false),
            None => (self.write_new_key()?.key_id, true),
        };
        index
            .aliases
            .insert(DEFAULT_KEY_ALIAS.to_string(), id.clone());
        index.default_key = Some(id.clone());
        self.save_index(&index)?;
        if created {
            let detail =
                format!("alias={DEFAULT_KEY_ALIAS} (the local default key, created on first use)");
            self.audit_write(&writer, "create-key", &id, None, Ok(()), Some(&detail))?;
        }
        Ok(id)
    }
}
