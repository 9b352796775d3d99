//! Key records: the master-key file format (version 1 and 2), its in-memory form
//! (`KeyMeta`, `MasterKey`), key ids, and reading, writing and generating key files.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, SecretBytes};
use crate::keys::clock::{now_rfc3339, rfc3339_utc};
use crate::keys::seal;
use crate::keys::{KeyError, KeyState};

use super::aliases::not_found;
use super::files::{io_err, json_err, ks_err, newer_format, read_private_file};
use super::policy::KeyPolicy;
use super::LocalKeystore;

/// Format version written to key files.
pub(super) const KEY_FORMAT_VERSION: u32 = 2;
const KEY_ID_PREFIX: &str = "mk-";
const KEY_ID_HEX_LEN: usize = 32;
const MASTER_KEY_LEN: usize = 32;
const KEY_SPEC: &str = "AES_256";

/// One material version of a key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MaterialVersion {
    pub version: u32,
    pub created_at: String,
}

/// Metadata of a key file (no material).
#[derive(Clone)]
pub(super) struct KeyMeta {
    pub(super) key_id: String,
    pub(super) state: KeyState,
    pub(super) created_at: String,
    pub(super) deletion_unix: Option<u64>,
    pub(super) creator_uid: u32,
    pub(super) policy: KeyPolicy,
    pub(super) versions: Vec<MaterialVersion>,
}

impl KeyMeta {
    pub(super) fn current_version(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(1)
    }
    pub(super) fn deletion_date(&self) -> Option<String> {
        self.deletion_unix.map(rfc3339_utc)
    }
}

/// A loaded master key. No Debug/Clone; the material zeroizes on drop.
pub(super) struct MasterKey {
    pub(super) meta: KeyMeta,
    /// (version, material); empty when loaded without material.
    pub(super) materials: Vec<(u32, SecretBytes)>,
}

impl MasterKey {
    pub(super) fn material(&self, version: u32) -> Option<&SecretBytes> {
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

/// One material of a key file: version, creation time, base64 material (borrowed from
/// the zeroizing file buffer).
type MaterialEntry<'a> = (u32, String, &'a str);

impl<'a> KeyFileIn<'a> {
    /// Refuses a file of a newer format, of another key, or of another key spec.
    fn check_identity(&self, path: &Path, key_id: &str) -> Result<(), KeyError> {
        if self.version > KEY_FORMAT_VERSION {
            return Err(newer_format(path, self.version));
        }
        if self.key_id != key_id {
            return Err(ks_err(
                path,
                format!(
                    "the file holds key {:?}, not {key_id}; restore it from a backup",
                    self.key_id.escape_debug().to_string()
                ),
            ));
        }
        if self.spec != KEY_SPEC {
            return Err(ks_err(
                path,
                format!(
                    "unsupported key spec {:?} (expected {KEY_SPEC})",
                    self.spec.escape_debug().to_string()
                ),
            ));
        }
        Ok(())
    }

    /// The materials of either format version, each version positive and distinct.
    fn material_entries(&self, path: &Path) -> Result<Vec<MaterialEntry<'a>>, KeyError> {
        // Version 1 held one material and no policy.
        let entries: Vec<MaterialEntry<'a>> = match (self.material, self.materials.is_empty()) {
            (Some(m), true) => vec![(1, self.created_at.clone(), m)],
            (None, false) => self
                .materials
                .iter()
                .map(|m| (m.version, m.created_at.clone(), m.material))
                .collect(),
            _ => {
                return Err(ks_err(
                    path,
                    "the key file must hold either \"material\" (version 1) or a non-empty \
                     \"materials\" list; restore it from a backup",
                ))
            }
        };
        let mut seen = BTreeSet::new();
        for (v, _, _) in &entries {
            if *v == 0 || !seen.insert(*v) {
                return Err(ks_err(
                    path,
                    format!(
                        "material version {v} is invalid or repeated; restore it from a backup"
                    ),
                ));
            }
        }
        Ok(entries)
    }

    /// The key's metadata; a version-1 file's creator and policy default to the
    /// file's owner.
    fn into_meta(self, entries: Vec<MaterialEntry<'_>>, owner: u32) -> KeyMeta {
        KeyMeta {
            key_id: self.key_id,
            state: self.state,
            created_at: self.created_at,
            deletion_unix: self.deletion_unix,
            creator_uid: self.creator_uid.unwrap_or(owner),
            policy: self.policy.unwrap_or_else(|| KeyPolicy::owner(owner)),
            versions: entries
                .into_iter()
                .map(|(version, created_at, _)| MaterialVersion {
                    version,
                    created_at,
                })
                .collect(),
        }
    }
}

/// The bytes of a key file (format version 2) holding `key` with all its materials, in
/// a zeroizing buffer; errors name `dir`, the keystore.
pub(super) fn encode_key_file(key: &MasterKey, dir: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
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
            .map_err(|e| ks_err(dir, format!("cannot encode key material: {e}")))?;
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
        .map_err(|e| ks_err(dir, format!("cannot encode the key file: {e}")))?;
    json.push(b'\n');
    Ok(json)
}

/// Parses the key file at `path` (its bytes, its owner's uid) that should hold `key_id`;
/// with `material` false the material is not decoded.
pub(super) fn parse_key_file(
    path: &Path,
    key_id: &str,
    bytes: &[u8],
    owner: u32,
    material: bool,
) -> Result<MasterKey, KeyError> {
    let file: KeyFileIn<'_> =
        serde_json::from_slice(bytes).map_err(|e| json_err(path, "the key file", &e))?;
    file.check_identity(path, key_id)?;
    let entries = file.material_entries(path)?;
    if file.state == KeyState::PendingDeletion && file.deletion_unix.is_none() {
        return Err(ks_err(
            path,
            "the key is pending deletion but has no deletion_unix time",
        ));
    }
    let mut materials = Vec::new();
    if material {
        for (v, _, m) in &entries {
            materials.push((*v, decode_material(path, m)?));
        }
    }
    Ok(MasterKey {
        meta: file.into_meta(entries, owner),
        materials,
    })
}

/// `mk-` followed by exactly 32 lowercase hex digits.
pub(super) fn is_key_id(s: &str) -> bool {
    s.strip_prefix(KEY_ID_PREFIX).is_some_and(|hex| {
        hex.len() == KEY_ID_HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
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

pub(super) fn fresh_material() -> Result<SecretBytes, KeyError> {
    let mut material = vec![0u8; MASTER_KEY_LEN];
    getrandom::fill(&mut material[..]).map_err(|e| CryptoError::Rng(e.to_string()))?;
    Ok(SecretBytes::new(material))
}

impl LocalKeystore {
    pub(super) fn key_path(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}.json"))
    }

    /// Ids of every key file in the directory.
    pub(super) fn key_ids(&self) -> Result<Vec<String>, KeyError> {
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

    /// Loads a key file; with `material` false the material is not decoded.
    pub(super) fn load_key(&self, key_id: &str, material: bool) -> Result<MasterKey, KeyError> {
        let path = self.key_path(key_id);
        let content = read_private_file(&path)?.ok_or_else(|| not_found(key_id))?;
        parse_key_file(&path, key_id, &content.bytes, content.owner, material)
    }

    /// Writes a key file (format version 2) with all its materials; the caller holds the
    /// lock.
    pub(super) fn write_key(&self, key: &MasterKey) -> Result<(), KeyError> {
        let json = encode_key_file(key, &self.dir)?;
        self.write_private_file(&format!("{}.json", key.meta.key_id), &json)
    }

    /// Generates and stores a new Enabled master key owned by the acting principal; the
    /// caller holds the lock.
    pub(super) fn write_new_key(&self) -> Result<KeyMeta, KeyError> {
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
}
