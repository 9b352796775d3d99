//! The I/O side of `cryptvol check`: walks paths, reads headers (no key needed, under
//! the header's shared flock), probes the content of other files, and asks the key
//! backends about master keys (describe only: nothing is unwrapped, nothing audited,
//! nothing written). The facts go to [`super::rules::evaluate`].

use std::collections::{HashMap, HashSet};
use std::fs::{File, Metadata};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::detect::{detect, DataKind, PROBE_LEN};
use super::rules::{
    evaluate, parse_rfc3339_utc, HeaderProblem, KeyFacts, KeyIdentity, Policy, RotationFacts,
    Severity, SlotFacts, Subject, Verdict, VolumeFacts,
};
use super::{ComplianceError, HeaderReport, ItemReport, SlotReport, Summary};
use crate::keys::{
    AwsKmsBackend, KeyBackend, KeyError, KeyRef, KeyService, KeyState, LocalKeystore, WrappedDek,
    AWS_KMS, DEFAULT_KEY_ALIAS, EXEC, LOCAL, PASSPHRASE,
};
use crate::volume::{self, CopyStatus, Header, HeaderHealth, VolumeError};

/// Most bytes of data (not holes) read to tell an all-zero file from unrecognised data.
const ZERO_SCAN_LIMIT: u64 = 64 << 20;

/// What the command line asks for, before keys are resolved.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// The local keystore (also where exec backends are registered).
    pub keystore_dir: PathBuf,
    /// `--require-key` references as typed.
    pub require_keys: Vec<String>,
    pub no_default_key: bool,
    pub max_key_age_days: Option<u32>,
    pub require_rotation: bool,
}

/// One entry found by the walk.
enum Entry {
    /// A regular file or block device to check.
    Item(PathBuf, Metadata),
    Unreadable(PathBuf, String),
    Skipped(PathBuf, String, &'static str),
    /// An RBD image (`rbd:POOL/IMAGE`), read through the volume layer's backing store.
    Image(PathBuf),
}

/// Scans paths and evaluates each item. Key lookups are cached per key.
#[derive(Debug)]
pub struct Scanner {
    keystore_dir: PathBuf,
    keystore: Option<Result<LocalKeystore, String>>,
    kms: Option<Result<AwsKmsBackend, String>>,
    cache: HashMap<(String, String), KeyFacts>,
    policy: Policy,
    now_unix: u64,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Scanner {
    /// Resolves the required keys (and, when a rule needs them, the default keys).
    pub async fn new(opts: &CheckOptions) -> Result<Scanner, ComplianceError> {
        let mut s = Scanner {
            keystore_dir: opts.keystore_dir.clone(),
            keystore: None,
            kms: None,
            cache: HashMap::new(),
            policy: Policy {
                forbid_default_key: opts.no_default_key,
                max_key_age_days: opts.max_key_age_days,
                require_rotation: opts.require_rotation,
                ..Policy::default()
            },
            now_unix: now_unix(),
        };
        for r in &opts.require_keys {
            let id = s
                .resolve(r)
                .await
                .map_err(|source| ComplianceError::RequiredKey {
                    key: r.clone(),
                    source,
                })?;
            s.policy.required_keys.push(id);
        }
        if opts.no_default_key || !opts.require_keys.is_empty() {
            s.policy.default_keys = s.default_keys().await?;
        }
        Ok(s)
    }

    /// The rules in effect (resolved).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The local keystore, opened once (never created).
    fn keystore(&mut self) -> Result<&LocalKeystore, String> {
        let dir = &self.keystore_dir;
        let ks = self
            .keystore
            .get_or_insert_with(|| LocalKeystore::open(dir, false).map_err(|e| e.to_string()));
        ks.as_ref().map_err(Clone::clone)
    }

    async fn kms(&mut self) -> Result<&AwsKmsBackend, String> {
        if self.kms.is_none() {
            self.kms = Some(AwsKmsBackend::connect().await.map_err(|e| e.to_string()));
        }
        match &self.kms {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(e.clone()),
            None => Err("AWS KMS client not initialised".into()),
        }
    }

    /// A key reference resolved to what keyslots store.
    async fn resolve(&mut self, reference: &str) -> Result<KeyIdentity, KeyError> {
        let ident = |backend: &str, key_id: String| KeyIdentity {
            backend: backend.to_string(),
            key_id,
            label: reference.to_string(),
        };
        match KeyRef::parse(reference)? {
            KeyRef::Local(k) => {
                let ks = LocalKeystore::open(&self.keystore_dir, false)?;
                let k = k.unwrap_or_else(|| DEFAULT_KEY_ALIAS.to_string());
                Ok(ident(LOCAL, ks.resolve(Some(&k))?))
            }
            KeyRef::AwsKms(k) => {
                let kms = self.kms().await.map_err(KeyError::Unsupported)?;
                Ok(ident(AWS_KMS, kms.describe(&k).await?.key_id))
            }
            KeyRef::Exec { name, key } => {
                let ks = LocalKeystore::open(&self.keystore_dir, false)?;
                let backend = ks.exec_backend(&name)?;
                Ok(ident(
                    EXEC,
                    backend.describe_key(key.as_deref()).await?.key_id,
                ))
            }
        }
    }

    /// The local default key and the configured default key, as far as they exist.
    async fn default_keys(&mut self) -> Result<Vec<KeyIdentity>, ComplianceError> {
        let mut out = Vec::new();
        if !self.keystore_dir.is_dir() {
            return Ok(out);
        }
        let fail = |key: &str| {
            let key = key.to_string();
            move |source| ComplianceError::DefaultKey { key, source }
        };
        let ks = LocalKeystore::open(&self.keystore_dir, false).map_err(fail(DEFAULT_KEY_ALIAS))?;
        let mut local = Vec::new();
        for k in ks.list_keys().map_err(fail(DEFAULT_KEY_ALIAS))? {
            if k.default {
                local.push(k.key_id);
            }
        }
        match ks.resolve(Some(DEFAULT_KEY_ALIAS)) {
            Ok(id) => local.push(id),
            Err(KeyError::NotFound { .. }) => {}
            Err(e) => return Err(fail(DEFAULT_KEY_ALIAS)(e)),
        }
        local.sort();
        local.dedup();
        for id in local {
            out.push(KeyIdentity {
                backend: LOCAL.into(),
                key_id: id,
                label: DEFAULT_KEY_ALIAS.into(),
            });
        }
        let svc = KeyService::new(&self.keystore_dir, None);
        let configured = svc.default_key().map_err(fail("(configured default)"))?;
        if configured != KeyRef::Local(None) {
            let text = configured.to_string();
            match self.resolve(&text).await {
                Ok(id) => out.push(id),
                // A configured default whose key is gone protects nothing any more.
                Err(KeyError::NotFound { .. }) => {}
                Err(e) => return Err(fail(&text)(e)),
            }
        }
        Ok(out)
    }

    /// Scans every path (directories recursively) and calls `emit` for each item.
    pub async fn scan(&mut self, paths: &[PathBuf], emit: &mut dyn FnMut(&ItemReport)) -> Summary {
        let keystore_id = std::fs::metadata(&self.keystore_dir)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let mut summary = Summary::default();
        let mut visited = HashSet::new();
        for p in paths {
            let mut entries = Vec::new();
            walk(p, keystore_id, &mut visited, &mut entries);
            for e in entries {
                let report = self.check_entry(e).await;
                summary.add(&report);
                emit(&report);
            }
        }
        summary
    }

    async fn check_entry(&mut self, e: Entry) -> ItemReport {
        let (path, subject, content) = match e {
            Entry::Unreadable(p, why) => (p, Subject::Unreadable(why), "unreadable".to_string()),
            Entry::Skipped(p, why, content) => (p, Subject::Skipped(why), content.to_string()),
            Entry::Item(p, md) => {
                let (subject, content) = self.inspect(&p, &md).await;
                (p, subject, content)
            }
            Entry::Image(p) => {
                let (subject, content) = self.inspect_image(&p).await;
                (p, subject, content)
            }
        };
        self.report(&path, subject, content)
    }

    fn report(&self, path: &Path, subject: Subject, content: String) -> ItemReport {
        let (verdict, findings) = evaluate(&subject, &self.policy, self.now_unix);
        let (notes, reasons): (Vec<_>, Vec<_>) = findings
            .into_iter()
            .partition(|f| f.code.severity() == Severity::Note);
        let mut r = ItemReport {
            path: path.display().to_string(),
            verdict,
            content,
            volume_uuid: None,
            header: None,
            keyslots: Vec::new(),
            reasons,
            notes,
        };
        if let Subject::Volume(v) = &subject {
            r.volume_uuid = Some(v.uuid.to_string());
            r.header = Some(HeaderReport {
                primary: copy_label(&v.health.primary),
                secondary: copy_label(&v.health.secondary),
            });
            r.keyslots = v
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| SlotReport {
                    slot: i,
                    backend: s.backend.clone(),
                    key_id: s.key_id.clone(),
                    key_state: key_state_label(&s.key).map(str::to_string),
                })
                .collect();
        }
        r
    }

    /// Facts about a regular file or block device.
    async fn inspect(&mut self, path: &Path, md: &Metadata) -> (Subject, String) {
        let broken = |p| (Subject::BrokenVolume(p), "cryptvol".to_string());
        match volume::read_header(path) {
            Ok((header, health)) => {
                let facts = self
                    .volume_facts(path, device_len(path, md), &header, health)
                    .await;
                (Subject::Volume(facts), "cryptvol".to_string())
            }
            Err(VolumeError::NotAVolume { .. }) => match probe(path, md) {
                Ok(kind) => {
                    let name = kind.name();
                    (Subject::Foreign(kind), name)
                }
                Err(why) => (Subject::Unreadable(why), "unreadable".to_string()),
            },
            Err(VolumeError::Truncated { detail, .. }) => broken(HeaderProblem::Truncated(detail)),
            Err(VolumeError::BothHeadersDamaged {
                primary, secondary, ..
            }) => broken(HeaderProblem::BothCopiesDamaged { primary, secondary }),
            Err(VolumeError::UnsupportedVersion {
                version, supported, ..
            }) => broken(HeaderProblem::UnsupportedVersion { version, supported }),
            Err(VolumeError::UnsupportedFeature { features, .. }) => {
                broken(HeaderProblem::UnsupportedFeature {
                    features: split_features(&features),
                })
            }
            Err(e) => (Subject::Unreadable(e.to_string()), "unreadable".to_string()),
        }
    }

    /// Facts about an RBD image: a volume's, or what its first bytes hold.
    async fn inspect_image(&mut self, path: &Path) -> (Subject, String) {
        let (prefix, len) = match volume::read_image_prefix(path, PROBE_LEN) {
            Ok(p) => p,
            Err(e) => return (Subject::Unreadable(e.to_string()), "unreadable".to_string()),
        };
        match volume::read_header(path) {
            Ok((header, health)) => {
                let facts = self.volume_facts(path, Some(len), &header, health).await;
                (Subject::Volume(facts), "cryptvol".to_string())
            }
            Err(VolumeError::NotAVolume { .. }) => {
                // Only the first bytes are read: an image of zeros there is reported
                // as unrecognised data, not scanned to its end.
                let kind = if prefix.is_empty() {
                    DataKind::Empty
                } else {
                    detect(&prefix).unwrap_or(DataKind::Unrecognised)
                };
                let name = kind.name();
                (Subject::Foreign(kind), name)
            }
            Err(e) => (Subject::Unreadable(e.to_string()), "unreadable".to_string()),
        }
    }

    async fn volume_facts(
        &mut self,
        path: &Path,
        file_len: Option<u64>,
        h: &Header,
        health: HeaderHealth,
    ) -> VolumeFacts {
        let mut slots = Vec::new();
        for s in &h.keyslots {
            slots.push(SlotFacts {
                backend: s.backend.clone(),
                key_id: s.key_id.clone(),
                key: self.key_facts(s).await,
            });
        }
        let map = crate::volume::map_summary(path, h);
        VolumeFacts {
            uuid: h.uuid,
            health,
            required_features: h.required_features.clone(),
            needed_len: h.data_offset.saturating_add(h.size),
            file_len,
            slots,
            map_problem: match &map {
                Ok(Some(m)) if !m.health.is_healthy() => {
                    Some(if m.health.pages_damaged.is_empty() {
                        format!(
                            "{} of {} pages have one damaged copy",
                            m.health.pages_one_copy_bad, m.health.pages
                        )
                    } else {
                        format!(
                            "{} of {} pages damaged in both copies",
                            m.health.pages_damaged.len(),
                            m.health.pages
                        )
                    })
                }
                Ok(_) | Err(VolumeError::InvalidHeader { .. }) => None,
                Err(e) => Some(format!("cannot read it: {e}")),
            },
            header_invalid: match map {
                Err(VolumeError::InvalidHeader { detail, .. }) => Some(detail),
                _ => None,
            },
        }
    }

    /// What the backend says about a keyslot's master key (cached per key).
    async fn key_facts(&mut self, slot: &WrappedDek) -> KeyFacts {
        if slot.backend == PASSPHRASE {
            return KeyFacts::Passphrase;
        }
        let cache_key = (slot.backend.clone(), slot.key_id.clone());
        if let Some(f) = self.cache.get(&cache_key) {
            return f.clone();
        }
        let facts = match slot.backend.as_str() {
            LOCAL => self.local_facts(&slot.key_id),
            EXEC => self.exec_facts(&slot.key_id).await,
            AWS_KMS => match self.kms().await {
                Ok(kms) => match kms.describe(&slot.key_id).await {
                    Ok(d) => found(d.state),
                    Err(e) => from_error(e),
                },
                Err(e) => KeyFacts::LookupFailed(e),
            },
            _ => KeyFacts::UnsupportedBackend,
        };
        self.cache.insert(cache_key, facts.clone());
        facts
    }

    fn local_facts(&mut self, key_id: &str) -> KeyFacts {
        let ks = match self.keystore() {
            Ok(ks) => ks,
            Err(e) => return KeyFacts::LookupFailed(e),
        };
        // Only key ids are looked up: a header never names an alias.
        if !key_id.starts_with("mk-") {
            return KeyFacts::Missing(format!(
                "{:?} is not a local key id",
                key_id.escape_debug().to_string()
            ));
        }
        let d = match ks.describe(key_id) {
            Ok(d) => d,
            Err(e) => return from_error(e),
        };
        let current = d
            .material_versions
            .iter()
            .find(|v| v.version == d.current_material_version);
        let Some(since) = current.and_then(|v| parse_rfc3339_utc(&v.created_at)) else {
            return KeyFacts::LookupFailed(format!(
                "key {key_id}: the creation time of its material version {} is missing or \
                 unreadable",
                d.current_material_version
            ));
        };
        KeyFacts::Found {
            state: d.state,
            deletion_date: d.deletion_date,
            rotation: Some(RotationFacts {
                versions: u32::try_from(d.material_versions.len()).unwrap_or(u32::MAX),
                current_since_unix: since,
            }),
        }
    }

    async fn exec_facts(&mut self, key_id: &str) -> KeyFacts {
        let Some((name, key)) = key_id.split_once(':') else {
            return KeyFacts::Missing(format!(
                "{:?} is not an exec key id (NAME:KEY)",
                key_id.escape_debug().to_string()
            ));
        };
        let backend = match self.keystore().map(|ks| ks.exec_backend(name)) {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return from_error(e),
            Err(e) => return KeyFacts::LookupFailed(e),
        };
        match backend.describe_key(Some(key)).await {
            Ok(d) => found(d.state),
            Err(e) => from_error(e),
        }
    }
}

fn found(state: KeyState) -> KeyFacts {
    KeyFacts::Found {
        state,
        deletion_date: None,
        rotation: None,
    }
}

/// A describe error as key facts: "not found" and "unusable" are answers, the rest
/// means the key could not be looked up.
fn from_error(e: KeyError) -> KeyFacts {
    match e {
        KeyError::NotFound { .. } => KeyFacts::Missing(e.to_string()),
        KeyError::KeyUnusable { ref state, .. } => found(if state.contains("pending deletion") {
            KeyState::PendingDeletion
        } else {
            KeyState::Disabled
        }),
        other => KeyFacts::LookupFailed(other.to_string()),
    }
}

fn key_state_label(k: &KeyFacts) -> Option<&'static str> {
    match k {
        KeyFacts::Passphrase => None,
        KeyFacts::Found { state, .. } => Some(match state {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
        }),
        KeyFacts::Missing(_) => Some("Missing"),
        KeyFacts::UnsupportedBackend => Some("Unsupported"),
        KeyFacts::LookupFailed(_) => Some("Unknown"),
    }
}

fn copy_label(c: &CopyStatus) -> String {
    match c {
        CopyStatus::Ok => "ok".into(),
        CopyStatus::Stale(seq) => format!("stale (sequence {seq})"),
        CopyStatus::Damaged(reason) => format!("damaged: {reason}"),
    }
}

/// The feature list of `VolumeError::UnsupportedFeature` (joined with ", ").
fn split_features(s: &str) -> Vec<String> {
    s.split(", ")
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

fn kind_of(md: &Metadata) -> Option<&'static str> {
    let t = md.file_type();
    if t.is_socket() {
        Some("socket")
    } else if t.is_fifo() {
        Some("fifo")
    } else if t.is_char_device() {
        Some("character device")
    } else if t.is_file() || t.is_block_device() || t.is_dir() {
        None
    } else {
        Some("special file")
    }
}

/// Collects the entries under `path` (symbolic links followed; every directory scanned
/// once), sorted by name.
fn walk(
    path: &Path,
    keystore: Option<(u64, u64)>,
    visited: &mut HashSet<(u64, u64)>,
    out: &mut Vec<Entry>,
) {
    let p = path.to_path_buf();
    if volume::is_rbd_path(path) {
        out.push(Entry::Image(p));
        return;
    }
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) => {
            out.push(Entry::Unreadable(p, inaccessible_reason(path, &e)));
            return;
        }
    };
    if let Some(kind) = kind_of(&md) {
        out.push(Entry::Skipped(
            p,
            format!("a {kind}, not a file or block device that can hold a volume"),
            kind,
        ));
        return;
    }
    if md.is_file() && is_tracking_sidecar(path, &md) {
        out.push(Entry::Skipped(
            p,
            "a cryptvol changed-chunk tracking file (kept next to a served volume; holds no data)"
                .into(),
            "cbt",
        ));
        return;
    }
    if !md.is_dir() {
        out.push(Entry::Item(p, md));
        return;
    }
    let id = (md.dev(), md.ino());
    if Some(id) == keystore {
        out.push(Entry::Skipped(
            p,
            "the cryptvol keystore directory (its files are keys, not volumes)".into(),
            "keystore",
        ));
        return;
    }
    if !visited.insert(id) {
        out.push(Entry::Skipped(
            p,
            "a directory already scanned (reached again through a symbolic link)".into(),
            "directory",
        ));
        return;
    }
    for c in sorted_children(path, out) {
        walk(&c, keystore, visited, out);
    }
}

/// Why `path` cannot be accessed (`e`, from following it), naming the target of a
/// dangling symbolic link.
fn inaccessible_reason(path: &Path, e: &std::io::Error) -> String {
    match std::fs::symlink_metadata(path) {
        Ok(l) if l.file_type().is_symlink() => {
            let target = std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            format!("dangling symbolic link to {target}: {e}")
        }
        _ => format!("cannot access: {e}"),
    }
}

/// The entries of the directory `path`, sorted by name; what cannot be listed is
/// reported as unreadable in `out`.
fn sorted_children(path: &Path, out: &mut Vec<Entry>) -> Vec<PathBuf> {
    let rd = match std::fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => {
            out.push(Entry::Unreadable(
                path.to_path_buf(),
                format!("cannot list the directory: {e}"),
            ));
            return Vec::new();
        }
    };
    let mut children = Vec::new();
    for entry in rd {
        match entry {
            Ok(e) => children.push(e.path()),
            Err(e) => out.push(Entry::Unreadable(
                path.to_path_buf(),
                format!("cannot list the directory: {e}"),
            )),
        }
    }
    children.sort();
    children
}

/// The length of a regular file, or of a block device (its size from seeking to the end).
fn device_len(path: &Path, md: &Metadata) -> Option<u64> {
    if md.file_type().is_block_device() {
        let f = File::open(path).ok()?;
        let end = nix::unistd::lseek(f.as_raw_fd(), 0, nix::unistd::Whence::SeekEnd).ok()?;
        u64::try_from(end).ok()
    } else {
        Some(md.len())
    }
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many (fewer only at the end).
fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Whether `path` is a volume's changed-chunk tracking sidecar, so that it can be
/// skipped: only a well-formed sidecar (docs/format.md §10.7, every field parsed, the
/// length the format gives for its volume's size, the checksum right) named
/// `<volume>.cbt` beside a cryptvol volume `<volume>` whose UUID it records. Anything
/// else, whatever its first bytes, is checked like any other file: eight bytes of magic
/// must not make an unencrypted image look compliant.
fn is_tracking_sidecar(path: &Path, md: &Metadata) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(volume_name) = name.strip_suffix(".cbt").filter(|v| !v.is_empty()) else {
        return false;
    };
    let volume_path = path.with_file_name(volume_name);
    let Ok((header, _)) = volume::read_header(&volume_path) else {
        return false;
    };
    let nwords = header.size.div_ceil(volume::SNAPSHOT_CHUNK).div_ceil(64);
    // Bound the length by the format before reading: fixed fields, a base id of at
    // most u16::MAX bytes, the words and the checksum.
    let most = CBT_FIXED_LEN
        .saturating_add(u64::from(u16::MAX))
        .saturating_add(nwords.saturating_mul(8));
    if md.len() < CBT_FIXED_LEN || md.len() > most {
        return false;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    parse_sidecar(&bytes).is_some_and(|(uuid, n)| uuid == header.uuid && n == nwords)
}

/// Bytes of a changed-chunk sidecar besides its base id and its words: magic 8, UUID
/// 16, in_use 1, base_len 2, chunk size 8, word count 8, SHA-256 32.
const CBT_FIXED_LEN: u64 = 8 + 16 + 1 + 2 + 8 + 8 + 32;

/// Parses a changed-chunk sidecar completely (docs/format.md §10.7): the volume UUID it
/// records and its number of words, or `None` unless every field is valid and the
/// length is exactly what the fields say.
fn parse_sidecar(b: &[u8]) -> Option<(uuid::Uuid, u64)> {
    use sha2::{Digest, Sha256};
    let body = b.get(..b.len().checked_sub(32)?)?;
    if Sha256::digest(body)[..] != b[body.len()..] || body.get(..8)? != b"CVCBT001" {
        return None;
    }
    let uuid = uuid::Uuid::from_bytes(body.get(8..24)?.try_into().ok()?);
    if *body.get(24)? > 1 {
        return None;
    }
    let blen = usize::from(u16::from_le_bytes(body.get(25..27)?.try_into().ok()?));
    std::str::from_utf8(body.get(27..27 + blen)?).ok()?;
    let at = 27 + blen;
    let chunk = u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
    let n = u64::from_le_bytes(body.get(at + 8..at + 16)?.try_into().ok()?);
    let words = usize::try_from(n).ok()?.checked_mul(8)?;
    if chunk != volume::SNAPSHOT_CHUNK || body.len() != (at + 16).checked_add(words)? {
        return None;
    }
    Some((uuid, n))
}

/// What a file that is not a volume holds.
fn probe(path: &Path, md: &Metadata) -> Result<DataKind, String> {
    let f = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let len = device_len(path, md).unwrap_or(0);
    let mut buf = vec![0u8; PROBE_LEN];
    let n = read_full_at(&f, &mut buf, 0).map_err(|e| format!("cannot read: {e}"))?;
    let buf = &buf[..n];
    if n == 0 {
        return Ok(DataKind::Empty);
    }
    if let Some(kind) = detect(buf) {
        return Ok(kind);
    }
    if buf.iter().any(|&b| b != 0) {
        return Ok(DataKind::Unrecognised);
    }
    let start = n as u64;
    match rest_is_zero(&f, start, len.max(start)) {
        Ok(true) => Ok(DataKind::Zeros),
        Ok(false) => Ok(DataKind::Unrecognised),
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

/// Whether `[start, len)` holds only zeros (holes count as zeros), reading at most
/// [`ZERO_SCAN_LIMIT`] bytes of data; `false` when the limit is reached.
fn rest_is_zero(f: &File, start: u64, len: u64) -> std::io::Result<bool> {
    use nix::unistd::{lseek, Whence};
    let fd = f.as_raw_fd();
    let mut pos = start;
    let mut budget = ZERO_SCAN_LIMIT;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let off = i64::try_from(pos).unwrap_or(i64::MAX);
        // Next data region and its end; without SEEK_DATA support, everything is data.
        let (data, end) = match lseek(fd, off, Whence::SeekData) {
            Ok(d) => {
                let d = u64::try_from(d).unwrap_or(len);
                let hole = lseek(fd, i64::try_from(d).unwrap_or(i64::MAX), Whence::SeekHole)
                    .ok()
                    .and_then(|h| u64::try_from(h).ok())
                    .unwrap_or(len);
                (d, hole.min(len))
            }
            Err(nix::errno::Errno::ENXIO) => return Ok(true),
            Err(_) => (pos, len),
        };
        let mut at = data;
        while at < end {
            if budget == 0 {
                return Ok(false);
            }
            let want = (end - at).min(buf.len() as u64).min(budget) as usize;
            let n = read_full_at(f, &mut buf[..want], at)?;
            if n == 0 {
                return Ok(true);
            }
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
            budget -= n as u64;
        }
        pos = end.max(pos + 1);
    }
    Ok(true)
}

impl Summary {
    fn add(&mut self, r: &ItemReport) {
        match r.verdict {
            Verdict::Compliant => self.compliant += 1,
            Verdict::NonCompliant => self.non_compliant += 1,
            Verdict::Error => self.errors += 1,
            Verdict::Skipped => self.skipped += 1,
        }
        if r.verdict != Verdict::Error
            && r.reasons
                .iter()
                .any(|f| f.code.severity() == Severity::Error)
        {
            self.incomplete += 1;
        }
    }
}

#[cfg(test)]
mod tests;
