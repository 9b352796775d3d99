//! The local keystore backend: a directory of AES-256 master keys, wrapping DEKs
//! with AES-256-GCM and the encryption context as associated data.
//!
//! # On-disk format (format version 1)
//!
//! ```text
//! DIR/                     mode 0700
//!   .lock                  0600, empty; flock(LOCK_EX) serialises every change
//!   aliases.json           0600, the alias table and the default key
//!   mk-<32 hex>.json       0600, one file per master key
//!   .tmp-*                 transient files of an interrupted atomic write (ignored)
//! ```
//!
//! Key ids are `mk-` followed by 32 lowercase hex digits (128 random bits), e.g.
//! `mk-3f0c5e9a1b2d4c6e8f00112233445566`; a key is stored in `DIR/<key id>.json`:
//!
//! ```json
//! { "version": 1, "key_id": "mk-…", "spec": "AES_256", "state": "Enabled",
//!   "created_at": "2025-01-31T12:00:00Z", "material": "<base64 of 32 random bytes>" }
//! ```
//!
//! `state` is `Enabled`, `Disabled` or `PendingDeletion` (only `Enabled` is written
//! today; a key in another state is refused for wrap and unwrap with `KeyUnusable`).
//! `aliases.json` maps each alias to a key id and names the default key:
//!
//! ```json
//! { "version": 1, "default_key": "mk-…",
//!   "aliases": { "alias/cryptvol/default": "mk-…", "alias/db": "mk-…" } }
//! ```
//!
//! Every file is written atomically (temporary file created 0600, fsync, rename, fsync
//! of the directory). A file with a `version` newer than this code knows is refused.
//! Alias names follow AWS KMS: `alias/NAME` with NAME made of ASCII letters, digits,
//! `/`, `_` and `-`, at most 256 characters; `alias/aws/` is refused and `alias/cryptvol/`
//! is reserved for the aliases cryptvol itself manages (the default key is
//! `alias/cryptvol/default`, created on first use like AWS's `aws/ebs`).
//!
//! Wrapped DEKs carry `backend = "local"`, the resolved key id (never an alias), the
//! context, and `params = {"alg": "AES-256-GCM", "version": "1"}`. The blob is
//! `nonce(12) ‖ ciphertext(64) ‖ tag(16)`; the associated data binds the backend kind,
//! the key id and the canonical context.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use zeroize::Zeroizing;

use super::seal;
use super::{EncryptionContext, KeyBackend, KeyDescription, KeyError, KeyState, WrappedDek};
use crate::crypto::{CryptoError, Dek, SecretBytes};

/// Alias of the default master key, created on first use.
pub const DEFAULT_KEY_ALIAS: &str = "alias/cryptvol/default";

const KIND: &str = "local";
const FORMAT_VERSION: u32 = 1;
const KEY_ID_PREFIX: &str = "mk-";
const KEY_ID_HEX_LEN: usize = 32;
const MASTER_KEY_LEN: usize = 32;
const KEY_SPEC: &str = "AES_256";
const LOCK_FILE: &str = ".lock";
const ALIASES_FILE: &str = "aliases.json";
const TMP_PREFIX: &str = ".tmp-";
/// Keystore files are tiny; refuse to read anything larger than this.
const MAX_FILE_LEN: u64 = 1 << 20;
const MAX_ALIAS_NAME_LEN: usize = 256;
const ROOT_KEYSTORE_DIR: &str = "/var/lib/cryptvol/keys";

/// `--keystore DIR`, else `CRYPTVOL_KEYSTORE`, else `/var/lib/cryptvol/keys` for root and
/// `$XDG_DATA_HOME/cryptvol/keys` (or `~/.local/share/cryptvol/keys`) otherwise.
///
/// (`--keystore` is handled by the CLI, which calls [`LocalKeystore::open`] directly.)
pub fn default_keystore_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .or_else(passwd_home);
    keystore_dir_for(
        std::env::var_os("CRYPTVOL_KEYSTORE"),
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_DATA_HOME"),
        home,
    )
}

fn passwd_home() -> Option<OsString> {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.dir.into_os_string())
}

/// The keystore directory from the environment values (pure, for testing).
/// Empty values count as unset; a relative `XDG_DATA_HOME` is ignored (XDG spec).
fn keystore_dir_for(
    cryptvol_keystore: Option<OsString>,
    euid_is_root: bool,
    xdg_data_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    if let Some(dir) = cryptvol_keystore.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if euid_is_root {
        return PathBuf::from(ROOT_KEYSTORE_DIR);
    }
    if let Some(xdg) = xdg_data_home.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join("cryptvol").join("keys");
    }
    match home.filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/cryptvol/keys"),
        None => PathBuf::from(ROOT_KEYSTORE_DIR),
    }
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
///
/// The handle holds only the path: every operation reads the files afresh, so several
/// handles and processes can share one keystore (changes are serialised by flock).
#[derive(Debug, Clone)]
pub struct LocalKeystore {
    dir: PathBuf,
}

/// Metadata of a key file (no material).
struct KeyMeta {
    key_id: String,
    state: KeyState,
    created_at: String,
}

/// A loaded master key. No Debug/Clone; the material zeroizes on drop.
struct MasterKey {
    meta: KeyMeta,
    material: SecretBytes,
}

#[derive(serde::Serialize)]
struct KeyFileOut<'a> {
    version: u32,
    key_id: &'a str,
    spec: &'a str,
    state: &'a KeyState,
    created_at: &'a str,
    material: &'a str,
}

#[derive(serde::Deserialize)]
struct KeyFileIn<'a> {
    version: u32,
    key_id: String,
    spec: String,
    state: KeyState,
    created_at: String,
    /// Borrowed from the (zeroizing) file buffer, so never copied.
    material: &'a str,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AliasIndex {
    version: u32,
    #[serde(default)]
    default_key: Option<String>,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
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
    fn aliases_of(&self, key_id: &str) -> Vec<String> {
        self.aliases
            .iter()
            .filter(|(_, id)| id.as_str() == key_id)
            .map(|(alias, _)| alias.clone())
            .collect()
    }
}

fn ks_err(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Keystore {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> KeyError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return ks_err(
            path,
            format!("{what}: it is a symbolic link; keystore files must be regular files"),
        );
    }
    ks_err(path, format!("{what}: {e}"))
}

/// Refuses a mode that lets group or others at the file or directory.
fn check_private_mode(path: &Path, mode: u32, is_dir: bool) -> Result<(), KeyError> {
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let (what, fix) = if is_dir {
        ("keystore directory", "700")
    } else {
        ("keystore file", "600")
    };
    Err(ks_err(
        path,
        format!(
            "the {what} has mode {:04o}, so group or others can reach master keys; \
             restrict it with `chmod {fix} {}`",
            mode & 0o7777,
            path.display()
        ),
    ))
}

/// `mk-` followed by exactly 32 lowercase hex digits.
fn is_key_id(s: &str) -> bool {
    s.strip_prefix(KEY_ID_PREFIX).is_some_and(|hex| {
        hex.len() == KEY_ID_HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Checks an alias a user asks for (`alias/NAME`, AWS KMS rules, reserved prefixes).
fn validate_alias(alias: &str) -> Result<(), String> {
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

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch.
fn rfc3339_utc(secs: u64) -> String {
    fn is_leap(y: u64) -> bool {
        (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
    }
    const DAYS_PER_400_YEARS: u64 = 146_097;
    let time_of_day = secs % 86_400;
    let mut days = secs / 86_400;
    let mut year = 1970 + 400 * (days / DAYS_PER_400_YEARS);
    days %= DAYS_PER_400_YEARS;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let february = if is_leap(year) { 29 } else { 28 };
    let month_lengths = [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1;
    for len in month_lengths {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
        days + 1,
        time_of_day / 3600,
        time_of_day / 60 % 60,
        time_of_day % 60
    )
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339_utc(secs)
}

/// Describes a JSON error without echoing file content (it could be key material).
fn json_err(path: &Path, what: &str, e: &serde_json::Error) -> KeyError {
    ks_err(
        path,
        format!(
            "{what} is not valid ({:?} error at line {} column {}); restore it from a backup",
            e.classify(),
            e.line(),
            e.column()
        ),
    )
}

fn newer_format(path: &Path, version: u32) -> KeyError {
    ks_err(
        path,
        format!(
            "written in keystore format version {version}, newer than this cryptvol supports \
             ({FORMAT_VERSION}); upgrade cryptvol"
        ),
    )
}

/// Reads a keystore file (no symlinks, private mode, bounded size) into a zeroizing
/// buffer. `None` if it does not exist.
fn read_private_file(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "cannot open", e)),
    };
    let md = file
        .metadata()
        .map_err(|e| io_err(path, "cannot inspect", e))?;
    if !md.is_file() {
        return Err(ks_err(path, "not a regular file"));
    }
    check_private_mode(path, md.mode(), false)?;
    if md.len() > MAX_FILE_LEN {
        return Err(ks_err(path, "file is too large to be a keystore file"));
    }
    // Capacity covers the whole file so reading never reallocates (which would leave
    // unzeroized copies of key material behind).
    let mut buf = Zeroizing::new(Vec::with_capacity(md.len() as usize + 1));
    (&mut file)
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_err(path, "cannot read", e))?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(ks_err(path, "file is too large to be a keystore file"));
    }
    Ok(Some(buf))
}

fn decode_material(path: &Path, b64: &str) -> Result<SecretBytes, KeyError> {
    let bad = || {
        ks_err(
            path,
            format!("key material is not {MASTER_KEY_LEN} bytes of base64; restore the key file from a backup"),
        )
    };
    let mut buf = Zeroizing::new([0u8; MASTER_KEY_LEN + 16]);
    // The base64 error itself is not shown: it could quote material bytes.
    let n = STANDARD
        .decode_slice(b64.as_bytes(), &mut buf[..])
        .map_err(|_| bad())?;
    if n != MASTER_KEY_LEN {
        return Err(bad());
    }
    let mut material = Vec::with_capacity(MASTER_KEY_LEN);
    material.extend_from_slice(&buf[..MASTER_KEY_LEN]);
    Ok(SecretBytes::new(material))
}

impl LocalKeystore {
    /// Opens (creating if `create` and missing) the keystore at `dir`.
    ///
    /// Refuses a directory or keystore file that group or others can access, and any
    /// symbolic link inside the keystore.
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
        };
        keystore.check_entries()?;
        Ok(keystore)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a new master key, optionally with an alias `alias/NAME`.
    pub fn create_key(&self, alias: Option<&str>) -> Result<KeyInfo, KeyError> {
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
            created_at: meta.created_at,
        })
    }

    /// All keys, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, KeyError> {
        let index = self.load_index()?;
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !is_key_id(id) {
                continue;
            }
            let meta = self.load_key(id, false)?.meta;
            keys.push(KeyInfo {
                aliases: index.aliases_of(&meta.key_id),
                default: index.default_key.as_deref() == Some(meta.key_id.as_str()),
                key_id: meta.key_id,
                created_at: meta.created_at,
            });
        }
        keys.sort_by(|a, b| (&a.created_at, &a.key_id).cmp(&(&b.created_at, &b.key_id)));
        Ok(keys)
    }

    /// Resolves `None` (the default key, created on first use), a key id, or `alias/NAME`
    /// to an existing key id.
    pub fn resolve(&self, key: Option<&str>) -> Result<String, KeyError> {
        let id = match key {
            None => self.default_key_id()?,
            Some(alias) if alias.starts_with("alias/") => self
                .load_index()?
                .aliases
                .get(alias)
                .cloned()
                .ok_or_else(|| not_found(alias))?,
            Some(id) if is_key_id(id) => id.to_string(),
            Some(other) => return Err(not_found(&other.escape_debug().to_string())),
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
        match fs::symlink_metadata(self.key_path(&id)) {
            Ok(_) => Ok(id),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(not_found(&id)),
            Err(e) => Err(io_err(&self.key_path(&id), "cannot inspect", e)),
        }
    }

    fn key_path(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}.json"))
    }

    /// Refuses symlinks and non-private files anywhere in the keystore directory.
    fn check_entries(&self) -> Result<(), KeyError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
            let path = entry.path();
            let md = fs::symlink_metadata(&path).map_err(|e| io_err(&path, "cannot inspect", e))?;
            if md.file_type().is_symlink() {
                return Err(ks_err(
                    &path,
                    "is a symbolic link; keystore files must be regular files",
                ));
            }
            check_private_mode(&path, md.mode(), md.is_dir())?;
        }
        Ok(())
    }

    /// Takes the keystore's exclusive lock (released when the returned guard drops).
    fn lock(&self) -> Result<Flock<File>, KeyError> {
        let path = self.dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_err(&path, "cannot open the keystore lock file", e))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(guard) => return Ok(guard),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(ks_err(&path, format!("cannot lock the keystore: {e}"))),
            }
        }
    }

    fn load_index(&self) -> Result<AliasIndex, KeyError> {
        let path = self.dir.join(ALIASES_FILE);
        let Some(buf) = read_private_file(&path)? else {
            return Ok(AliasIndex::default());
        };
        let index: AliasIndex =
            serde_json::from_slice(&buf).map_err(|e| json_err(&path, "the alias table", &e))?;
        if index.version > FORMAT_VERSION {
            return Err(newer_format(&path, index.version));
        }
        Ok(index)
    }

    /// Writes the alias table; the caller holds the lock.
    fn save_index(&self, index: &AliasIndex) -> Result<(), KeyError> {
        let path = self.dir.join(ALIASES_FILE);
        let mut json = serde_json::to_vec_pretty(index)
            .map_err(|e| ks_err(&path, format!("cannot encode the alias table: {e}")))?;
        json.push(b'\n');
        self.write_private_file(ALIASES_FILE, &json)
    }

    /// Loads a key file; with `material` false the material is not decoded.
    fn load_key(&self, key_id: &str, material: bool) -> Result<MasterKey, KeyError> {
        let path = self.key_path(key_id);
        let buf = read_private_file(&path)?.ok_or_else(|| not_found(key_id))?;
        let file: KeyFileIn<'_> =
            serde_json::from_slice(&buf).map_err(|e| json_err(&path, "the key file", &e))?;
        if file.version > FORMAT_VERSION {
            return Err(newer_format(&path, file.version));
        }
        if file.key_id != key_id {
            return Err(ks_err(
                &path,
                format!(
                    "the file holds key {:?}, not {key_id}; restore it from a backup",
                    file.key_id.escape_debug().to_string()
                ),
            ));
        }
        if file.spec != KEY_SPEC {
            return Err(ks_err(
                &path,
                format!(
                    "unsupported key spec {:?} (expected {KEY_SPEC})",
                    file.spec.escape_debug().to_string()
                ),
            ));
        }
        let material = if material {
            decode_material(&path, file.material)?
        } else {
            SecretBytes::new(Vec::new())
        };
        Ok(MasterKey {
            meta: KeyMeta {
                key_id: file.key_id,
                state: file.state,
                created_at: file.created_at,
            },
            material,
        })
    }

    /// Loads a key for a cryptographic operation: it must be Enabled.
    fn load_usable_key(&self, key_id: &str) -> Result<MasterKey, KeyError> {
        let key = self.load_key(key_id, true)?;
        if key.meta.state != KeyState::Enabled {
            return Err(KeyError::KeyUnusable {
                key: key_id.to_string(),
                state: format!("{:?}", key.meta.state),
            });
        }
        Ok(key)
    }

    /// The default key's id, creating the key (under the lock) if there is none yet.
    fn default_key_id(&self) -> Result<String, KeyError> {
        if let Some(id) = self.load_index()?.default_key {
            return Ok(id);
        }
        let _lock = self.lock()?;
        // Re-read under the lock: another process or thread may have created it.
        let mut index = self.load_index()?;
        if let Some(id) = &index.default_key {
            return Ok(id.clone());
        }
        let id = match index.aliases.get(DEFAULT_KEY_ALIAS) {
            Some(id) => id.clone(),
            None => self.write_new_key()?.key_id,
        };
        index
            .aliases
            .insert(DEFAULT_KEY_ALIAS.to_string(), id.clone());
        index.default_key = Some(id.clone());
        self.save_index(&index)?;
        Ok(id)
    }

    /// Generates and stores a new Enabled master key; the caller holds the lock.
    fn write_new_key(&self) -> Result<KeyMeta, KeyError> {
        let key_id = format!("{KEY_ID_PREFIX}{}", seal::random_hex(KEY_ID_HEX_LEN / 2)?);
        let mut material = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        getrandom::fill(&mut material[..]).map_err(|e| CryptoError::Rng(e.to_string()))?;
        let mut b64 = Zeroizing::new([0u8; 2 * MASTER_KEY_LEN]);
        let n = STANDARD
            .encode_slice(&material[..], &mut b64[..])
            .map_err(|e| ks_err(&self.dir, format!("cannot encode key material: {e}")))?;
        let b64 = std::str::from_utf8(&b64[..n])
            .map_err(|e| ks_err(&self.dir, format!("cannot encode key material: {e}")))?;
        let meta = KeyMeta {
            key_id,
            state: KeyState::Enabled,
            created_at: now_rfc3339(),
        };
        let out = KeyFileOut {
            version: FORMAT_VERSION,
            key_id: &meta.key_id,
            spec: KEY_SPEC,
            state: &meta.state,
            created_at: &meta.created_at,
            material: b64,
        };
        // Preallocated well beyond the ~250 bytes needed, so no reallocation copies the
        // material into memory that would not be zeroized.
        let mut json = Zeroizing::new(Vec::with_capacity(2048));
        serde_json::to_writer_pretty(&mut *json, &out)
            .map_err(|e| ks_err(&self.dir, format!("cannot encode the key file: {e}")))?;
        json.push(b'\n');
        self.write_private_file(&format!("{}.json", meta.key_id), &json)?;
        Ok(meta)
    }

    /// Atomically replaces `DIR/name`: temp file (0600), fsync, rename, fsync of the dir.
    fn write_private_file(&self, name: &str, bytes: &[u8]) -> Result<(), KeyError> {
        let final_path = self.dir.join(name);
        let tmp_path = self
            .dir
            .join(format!("{TMP_PREFIX}{name}-{}", seal::random_hex(8)?));
        let result = (|| -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp_path)?;
            // The umask cannot add bits, but make the mode exact regardless.
            file.set_permissions(Permissions::from_mode(0o600))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&tmp_path, &final_path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp_path);
            return Err(io_err(&final_path, "cannot write", e));
        }
        Ok(())
    }

    fn describe_blocking(&self, key: Option<&str>) -> Result<KeyDescription, KeyError> {
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

fn not_found(key: &str) -> KeyError {
    KeyError::NotFound {
        backend: KIND.to_string(),
        key: key.to_string(),
    }
}

fn create_keystore_dir(dir: &Path) -> Result<(), KeyError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| io_err(parent, "cannot create the keystore's parent directory", e))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            fs::set_permissions(dir, Permissions::from_mode(0o700))
                .map_err(|e| io_err(dir, "cannot set the keystore mode", e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                // Best effort: make the new directory entry durable.
                let _ = File::open(parent).and_then(|f| f.sync_all());
            }
            Ok(())
        }
        // Created concurrently by someone else: fine, the caller checks its mode.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir, "cannot create the keystore directory", e)),
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
        let wrapped = self.wrap(key, &dek, ctx).await?;
        Ok((dek, wrapped))
    }

    async fn wrap(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        let keystore = self.clone();
        let key = key.map(str::to_owned);
        let master = seal::blocking(move || {
            let key_id = keystore.resolve(key.as_deref())?;
            keystore.load_usable_key(&key_id)
        })
        .await?;
        let key_id = master.meta.key_id.clone();
        let aad = seal::associated_data(KIND, &key_id, ctx);
        let blob = seal::seal(master.material.expose(), &aad, dek)?;
        Ok(WrappedDek {
            backend: KIND.to_string(),
            key_id,
            blob,
            context: ctx.clone(),
            params: seal::base_params(),
        })
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
    ) -> Result<Dek, KeyError> {
        seal::check_kind_and_alg(wrapped, KIND)?;
        seal::check_context(wrapped, expected)?;
        if !is_key_id(&wrapped.key_id) {
            return Err(KeyError::Malformed(format!(
                "{:?} is not a local master key id",
                wrapped.key_id.escape_debug().to_string()
            )));
        }
        let keystore = self.clone();
        let key_id = wrapped.key_id.clone();
        let master = seal::blocking(move || keystore.load_usable_key(&key_id)).await?;
        let aad = seal::associated_data(KIND, &wrapped.key_id, &wrapped.context);
        seal::open(
            master.material.expose(),
            &aad,
            &wrapped.blob,
            &wrapped.key_id,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Barrier};

    fn ctx(uuid: &uuid::Uuid) -> EncryptionContext {
        EncryptionContext::for_volume(uuid)
    }

    fn new_store() -> (tempfile::TempDir, LocalKeystore) {
        let tmp = tempfile::tempdir().unwrap();
        let ks = LocalKeystore::open(&tmp.path().join("keys"), true).unwrap();
        (tmp, ks)
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn keystore_reason(err: KeyError) -> String {
        match err {
            KeyError::Keystore { reason, .. } => reason,
            other => panic!("expected a Keystore error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn generate_and_unwrap_round_trip() {
        let (_tmp, ks) = new_store();
        let id = ks.create_key(None).unwrap().key_id;
        let vol = uuid::Uuid::new_v4();
        let (dek, wrapped) = ks.generate_dek(Some(&id), &ctx(&vol)).await.unwrap();
        assert_eq!(wrapped.backend, "local");
        assert_eq!(wrapped.key_id, id);
        assert_eq!(wrapped.context, ctx(&vol));
        assert_eq!(
            wrapped.params.get("alg").map(String::as_str),
            Some("AES-256-GCM")
        );
        assert_eq!(wrapped.params.get("version").map(String::as_str), Some("1"));
        assert_eq!(wrapped.blob.len(), 12 + 64 + 16);
        let back = ks.unwrap(&wrapped, &ctx(&vol)).await.unwrap();
        assert_eq!(back.expose(), dek.expose());
    }

    #[tokio::test]
    async fn wrap_existing_dek_round_trip() {
        let (_tmp, ks) = new_store();
        let vol = uuid::Uuid::new_v4();
        let dek = Dek::generate().unwrap();
        let wrapped = ks.wrap(None, &dek, &ctx(&vol)).await.unwrap();
        let back = ks.unwrap(&wrapped, &ctx(&vol)).await.unwrap();
        assert_eq!(back.expose(), dek.expose());
    }

    #[tokio::test]
    async fn two_deks_under_one_key_differ() {
        let (_tmp, ks) = new_store();
        let vol = uuid::Uuid::new_v4();
        let (a, wa) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
        let (b, wb) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
        assert_eq!(wa.key_id, wb.key_id);
        assert_ne!(a.expose(), b.expose());
        assert_ne!(wa.blob, wb.blob);
    }

    #[tokio::test]
    async fn context_of_another_volume_is_refused() {
        let (_tmp, ks) = new_store();
        let (vol_a, vol_b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (_dek, wrapped) = ks.generate_dek(None, &ctx(&vol_a)).await.unwrap();
        let err = ks.unwrap(&wrapped, &ctx(&vol_b)).await.err().unwrap();
        match &err {
            KeyError::ContextMismatch { expected, found } => {
                assert_eq!(expected, &format!("volume {vol_b}"));
                assert_eq!(found, &format!("volume {vol_a}"));
            }
            other => panic!("expected ContextMismatch, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&vol_a.to_string()) && msg.contains(&vol_b.to_string()),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn edited_context_fails_to_authenticate() {
        let (_tmp, ks) = new_store();
        let (vol_a, vol_b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (_dek, mut wrapped) = ks.generate_dek(None, &ctx(&vol_a)).await.unwrap();
        wrapped.context = ctx(&vol_b);
        let err = ks.unwrap(&wrapped, &ctx(&vol_b)).await.err().unwrap();
        assert!(
            matches!(err, KeyError::WrongKey { ref key } if key == &wrapped.key_id),
            "{err:?}"
        );
        assert!(err.to_string().contains(&wrapped.key_id));
    }

    #[tokio::test]
    async fn blob_moved_to_another_key_fails() {
        let (_tmp, ks) = new_store();
        let k1 = ks.create_key(None).unwrap().key_id;
        let k2 = ks.create_key(None).unwrap().key_id;
        let vol = uuid::Uuid::new_v4();
        let (_dek, mut wrapped) = ks.generate_dek(Some(&k1), &ctx(&vol)).await.unwrap();
        wrapped.key_id = k2.clone();
        let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
        assert!(
            matches!(err, KeyError::WrongKey { ref key } if key == &k2),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn tampered_blob_and_wrong_backend() {
        let (_tmp, ks) = new_store();
        let vol = uuid::Uuid::new_v4();
        let (_dek, wrapped) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();

        let mut flipped = wrapped.clone();
        flipped.blob[30] ^= 0x80;
        let err = ks.unwrap(&flipped, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::WrongKey { .. }), "{err:?}");

        let mut short = wrapped.clone();
        short.blob.truncate(40);
        let err = ks.unwrap(&short, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");

        let mut other = wrapped.clone();
        other.backend = "passphrase".into();
        let err = ks.unwrap(&other, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");

        let mut alg = wrapped.clone();
        alg.params.insert("alg".into(), "AES-128-CBC".into());
        let err = ks.unwrap(&alg, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");

        let mut path = wrapped.clone();
        path.key_id = "../../etc/passwd".into();
        let err = ks.unwrap(&path, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn unknown_key_id_is_not_found() {
        let (_tmp, ks) = new_store();
        let (_tmp2, other) = new_store();
        let vol = uuid::Uuid::new_v4();
        let (_dek, wrapped) = other.generate_dek(None, &ctx(&vol)).await.unwrap();
        let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(&wrapped.key_id), "{err}");

        let missing = "mk-00000000000000000000000000000000";
        let err = ks.resolve(Some(missing)).err().unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(missing), "{err}");
        let err = ks
            .generate_dek(Some(missing), &ctx(&vol))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains(missing), "{err}");

        let err = ks.resolve(Some("alias/nope")).err().unwrap();
        assert!(err.to_string().contains("alias/nope"), "{err}");
        let err = ks.resolve(Some("garbage")).err().unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
        let err = ks.describe_key(Some("alias/nope")).await.err().unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn alias_resolves_and_is_never_stored() {
        let (_tmp, ks) = new_store();
        let info = ks.create_key(Some("alias/db-keys/prod_1")).unwrap();
        assert_eq!(info.aliases, vec!["alias/db-keys/prod_1".to_string()]);
        assert!(!info.default);
        assert!(is_key_id(&info.key_id), "{}", info.key_id);
        assert_eq!(
            ks.resolve(Some("alias/db-keys/prod_1")).unwrap(),
            info.key_id
        );
        assert_eq!(ks.resolve(Some(&info.key_id)).unwrap(), info.key_id);

        let vol = uuid::Uuid::new_v4();
        let (_d, wrapped) = ks
            .generate_dek(Some("alias/db-keys/prod_1"), &ctx(&vol))
            .await
            .unwrap();
        assert_eq!(wrapped.key_id, info.key_id);

        let desc = ks.describe_key(Some("alias/db-keys/prod_1")).await.unwrap();
        assert_eq!(desc.backend, "local");
        assert_eq!(desc.key_id, info.key_id);
        assert_eq!(desc.aliases, vec!["alias/db-keys/prod_1".to_string()]);
        assert_eq!(desc.state, KeyState::Enabled);
        assert_eq!(desc.created_at, info.created_at);
    }

    #[test]
    fn duplicate_alias_refused() {
        let (_tmp, ks) = new_store();
        let first = ks.create_key(Some("alias/app")).unwrap();
        let reason = keystore_reason(ks.create_key(Some("alias/app")).err().unwrap());
        assert!(
            reason.contains("alias/app") && reason.contains(&first.key_id),
            "{reason}"
        );
        assert_eq!(ks.list_keys().unwrap().len(), 1);
    }

    #[test]
    fn invalid_aliases_refused() {
        let (_tmp, ks) = new_store();
        let long = format!("alias/{}", "a".repeat(MAX_ALIAS_NAME_LEN + 1));
        for bad in [
            "app",
            "alias/",
            "alias/has space",
            "alias/dot.name",
            "alias/aws/ebs",
            "alias/cryptvol/default",
            long.as_str(),
        ] {
            let err = ks.create_key(Some(bad)).err();
            assert!(
                matches!(err, Some(KeyError::Keystore { .. })),
                "{bad}: {err:?}"
            );
        }
        let ok = format!("alias/{}", "a".repeat(MAX_ALIAS_NAME_LEN));
        assert!(ks.create_key(Some(&ok)).is_ok());
        assert_eq!(ks.list_keys().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn default_key_created_once() {
        let (_tmp, ks) = new_store();
        let a = ks.resolve(None).unwrap();
        let b = ks.resolve(None).unwrap();
        assert_eq!(a, b);
        let vol = uuid::Uuid::new_v4();
        let (_d, wrapped) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
        assert_eq!(wrapped.key_id, a);
        assert_eq!(ks.resolve(Some(DEFAULT_KEY_ALIAS)).unwrap(), a);
        let keys = ks.list_keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].default);
        assert_eq!(keys[0].aliases, vec![DEFAULT_KEY_ALIAS.to_string()]);
        // A reopened handle sees the same default.
        let again = LocalKeystore::open(ks.dir(), false).unwrap();
        assert_eq!(again.resolve(None).unwrap(), a);
    }

    #[test]
    fn concurrent_default_creation_yields_one_key() {
        let (_tmp, ks) = new_store();
        let dir = ks.dir().to_path_buf();
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let dir = dir.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let ks = LocalKeystore::open(&dir, false).unwrap();
                    barrier.wait();
                    ks.resolve(None).unwrap()
                })
            })
            .collect();
        let ids: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
        let keys = ks.list_keys().unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].default);
    }

    #[test]
    fn concurrent_same_alias_creation_yields_one_key() {
        let (_tmp, ks) = new_store();
        let dir = ks.dir().to_path_buf();
        let threads = 6;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let dir = dir.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let ks = LocalKeystore::open(&dir, false).unwrap();
                    barrier.wait();
                    ks.create_key(Some("alias/shared")).is_ok()
                })
            })
            .collect();
        let successes = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(successes, 1);
        assert_eq!(ks.list_keys().unwrap().len(), 1);
    }

    #[test]
    fn keystore_created_private() {
        let (tmp, ks) = new_store();
        assert_eq!(ks.dir(), tmp.path().join("keys"));
        assert_eq!(mode(ks.dir()), 0o700);
        let id = ks.resolve(None).unwrap();
        ks.create_key(Some("alias/x")).unwrap();
        assert_eq!(mode(&ks.key_path(&id)), 0o600);
        assert_eq!(mode(&ks.dir().join(ALIASES_FILE)), 0o600);
        assert_eq!(mode(&ks.dir().join(LOCK_FILE)), 0o600);
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(ks.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(TMP_PREFIX)),
            "{names:?}"
        );
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn key_file_format() {
        let (_tmp, ks) = new_store();
        let info = ks.create_key(None).unwrap();
        let text = fs::read_to_string(ks.key_path(&info.key_id)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["key_id"], info.key_id.as_str());
        assert_eq!(v["state"], "Enabled");
        assert_eq!(v["spec"], "AES_256");
        assert_eq!(v["created_at"], info.created_at.as_str());
        let material = STANDARD.decode(v["material"].as_str().unwrap()).unwrap();
        assert_eq!(material.len(), 32);
        assert_eq!(info.created_at.len(), 20, "{}", info.created_at);
        assert!(info.created_at.ends_with('Z'));
    }

    #[test]
    fn group_readable_keystore_refused() {
        let (_tmp, ks) = new_store();
        fs::set_permissions(ks.dir(), Permissions::from_mode(0o755)).unwrap();
        for create in [false, true] {
            let reason = keystore_reason(LocalKeystore::open(ks.dir(), create).err().unwrap());
            assert!(reason.contains("chmod 700"), "{reason}");
            assert!(reason.contains("0755"), "{reason}");
        }
    }

    #[tokio::test]
    async fn group_readable_key_file_refused() {
        let (_tmp, ks) = new_store();
        let id = ks.resolve(None).unwrap();
        let path = ks.key_path(&id);
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let err = LocalKeystore::open(ks.dir(), false).err().unwrap();
        match err {
            KeyError::Keystore { path: p, reason } => {
                assert_eq!(p, path.display().to_string());
                assert!(reason.contains("chmod 600"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // An already open handle refuses it at use too.
        let vol = uuid::Uuid::new_v4();
        let err = ks.generate_dek(None, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::Keystore { .. }), "{err:?}");
    }

    #[test]
    fn symlinked_key_file_refused() {
        let (tmp, ks) = new_store();
        let target = tmp.path().join("elsewhere.json");
        fs::write(&target, b"{}").unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o600)).unwrap();
        let link = ks.dir().join("mk-0123456789abcdef0123456789abcdef.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let reason = keystore_reason(LocalKeystore::open(ks.dir(), false).err().unwrap());
        assert!(reason.contains("symbolic link"), "{reason}");
        let reason = keystore_reason(
            ks.load_key("mk-0123456789abcdef0123456789abcdef", true)
                .err()
                .unwrap(),
        );
        assert!(reason.contains("symbolic link"), "{reason}");
    }

    #[test]
    fn missing_keystore_refused_without_create() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nope");
        let err = LocalKeystore::open(&dir, false).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("cryptvol key create"), "{msg}");
        assert!(!dir.exists());
    }

    #[test]
    fn newer_format_and_corrupt_files_refused() {
        let (_tmp, ks) = new_store();
        let id = ks.create_key(None).unwrap().key_id;
        let path = ks.key_path(&id);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"version\": 1", "\"version\": 9")).unwrap();
        let reason = keystore_reason(ks.load_key(&id, true).err().unwrap());
        assert!(reason.contains("upgrade cryptvol"), "{reason}");

        fs::write(&path, b"{ not json").unwrap();
        let reason = keystore_reason(ks.load_key(&id, true).err().unwrap());
        assert!(reason.contains("not valid"), "{reason}");

        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["material"] = "AAAA".into();
        fs::write(&path, v.to_string()).unwrap();
        let reason = keystore_reason(ks.load_key(&id, true).err().unwrap());
        assert!(reason.contains("32 bytes"), "{reason}");
    }

    #[tokio::test]
    async fn disabled_key_is_unusable() {
        let (_tmp, ks) = new_store();
        let id = ks.resolve(None).unwrap();
        let vol = uuid::Uuid::new_v4();
        let (_d, wrapped) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
        let path = ks.key_path(&id);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"Enabled\"", "\"Disabled\"")).unwrap();
        let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
        assert!(matches!(err, KeyError::KeyUnusable { .. }), "{err:?}");
        assert!(err.to_string().contains(&id), "{err}");
        let desc = ks.describe_key(None).await.unwrap();
        assert_eq!(desc.state, KeyState::Disabled);
    }

    #[test]
    fn keystore_dir_from_environment() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            keystore_dir_for(os("/srv/ks"), true, os("/x"), os("/home/u")),
            PathBuf::from("/srv/ks")
        );
        assert_eq!(
            keystore_dir_for(None, true, os("/x"), os("/home/u")),
            PathBuf::from("/var/lib/cryptvol/keys")
        );
        assert_eq!(
            keystore_dir_for(os(""), false, os("/data"), os("/home/u")),
            PathBuf::from("/data/cryptvol/keys")
        );
        assert_eq!(
            keystore_dir_for(None, false, os("relative"), os("/home/u")),
            PathBuf::from("/home/u/.local/share/cryptvol/keys")
        );
        assert_eq!(
            keystore_dir_for(None, false, None, os("/home/u")),
            PathBuf::from("/home/u/.local/share/cryptvol/keys")
        );
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_709_164_800), "2024-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
        // Past one 400-year cycle: 2370-03-01.
        assert_eq!(rfc3339_utc(12_627_878_400), "2370-03-01T00:00:00Z");
    }

    #[test]
    fn key_id_format() {
        assert!(is_key_id("mk-0123456789abcdef0123456789abcdef"));
        assert!(!is_key_id("mk-0123456789ABCDEF0123456789abcdef"));
        assert!(!is_key_id("mk-0123456789abcdef0123456789abcde"));
        assert!(!is_key_id("mk-../../../../../../../etc/passwd"));
        assert!(!is_key_id("0123456789abcdef0123456789abcdef"));
    }
}
