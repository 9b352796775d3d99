//! The settings every command takes from the configuration file (keystore, audit log,
//! default key, bare key references, snapshot store), loaded once at start-up, and how
//! the command-line flags and environment variables override them: flag > environment
//! variable > file > built-in default (see `config::common`).

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Result;

use crate::config::{self, CommonSettings};
use crate::keys::{BareRefs, KeyError, KeyRef};

/// The environment variable of `--bare-key-refs`.
pub(super) const BARE_KEY_REFS_ENV: &str = "CRYPTVOL_BARE_KEY_REFS";

/// The settings in effect (set once by [`init`]).
struct Defaults {
    file: CommonSettings,
    /// `--bare-key-refs` / `$CRYPTVOL_BARE_KEY_REFS` (already merged by clap).
    bare_flag: Option<BareRefs>,
}

static DEFAULTS: OnceLock<Defaults> = OnceLock::new();

/// Loads the configuration file named by `--config`/`$CRYPTVOL_CONFIG` (else the default
/// path, when it exists) and records the top-level flags.
pub(super) fn init(config_flag: Option<PathBuf>, bare_flag: Option<BareRefs>) -> Result<()> {
    let file = config::load_common(config::config_path(config_flag).as_deref())?;
    let _ = DEFAULTS.set(Defaults { file, bare_flag });
    Ok(())
}

fn file() -> Option<&'static CommonSettings> {
    DEFAULTS.get().map(|d| &d.file)
}

/// Whether environment variable `name` is set to something.
fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The keystore directory: `flag`, else `$CRYPTVOL_KEYSTORE` (`None`: the keys layer
/// reads it), else the file's, else `None` (the built-in default).
pub(super) fn keystore(flag: Option<PathBuf>) -> Option<PathBuf> {
    if flag.is_some() || env_set("CRYPTVOL_KEYSTORE") {
        return flag;
    }
    file().and_then(|f| f.keystore.clone())
}

/// The audit log: `flag`, else the file's, else `None` (audit.jsonl in the keystore).
pub(super) fn audit_log(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| file().and_then(|f| f.audit_log.clone()))
}

/// The snapshot store: `flag` (clap merged `$CRYPTVOL_SNAPSHOT_STORE`), else the file's,
/// else `None` (the built-in default).
pub(super) fn snapshot_store(flag: Option<String>) -> Option<String> {
    flag.or_else(|| file().and_then(|f| f.snapshot_store.clone()))
}

/// The file's default key for new volumes (`--key` wins; without either, the key set
/// with `key set-default`, else the local default key).
pub(super) fn default_key() -> Option<&'static str> {
    file().and_then(|f| f.default_key.as_deref())
}

/// What bare `alias/NAME` and UUIDs name: flag/env, else the file, else local.
pub(super) fn bare_key_refs() -> BareRefs {
    DEFAULTS
        .get()
        .and_then(|d| d.bare_flag.or(d.file.bare_key_refs))
        .unwrap_or_default()
}

/// A key reference typed by the user, read with the bare-reference setting.
pub(super) fn key_ref(s: &str) -> Result<KeyRef, KeyError> {
    KeyRef::parse_with(s, bare_key_refs())
}

/// The file in effect, for messages.
pub(super) fn config_file() -> Option<&'static std::path::Path> {
    file().and_then(|f| f.path.as_deref())
}
