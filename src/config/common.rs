//! The settings of the configuration file that every command uses, not only `serve`:
//! the keystore directory, the key audit log, the default key, what bare key references
//! name and the snapshot store.
//!
//! Which file: `cryptvol --config FILE COMMAND`, else `$CRYPTVOL_CONFIG`, else
//! [`DEFAULT_CONFIG_PATH`] when it exists (no file at all is fine: built-in defaults).
//! Each setting is taken with the precedence flag > environment variable > file >
//! built-in default; the callers in `cli` apply the first two, this module the file.

use std::path::{Path, PathBuf};

use super::file::ConfigFile;
use super::{load, ConfigError, DEFAULT_CONFIG_PATH};
use crate::keys::{BareRefs, KeyRef};

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "CRYPTVOL_CONFIG";

/// The file's settings for every command; all `None`/default without a file.
#[derive(Debug, Default, Clone)]
pub struct CommonSettings {
    /// The file they were read from.
    pub path: Option<PathBuf>,
    /// `keystore`, relative to the file's directory.
    pub keystore: Option<PathBuf>,
    /// `audit_log`, relative to the file's directory.
    pub audit_log: Option<PathBuf>,
    /// `[keys] default_key`, checked to be a key reference.
    pub default_key: Option<String>,
    /// `[keys] bare_key_refs`.
    pub bare_key_refs: Option<BareRefs>,
    /// `snapshot_store`; a relative directory is relative to the file's directory.
    pub snapshot_store: Option<String>,
}

/// The configuration file in effect: `flag` (which clap has already filled from
/// `$CRYPTVOL_CONFIG`), else the default path when a file is there.
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| {
        let default = Path::new(DEFAULT_CONFIG_PATH);
        default.exists().then(|| default.to_path_buf())
    })
}

/// Reads the file at `path` (if any) and returns its settings for every command.
pub fn load_common(path: Option<&Path>) -> Result<CommonSettings, ConfigError> {
    match path {
        None => Ok(CommonSettings::default()),
        Some(p) => common_settings(p, &load(p)?),
    }
}

/// The settings of a parsed file read from `path`.
fn common_settings(path: &Path, file: &ConfigFile) -> Result<CommonSettings, ConfigError> {
    let base = path.parent().unwrap_or(Path::new(""));
    let invalid =
        |what: String| ConfigError::Invalid(format!("config file {}: {what}", path.display()));
    let keys = file.keys.as_ref();
    let bare_key_refs = keys
        .and_then(|k| k.bare_key_refs.as_deref())
        .map(|s| {
            s.parse::<BareRefs>()
                .map_err(|e| invalid(format!("[keys] bare_key_refs: {e}")))
        })
        .transpose()?;
    let default_key = keys.and_then(|k| k.default_key.clone());
    if let Some(k) = &default_key {
        KeyRef::parse_with(k, bare_key_refs.unwrap_or_default())
            .map_err(|e| invalid(format!("[keys] default_key: {e}")))?;
    }
    Ok(CommonSettings {
        path: Some(path.to_path_buf()),
        keystore: file.keystore.as_ref().map(|p| base.join(p)),
        audit_log: file.audit_log.as_ref().map(|p| base.join(p)),
        default_key,
        bare_key_refs,
        snapshot_store: file.snapshot_store.as_ref().map(|s| store_spec(base, s)),
    })
}

/// A store spec from the file: URLs as written, a relative directory joined to `base`.
fn store_spec(base: &Path, spec: &str) -> String {
    if spec.contains("://") || Path::new(spec).is_absolute() {
        spec.to_string()
    } else {
        base.join(spec).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<CommonSettings, ConfigError> {
        let path = Path::new("/etc/cv/cryptvol.toml");
        common_settings(path, &super::super::parse(text, path)?)
    }

    #[test]
    fn reads_every_common_setting_relative_to_the_file() {
        let s = settings(
            "keystore = \"keys\"\naudit_log = \"/var/log/a.jsonl\"\nsnapshot_store = \"snaps\"\n\
             [keys]\ndefault_key = \"alias/db\"\nbare_key_refs = \"aws-kms\"\n",
        )
        .unwrap();
        assert_eq!(s.keystore.unwrap(), Path::new("/etc/cv/keys"));
        assert_eq!(s.audit_log.unwrap(), Path::new("/var/log/a.jsonl"));
        assert_eq!(s.snapshot_store.unwrap(), "/etc/cv/snaps");
        assert_eq!(s.default_key.unwrap(), "alias/db");
        assert_eq!(s.bare_key_refs, Some(BareRefs::AwsKms));
        let s = settings("snapshot_store = \"s3://b/p\"\n").unwrap();
        assert_eq!(s.snapshot_store.unwrap(), "s3://b/p");
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let e = settings("[keys]\nbare_key_refs = \"kms\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bare_key_refs") && e.contains("aws-kms"), "{e}");
        let e = settings("[keys]\ndefault_key = \"nonsense\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_key"), "{e}");
        let e = settings("[keys]\ndefault = \"alias/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `default`"), "{e}");
    }
}
