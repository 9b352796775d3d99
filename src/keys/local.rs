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

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use zeroize::Zeroizing;

use super::audit::{AuditEvent, AuditLog, AuditWriter, AUDIT_FILE};
use super::clock::{now_rfc3339, now_unix, rfc3339_utc};
use super::seal;
use super::{
    EncryptionContext, KeyBackend, KeyDescription, KeyError, KeyOp, KeyRef, KeyState, Permission,
    Principal, WrappedDek,
};
use crate::crypto::{CryptoError, Dek, LockedBytes, SecretBytes};

/// Alias of the local default key, created on first use.
pub const DEFAULT_KEY_ALIAS: &str = "alias/cryptvol/default";
/// Shortest deletion waiting period, in days (as AWS KMS).
pub const MIN_DELETION_DAYS: u32 = 7;
/// Longest (and default) deletion waiting period, in days.
pub const MAX_DELETION_DAYS: u32 = 30;

const KIND: &str = "local";
/// Format version written to key files.
const KEY_FORMAT_VERSION: u32 = 2;
/// Format version of the other JSON files.
const FORMAT_VERSION: u32 = 1;
const KEY_ID_PREFIX: &str = "mk-";
const KEY_ID_HEX_LEN: usize = 32;
const MASTER_KEY_LEN: usize = 32;
const KEY_SPEC: &str = "AES_256";
const LOCK_FILE: &str = ".lock";
const ALIASES_FILE: &str = "aliases.json";
const SETTINGS_FILE: &str = "settings.json";
const TMP_PREFIX: &str = ".tmp-";
/// Keystore files are small; refuse to read anything larger than this.
const MAX_FILE_LEN: u64 = 1 << 20;
const MAX_ALIAS_NAME_LEN: usize = 256;
/// Most material versions a key may accumulate through rotation.
const MAX_MATERIAL_VERSIONS: usize = 100;
const ROOT_KEYSTORE_DIR: &str = "/var/lib/cryptvol/keys";
/// Keyslot parameter naming the material version that wrapped the DEK.
const MATERIAL_VERSION_PARAM: &str = "material_version";

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

/// One material version of a key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MaterialVersion {
    pub version: u32,
    pub created_at: String,
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

/// Which uids may use a key for what. Root (uid 0) is always allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyPolicy {
    #[serde(default)]
    pub generate: BTreeSet<u32>,
    #[serde(default)]
    pub unwrap: BTreeSet<u32>,
    #[serde(default)]
    pub rewrap: BTreeSet<u32>,
    #[serde(default)]
    pub administer: BTreeSet<u32>,
}

impl KeyPolicy {
    /// The default policy: `uid` may do everything.
    pub fn owner(uid: u32) -> KeyPolicy {
        let one: BTreeSet<u32> = [uid].into_iter().collect();
        KeyPolicy {
            generate: one.clone(),
            unwrap: one.clone(),
            rewrap: one.clone(),
            administer: one,
        }
    }

    fn set(&self, p: Permission) -> &BTreeSet<u32> {
        match p {
            Permission::Generate => &self.generate,
            Permission::Unwrap => &self.unwrap,
            Permission::Rewrap => &self.rewrap,
            Permission::Administer => &self.administer,
        }
    }

    fn set_mut(&mut self, p: Permission) -> &mut BTreeSet<u32> {
        match p {
            Permission::Generate => &mut self.generate,
            Permission::Unwrap => &mut self.unwrap,
            Permission::Rewrap => &mut self.rewrap,
            Permission::Administer => &mut self.administer,
        }
    }

    /// Whether `uid` holds permission `p` (root always does).
    pub fn allows(&self, p: Permission, uid: u32) -> bool {
        uid == 0 || self.set(p).contains(&uid)
    }
}

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

/// Metadata of a key file (no material).
#[derive(Clone)]
struct KeyMeta {
    key_id: String,
    state: KeyState,
    created_at: String,
    deletion_unix: Option<u64>,
    creator_uid: u32,
    policy: KeyPolicy,
    versions: Vec<MaterialVersion>,
}

impl KeyMeta {
    fn current_version(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(1)
    }
    fn deletion_date(&self) -> Option<String> {
        self.deletion_unix.map(rfc3339_utc)
    }
}

/// A loaded master key. No Debug/Clone; the material zeroizes on drop.
struct MasterKey {
    meta: KeyMeta,
    /// (version, material); empty when loaded without material.
    materials: Vec<(u32, SecretBytes)>,
}

impl MasterKey {
    fn material(&self, version: u32) -> Option<&SecretBytes> {
        self.materials
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, m)| m)
    }
}

#[derive(serde::Serialize)]
struct KeyFileOut<'a> {
    version: u32,
    key_id: &'a str,
    spec: &'a str,
    state: &'a KeyState,
    created_at: &'a str,
    creator_uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    deletion_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deletion_unix: Option<u64>,
    policy: &'a KeyPolicy,
    materials: Vec<MaterialOut<'a>>,
}

#[derive(serde::Serialize)]
struct MaterialOut<'a> {
    version: u32,
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
    #[serde(default)]
    creator_uid: Option<u32>,
    #[serde(default)]
    deletion_unix: Option<u64>,
    #[serde(default)]
    policy: Option<KeyPolicy>,
    /// Version 1: the single material, borrowed from the (zeroizing) file buffer.
    #[serde(default, borrow)]
    material: Option<&'a str>,
    #[serde(default, borrow)]
    materials: Vec<MaterialIn<'a>>,
}

#[derive(serde::Deserialize)]
struct MaterialIn<'a> {
    version: u32,
    created_at: String,
    /// Borrowed from the (zeroizing) file buffer, so never copied.
    #[serde(borrow)]
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

#[derive(serde::Serialize, serde::Deserialize)]
struct Settings {
    version: u32,
    /// The key reference used when none is given (`cryptvol key set-default`).
    #[serde(default)]
    default_key: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            version: FORMAT_VERSION,
            default_key: None,
        }
    }
}

pub(super) fn ks_err(path: &Path, reason: impl Into<String>) -> KeyError {
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

/// Refuses a mode that lets others at the file or directory, or lets the group write.
/// A group may read (a keystore shared read-only with a dedicated group; see
/// docs/keys.md).
fn check_private_mode(path: &Path, mode: u32, is_dir: bool) -> Result<(), KeyError> {
    let forbidden = if is_dir { 0o027 } else { 0o037 };
    if mode & forbidden == 0 {
        return Ok(());
    }
    let (what, fix, shared) = if is_dir {
        ("keystore directory", "700", "2750")
    } else {
        ("keystore file", "600", "640")
    };
    Err(ks_err(
        path,
        format!(
            "the {what} has mode {:04o}, so others (or the group, for writing) can reach \
             master keys; restrict it with `chmod {fix} {}` (or {shared} for a keystore \
             shared read-only with a group, see docs/keys.md)",
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
             ({KEY_FORMAT_VERSION}); upgrade cryptvol"
        ),
    )
}

/// A keystore file's content (in locked pages, wiped on drop) and its owner's uid.
struct FileContent {
    bytes: LockedBytes,
    owner: u32,
}

/// Reads a keystore file (no symlinks, private mode, bounded size) into a buffer in
/// locked, non-dumpable pages (a key file holds master key material). `None` if it does
/// not exist.
fn read_private_file(path: &Path) -> Result<Option<FileContent>, KeyError> {
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
    // One byte more than the file: a file that grew meanwhile is noticed, never
    // reallocated into (which would leave copies of key material behind).
    let mut buf = LockedBytes::zeroed(md.len() as usize + 1)?;
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(ks_err(
                path,
                "the file changed while it was read; try again",
            ));
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, "cannot read", e)),
        }
    }
    buf.truncate(len);
    Ok(Some(FileContent {
        bytes: buf,
        owner: md.uid(),
    }))
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

/// Base64 of a material into an exactly sized zeroizing buffer.
fn encode_material(material: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let mut out = Zeroizing::new(vec![
        0u8;
        base64::encoded_len(material.len(), true).unwrap_or(0)
    ]);
    let n = STANDARD
        .encode_slice(material, &mut out[..])
        .map_err(|e| KeyError::Unsupported(format!("cannot encode key material: {e}")))?;
    out.truncate(n);
    Ok(out)
}

fn fresh_material() -> Result<SecretBytes, KeyError> {
    let mut material = vec![0u8; MASTER_KEY_LEN];
    getrandom::fill(&mut material[..]).map_err(|e| CryptoError::Rng(e.to_string()))?;
    Ok(SecretBytes::new(material))
}

fn not_found(key: &str) -> KeyError {
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

/// The unusable-state error for a key that is not Enabled.
fn unusable(meta: &KeyMeta) -> KeyError {
    let id = &meta.key_id;
    let state = match meta.state {
        KeyState::Enabled => "enabled".to_string(),
        KeyState::Disabled => {
            format!("disabled; enable it with `cryptvol key enable {id}` (or use another key)")
        }
        KeyState::PendingDeletion => format!(
            "pending deletion (its material is destroyed after {}); to keep it, run \
             `cryptvol key cancel-deletion {id}` then `cryptvol key enable {id}`",
            meta.deletion_date()
                .unwrap_or_else(|| "the waiting period".into())
        ),
    };
    KeyError::KeyUnusable {
        key: id.clone(),
        state,
    }
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

    // ---------------------------------------------------------------------------------
    // Auditing

    pub(super) fn audit_write(
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
    fn admin<T>(
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

    fn authorize(&self, meta: &KeyMeta, p: Permission, operation: &str) -> Result<(), KeyError> {
        if meta.policy.allows(p, self.principal.uid) {
            return Ok(());
        }
        let operation = if p == Permission::Administer {
            format!("administer ({operation})")
        } else {
            p.as_str().to_string()
        };
        Err(KeyError::AccessDenied {
            key: meta.key_id.clone(),
            operation,
            principal: self.principal.to_string(),
        })
    }

    // ---------------------------------------------------------------------------------
    // Keys, aliases, listing

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

    /// Ids of every key file in the directory.
    fn key_ids(&self) -> Result<Vec<String>, KeyError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
            let name = entry.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                if is_key_id(id) {
                    ids.push(id.to_string());
                }
            }
        }
        Ok(ids)
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
    fn resolve_existing(&self, key: &str) -> Result<String, KeyError> {
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

    fn check_exists(&self, id: &str) -> Result<(), KeyError> {
        match fs::symlink_metadata(self.key_path(id)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(not_found(id)),
            Err(e) => Err(io_err(&self.key_path(id), "cannot inspect", e)),
        }
    }

    fn key_path(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}.json"))
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

    // ---------------------------------------------------------------------------------
    // Key states, rotation, deletion

    /// Enables a disabled key. A key pending deletion must have its deletion cancelled
    /// first (as AWS KMS).
    pub fn enable(&self, key: &str) -> Result<String, KeyError> {
        self.admin("enable", key, |m| {
            match m.meta.state {
                KeyState::PendingDeletion => {
                    return Err(KeyError::InvalidState {
                        key: m.meta.key_id.clone(),
                        reason: format!(
                            "it is pending deletion; cancel the deletion first with `cryptvol \
                             key cancel-deletion {}`",
                            m.meta.key_id
                        ),
                    })
                }
                KeyState::Enabled | KeyState::Disabled => m.meta.state = KeyState::Enabled,
            }
            Ok((m.meta.key_id.clone(), None))
        })
    }

    /// Disables a key: it can no longer wrap or unwrap, so volumes using it cannot be
    /// attached (volumes already attached keep working).
    pub fn disable(&self, key: &str) -> Result<String, KeyError> {
        self.admin("disable", key, |m| {
            match m.meta.state {
                KeyState::PendingDeletion => {
                    return Err(KeyError::InvalidState {
                        key: m.meta.key_id.clone(),
                        reason: "it is pending deletion (already unusable)".into(),
                    })
                }
                KeyState::Enabled | KeyState::Disabled => m.meta.state = KeyState::Disabled,
            }
            Ok((m.meta.key_id.clone(), None))
        })
    }

    /// Schedules the destruction of a key after `days` (7 to 30) days; until then the key
    /// is `PendingDeletion` (unusable). Returns the deletion date.
    pub fn schedule_deletion(&self, key: &str, days: u32) -> Result<String, KeyError> {
        self.admin("schedule-deletion", key, |m| {
            if !(MIN_DELETION_DAYS..=MAX_DELETION_DAYS).contains(&days) {
                return Err(KeyError::Unsupported(format!(
                    "the deletion waiting period must be {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS} days, not {days}"
                )));
            }
            if m.meta.state == KeyState::PendingDeletion {
                return Err(KeyError::InvalidState {
                    key: m.meta.key_id.clone(),
                    reason: format!(
                        "it is already pending deletion (on {})",
                        m.meta.deletion_date().unwrap_or_default()
                    ),
                });
            }
            let at = now_unix() + u64::from(days) * 86_400;
            m.meta.state = KeyState::PendingDeletion;
            m.meta.deletion_unix = Some(at);
            let date = rfc3339_utc(at);
            let detail = format!("days={days} deletion_date={date}");
            Ok((date, Some(detail)))
        })
    }

    /// Cancels a scheduled deletion; the key is left `Disabled` (as AWS KMS).
    pub fn cancel_deletion(&self, key: &str) -> Result<String, KeyError> {
        self.admin("cancel-deletion", key, |m| {
            if m.meta.state != KeyState::PendingDeletion {
                return Err(KeyError::InvalidState {
                    key: m.meta.key_id.clone(),
                    reason: "it is not pending deletion".into(),
                });
            }
            m.meta.state = KeyState::Disabled;
            m.meta.deletion_unix = None;
            Ok((m.meta.key_id.clone(), None))
        })
    }

    /// Adds a new material version; new wraps use it, older versions still unwrap.
    /// Returns the new version number.
    pub fn rotate(&self, key: &str) -> Result<u32, KeyError> {
        self.admin("rotate", key, |m| {
            if m.meta.state != KeyState::Enabled {
                return Err(unusable(&m.meta));
            }
            if m.materials.len() >= MAX_MATERIAL_VERSIONS {
                return Err(KeyError::InvalidState {
                    key: m.meta.key_id.clone(),
                    reason: format!(
                        "it already has {MAX_MATERIAL_VERSIONS} material versions; create a new \
                         key and rekey volumes to it instead"
                    ),
                });
            }
            let version = m.meta.current_version() + 1;
            let created_at = now_rfc3339();
            m.materials.push((version, fresh_material()?));
            m.meta.versions.push(MaterialVersion {
                version,
                created_at,
            });
            Ok((version, Some(format!("material_version={version}"))))
        })
    }

    /// Destroys every key whose deletion waiting period has passed: the key file is
    /// overwritten with zeros and removed, with its aliases (and the default-key settings
    /// naming it). Also removes leftovers of interrupted writes. Returns the deleted ids.
    pub fn purge_expired(&self) -> Result<Vec<String>, KeyError> {
        let writer = self.audit.open()?;
        let _lock = self.lock()?;
        self.remove_stale_tmp_files()?;
        let now = now_unix();
        let mut deleted = Vec::new();
        for id in self.key_ids()? {
            let meta = self.load_key(&id, false)?.meta;
            let due = meta.state == KeyState::PendingDeletion
                && meta.deletion_unix.is_some_and(|t| t <= now);
            if !due {
                continue;
            }
            let result = self.destroy_key(&id);
            let detail = format!("deletion_date={}", meta.deletion_date().unwrap_or_default());
            match result {
                Ok(()) => {
                    self.audit_write(&writer, "delete", &id, None, Ok(()), Some(&detail))
                        .map_err(|e| done_but_unaudited("delete", &id, e))?;
                    deleted.push(id);
                }
                Err(e) => {
                    let _ = self.audit_write(&writer, "delete", &id, None, Err(&e), Some(&detail));
                    return Err(e);
                }
            }
        }
        Ok(deleted)
    }

    /// Overwrites and removes a key file, then drops its aliases and default settings.
    /// The caller holds the lock.
    fn destroy_key(&self, id: &str) -> Result<(), KeyError> {
        let path = self.key_path(id);
        shred_file(&path)?;
        let mut index = self.load_index()?;
        let aliases = index.aliases_of(id);
        for a in &aliases {
            index.aliases.remove(a);
        }
        if index.default_key.as_deref() == Some(id) {
            index.default_key = None;
        }
        self.save_index(&index)?;
        let mut settings = self.load_settings()?;
        if let Some(r) = &settings.default_key {
            let r = r.strip_prefix("local:").unwrap_or(r);
            if r == id || aliases.iter().any(|a| a == r) {
                settings.default_key = None;
                self.save_settings(&settings)?;
            }
        }
        Ok(())
    }

    fn remove_stale_tmp_files(&self) -> Result<(), KeyError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(TMP_PREFIX)) {
                shred_file(&entry.path())?;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Policy

    /// Grants `principal` the `permissions` on a key (administer permission needed).
    pub fn grant(
        &self,
        key: &str,
        principal: &Principal,
        permissions: &[Permission],
    ) -> Result<String, KeyError> {
        let detail = policy_detail(principal, permissions);
        self.admin("grant", key, |m| {
            for p in permissions {
                m.meta.policy.set_mut(*p).insert(principal.uid);
            }
            Ok((m.meta.key_id.clone(), Some(detail)))
        })
    }

    /// Revokes `permissions` on a key from `principal` (administer permission needed).
    pub fn revoke(
        &self,
        key: &str,
        principal: &Principal,
        permissions: &[Permission],
    ) -> Result<String, KeyError> {
        let detail = policy_detail(principal, permissions);
        self.admin("revoke", key, |m| {
            for p in permissions {
                m.meta.policy.set_mut(*p).remove(&principal.uid);
            }
            Ok((m.meta.key_id.clone(), Some(detail)))
        })
    }

    // ---------------------------------------------------------------------------------
    // Settings: the configured default key

    /// The configured default key reference (`cryptvol key set-default`), if any.
    pub fn default_key_ref(&self) -> Result<Option<String>, KeyError> {
        Ok(self.load_settings()?.default_key)
    }

    /// Sets (or with `None` resets) the default key reference. A local key must exist
    /// and the caller must hold the administer permission on it; other backends are
    /// checked by the caller ([`super::KeyService::set_default_key`]).
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

    fn load_settings(&self) -> Result<Settings, KeyError> {
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

    fn save_settings(&self, s: &Settings) -> Result<(), KeyError> {
        self.write_json(SETTINGS_FILE, s)
    }

    // ---------------------------------------------------------------------------------
    // Cryptographic use

    /// Wraps `dek` under `key` (`None`: the local default key) for `op`, checking the
    /// key policy and state, and audits the attempt.
    pub async fn wrap_as(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
        op: KeyOp,
    ) -> Result<WrappedDek, KeyError> {
        let writer = self.audit.open()?;
        let keystore = self.clone();
        let key_owned = key.map(str::to_owned);
        let loaded = seal::blocking(move || {
            Ok(match keystore.resolve(key_owned.as_deref()) {
                Err(e) => Err((None, e)),
                Ok(id) => keystore
                    .load_for_use(&id, op)
                    .map_err(|e| (Some(id.clone()), e)),
            })
        })
        .await;
        let master = match loaded {
            Ok(Ok(m)) => m,
            Ok(Err((id, e))) => {
                let id = id.unwrap_or_else(|| label(key));
                let _ = self.audit_write(&writer, op.name(), &id, Some(ctx), Err(&e), None);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let key_id = master.meta.key_id.clone();
        let version = master.meta.current_version();
        let result = (|| {
            let material = master.material(version).ok_or_else(|| {
                ks_err(
                    &self.key_path(&key_id),
                    "the current material version is missing",
                )
            })?;
            let aad = seal::associated_data(KIND, &key_id, ctx)?;
            let blob = seal::seal(material.expose(), &aad, dek)?;
            let mut params = seal::base_params();
            params.insert(MATERIAL_VERSION_PARAM.to_string(), version.to_string());
            Ok(WrappedDek {
                backend: KIND.to_string(),
                key_id: key_id.clone(),
                blob,
                context: ctx.clone(),
                params,
            })
        })();
        let detail = format!("material_version={version}");
        match &result {
            Ok(_) => self.audit_write(
                &writer,
                op.name(),
                &key_id,
                Some(ctx),
                Ok(()),
                Some(&detail),
            )?,
            Err(e) => {
                let _ = self.audit_write(
                    &writer,
                    op.name(),
                    &key_id,
                    Some(ctx),
                    Err(e),
                    Some(&detail),
                );
            }
        }
        result
    }

    /// Unwraps a local keyslot for `op`, checking the context, the key policy and state,
    /// and audits the attempt.
    pub async fn unwrap_as(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
        op: KeyOp,
    ) -> Result<Dek, KeyError> {
        let writer = self.audit.open()?;
        let key_label = wrapped.key_id.escape_debug().to_string();
        let result = self.unwrap_inner(wrapped, expected, op).await;
        let detail = wrapped
            .params
            .get(MATERIAL_VERSION_PARAM)
            .map(|v| format!("material_version={}", v.escape_debug()));
        match &result {
            Ok(_) => self.audit_write(
                &writer,
                op.name(),
                &key_label,
                Some(&wrapped.context),
                Ok(()),
                detail.as_deref(),
            )?,
            Err(e) => {
                let _ = self.audit_write(
                    &writer,
                    op.name(),
                    &key_label,
                    Some(&wrapped.context),
                    Err(e),
                    detail.as_deref(),
                );
            }
        }
        result
    }

    async fn unwrap_inner(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
        op: KeyOp,
    ) -> Result<Dek, KeyError> {
        seal::check_kind_and_alg(wrapped, KIND)?;
        seal::check_context(wrapped, expected)?;
        if !is_key_id(&wrapped.key_id) {
            return Err(KeyError::Malformed(format!(
                "{:?} is not a local master key id",
                wrapped.key_id.escape_debug().to_string()
            )));
        }
        let version = match wrapped.params.get(MATERIAL_VERSION_PARAM) {
            None => 1,
            Some(v) => v.parse::<u32>().map_err(|_| {
                KeyError::Malformed(format!(
                    "keyslot parameter {MATERIAL_VERSION_PARAM} = {:?} is not a number",
                    v.escape_debug().to_string()
                ))
            })?,
        };
        let keystore = self.clone();
        let key_id = wrapped.key_id.clone();
        let master = seal::blocking(move || keystore.load_for_use(&key_id, op)).await?;
        let material = master.material(version).ok_or_else(|| KeyError::NotFound {
            backend: KIND.to_string(),
            key: format!(
                "{} material version {version} (this keystore is older than the keyslot; \
                 restore the key file from a recent backup)",
                wrapped.key_id
            ),
        })?;
        let aad = seal::associated_data(KIND, &wrapped.key_id, &wrapped.context)?;
        seal::open(material.expose(), &aad, &wrapped.blob, &wrapped.key_id)
    }

    /// Loads a key for a cryptographic operation: the policy must allow it and the key
    /// must be Enabled.
    fn load_for_use(&self, key_id: &str, op: KeyOp) -> Result<MasterKey, KeyError> {
        let key = self.load_key(key_id, true)?;
        self.authorize(&key.meta, op.permission(), op.name())?;
        if key.meta.state != KeyState::Enabled {
            return Err(unusable(&key.meta));
        }
        Ok(key)
    }

    // ---------------------------------------------------------------------------------
    // Files

    /// Refuses symlinks and non-private files anywhere in the keystore directory (the
    /// audit log holds no secrets: it may be group-writable, but not a symlink).
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
            if entry.file_name() == AUDIT_FILE {
                continue;
            }
            check_private_mode(&path, md.mode(), md.is_dir())?;
        }
        Ok(())
    }

    /// Takes the keystore's exclusive lock (released when the returned guard drops).
    pub(super) fn lock(&self) -> Result<Flock<File>, KeyError> {
        let path = self.dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(self.file_mode())
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

    /// 0640 when the keystore directory is shared read-only with a group, else 0600.
    fn file_mode(&self) -> u32 {
        match fs::metadata(&self.dir) {
            Ok(md) if md.mode() & 0o040 != 0 => 0o640,
            _ => 0o600,
        }
    }

    /// Reads and parses a keystore JSON file (not key files); `None` if missing.
    pub(super) fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        what: &str,
    ) -> Result<Option<T>, KeyError> {
        let path = self.dir.join(name);
        let Some(buf) = read_private_file(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&buf.bytes)
            .map(Some)
            .map_err(|e| json_err(&path, what, &e))
    }

    /// Writes a keystore JSON file atomically; the caller holds the lock.
    pub(super) fn write_json<T: serde::Serialize>(
        &self,
        name: &str,
        v: &T,
    ) -> Result<(), KeyError> {
        let path = self.dir.join(name);
        let mut json = serde_json::to_vec_pretty(v)
            .map_err(|e| ks_err(&path, format!("cannot encode: {e}")))?;
        json.push(b'\n');
        self.write_private_file(name, &json)
    }

    fn load_index(&self) -> Result<AliasIndex, KeyError> {
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
    fn save_index(&self, index: &AliasIndex) -> Result<(), KeyError> {
        self.write_json(ALIASES_FILE, index)
    }

    /// Loads a key file; with `material` false the material is not decoded.
    fn load_key(&self, key_id: &str, material: bool) -> Result<MasterKey, KeyError> {
        let path = self.key_path(key_id);
        let content = read_private_file(&path)?.ok_or_else(|| not_found(key_id))?;
        let file: KeyFileIn<'_> = serde_json::from_slice(&content.bytes)
            .map_err(|e| json_err(&path, "the key file", &e))?;
        if file.version > KEY_FORMAT_VERSION {
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
        // Version 1 held one material and no policy.
        let entries: Vec<(u32, String, &str)> = match (file.material, file.materials.is_empty()) {
            (Some(m), true) => vec![(1, file.created_at.clone(), m)],
            (None, false) => file
                .materials
                .iter()
                .map(|m| (m.version, m.created_at.clone(), m.material))
                .collect(),
            _ => {
                return Err(ks_err(
                    &path,
                    "the key file must hold either \"material\" (version 1) or a non-empty \
                     \"materials\" list; restore it from a backup",
                ))
            }
        };
        let mut seen = BTreeSet::new();
        for (v, _, _) in &entries {
            if *v == 0 || !seen.insert(*v) {
                return Err(ks_err(
                    &path,
                    format!(
                        "material version {v} is invalid or repeated; restore it from a backup"
                    ),
                ));
            }
        }
        if file.state == KeyState::PendingDeletion && file.deletion_unix.is_none() {
            return Err(ks_err(
                &path,
                "the key is pending deletion but has no deletion_unix time",
            ));
        }
        let mut materials = Vec::new();
        if material {
            for (v, _, m) in &entries {
                materials.push((*v, decode_material(&path, m)?));
            }
        }
        Ok(MasterKey {
            meta: KeyMeta {
                key_id: file.key_id,
                state: file.state,
                created_at: file.created_at,
                deletion_unix: file.deletion_unix,
                creator_uid: file.creator_uid.unwrap_or(content.owner),
                policy: file
                    .policy
                    .unwrap_or_else(|| KeyPolicy::owner(content.owner)),
                versions: entries
                    .into_iter()
                    .map(|(version, created_at, _)| MaterialVersion {
                        version,
                        created_at,
                    })
                    .collect(),
            },
            materials,
        })
    }

    /// Writes a key file (format version 2) with all its materials; the caller holds the
    /// lock.
    fn write_key(&self, key: &MasterKey) -> Result<(), KeyError> {
        let meta = &key.meta;
        let mut encoded = Vec::with_capacity(key.materials.len());
        for (v, m) in &key.materials {
            encoded.push((*v, encode_material(m.expose())?));
        }
        let mut materials = Vec::with_capacity(encoded.len());
        for (v, b64) in &encoded {
            let created_at = meta
                .versions
                .iter()
                .find(|x| x.version == *v)
                .map(|x| x.created_at.as_str())
                .unwrap_or("");
            let material = std::str::from_utf8(b64)
                .map_err(|e| ks_err(&self.dir, format!("cannot encode key material: {e}")))?;
            materials.push(MaterialOut {
                version: *v,
                created_at,
                material,
            });
        }
        let out = KeyFileOut {
            version: KEY_FORMAT_VERSION,
            key_id: &meta.key_id,
            spec: KEY_SPEC,
            state: &meta.state,
            created_at: &meta.created_at,
            creator_uid: meta.creator_uid,
            deletion_date: meta.deletion_date(),
            deletion_unix: meta.deletion_unix,
            policy: &meta.policy,
            materials,
        };
        // Preallocated well beyond the size needed, so no reallocation copies the
        // material into memory that would not be zeroized.
        let mut json = Zeroizing::new(Vec::with_capacity(16384 + 256 * key.materials.len()));
        serde_json::to_writer_pretty(&mut *json, &out)
            .map_err(|e| ks_err(&self.dir, format!("cannot encode the key file: {e}")))?;
        json.push(b'\n');
        self.write_private_file(&format!("{}.json", meta.key_id), &json)
    }

    /// The local default key's id, creating the key (under the lock) if there is none.
    fn default_key_id(&self) -> Result<String, KeyError> {
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

    /// Generates and stores a new Enabled master key owned by the acting principal; the
    /// caller holds the lock.
    fn write_new_key(&self) -> Result<KeyMeta, KeyError> {
        let key_id = format!("{KEY_ID_PREFIX}{}", seal::random_hex(KEY_ID_HEX_LEN / 2)?);
        let created_at = now_rfc3339();
        let meta = KeyMeta {
            key_id,
            state: KeyState::Enabled,
            created_at: created_at.clone(),
            deletion_unix: None,
            creator_uid: self.principal.uid,
            policy: KeyPolicy::owner(self.principal.uid),
            versions: vec![MaterialVersion {
                version: 1,
                created_at,
            }],
        };
        let key = MasterKey {
            meta,
            materials: vec![(1, fresh_material()?)],
        };
        self.write_key(&key)?;
        Ok(key.meta)
    }

    /// Atomically replaces `DIR/name`: temp file, fsync, rename, fsync of the directory.
    fn write_private_file(&self, name: &str, bytes: &[u8]) -> Result<(), KeyError> {
        let final_path = self.dir.join(name);
        let tmp_path = self
            .dir
            .join(format!("{TMP_PREFIX}{name}-{}", seal::random_hex(8)?));
        let mode = self.file_mode();
        let result = (|| -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp_path)?;
            // The umask cannot add bits, but make the mode exact regardless.
            file.set_permissions(Permissions::from_mode(mode))?;
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

/// The error for a change that was made but whose audit record could not be written.
pub(super) fn done_but_unaudited(operation: &str, key: &str, e: KeyError) -> KeyError {
    match e {
        KeyError::Audit { path, reason } => KeyError::Audit {
            path,
            reason: format!("{operation} of key {key} was done, but {reason}"),
        },
        other => other,
    }
}

fn policy_detail(principal: &Principal, permissions: &[Permission]) -> String {
    let ops: Vec<&str> = permissions.iter().map(|p| p.as_str()).collect();
    format!(
        "principal={} uid={} operations={}",
        principal.short(),
        principal.uid,
        ops.join(",")
    )
}

/// Overwrites a file in place with zeros, syncs it, removes it and syncs the directory.
/// (Copies a filesystem keeps elsewhere, e.g. after copy-on-write or in backups, are
/// beyond reach; see docs/keys.md.)
fn shred_file(path: &Path) -> Result<(), KeyError> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_err(path, "cannot open for destruction", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_err(path, "cannot inspect", e))?
        .len();
    let zeros = vec![0u8; usize::try_from(len.min(MAX_FILE_LEN)).unwrap_or(0)];
    file.write_all_at(&zeros, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(path, "cannot overwrite", e))?;
    fs::remove_file(path).map_err(|e| io_err(path, "cannot remove", e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, "cannot sync the keystore directory", e))?;
    }
    Ok(())
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
