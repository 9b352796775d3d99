//! Volume lifecycle operations composed from `volume/` and `keys/`: create a volume
//! with a new data key, unlock one (unwrap its DEK through the right backend), describe one.
//! No protocol knowledge lives here.

use std::path::{Path, PathBuf};

use crate::keys::{
    default_keystore_dir, Argon2Params, EncryptionContext, KeyBackend, KeyError, LocalKeystore,
    PassphraseBackend, PassphraseSource, WrappedDek,
};
use crate::volume::{
    self, CopyStatus, Header, HeaderHealth, OpenOptions, Volume, VolumeError, VolumeSpec,
};

/// Errors of lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: no keyslot could be unlocked:\n{details}")]
    NoUsableKeyslot { path: String, details: String },
}

/// Where keys come from, as chosen on the command line.
pub struct KeyOptions {
    /// `--keystore DIR`; `None` means the default location.
    pub keystore: Option<PathBuf>,
    /// A passphrase source, when the user chose the passphrase backend or supplied one
    /// to unlock passphrase keyslots.
    pub passphrase: Option<PassphraseSource>,
    /// Argon2id cost for new passphrase keyslots.
    pub argon2: Argon2Params,
}

impl KeyOptions {
    /// The keystore directory in effect.
    pub fn keystore_dir(&self) -> PathBuf {
        self.keystore.clone().unwrap_or_else(default_keystore_dir)
    }
    /// Opens the local keystore (creating it when `create`).
    pub fn local(&self, create: bool) -> Result<LocalKeystore, KeyError> {
        LocalKeystore::open(&self.keystore_dir(), create)
    }
}

/// Which master key wraps a new volume's DEK.
pub enum NewKey<'a> {
    /// A local master key: id, `alias/NAME`, or `None` for the default key.
    Local(Option<&'a str>),
    /// A passphrase (read from the source in `KeyOptions`).
    Passphrase,
}

/// Creates a new volume at `path` with a fresh random DEK wrapped by the chosen key.
pub async fn create_volume(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
) -> Result<Header, OpsError> {
    validate_spec(spec)?;
    if path.exists() {
        return Err(VolumeError::AlreadyExists {
            path: path.display().to_string(),
        }
        .into());
    }
    let uuid = uuid::Uuid::new_v4();
    let ctx = EncryptionContext::for_volume(&uuid);
    let (dek, wrapped) = match key {
        NewKey::Local(k) => keys.local(true)?.generate_dek(k, &ctx).await?,
        NewKey::Passphrase => {
            let source = keys.passphrase.as_ref().ok_or_else(|| {
                KeyError::Unsupported(
                    "a passphrase source is required (--passphrase-file or --passphrase-fd)".into(),
                )
            })?;
            let pass = source.read(true)?;
            PassphraseBackend::new(pass, keys.argon2)
                .generate_dek(None, &ctx)
                .await?
        }
    };
    Ok(volume::create(path, spec, uuid, vec![wrapped], &dek)?)
}

fn validate_spec(spec: &VolumeSpec) -> Result<(), VolumeError> {
    if spec.sector_size != 512 && spec.sector_size != 4096 {
        return Err(VolumeError::BadSectorSize(spec.sector_size));
    }
    if spec.size == 0 || spec.size % u64::from(spec.sector_size) != 0 {
        return Err(VolumeError::BadSize {
            size: spec.size,
            sector_size: spec.sector_size,
        });
    }
    Ok(())
}

/// Reads the header, unwraps the DEK through the first keyslot that works, verifies the
/// header with it and opens the volume. The DEK is unwrapped exactly once here.
pub async fn unlock(
    path: &Path,
    keys: &KeyOptions,
    opts: OpenOptions,
) -> Result<(Volume, Header, HeaderHealth), OpsError> {
    let (header, health) = volume::read_header(path)?;
    if let CopyStatus::Damaged(reason) = &health.primary {
        tracing::warn!(path = %path.display(), %reason, "primary header copy is damaged; opened from the secondary copy (it is repaired on the next header write)");
    }
    if let CopyStatus::Damaged(reason) = &health.secondary {
        tracing::warn!(path = %path.display(), %reason, "secondary header copy is damaged (it is repaired on the next header write)");
    }
    let ctx = EncryptionContext::for_volume(&header.uuid);
    let mut failures = Vec::new();
    let mut local: Option<LocalKeystore> = None;
    let mut passphrase: Option<PassphraseBackend> = None;
    for (i, slot) in header.keyslots.iter().enumerate() {
        let result = match slot.backend.as_str() {
            "local" => {
                if local.is_none() {
                    match keys.local(false) {
                        Ok(ks) => local = Some(ks),
                        Err(e) => {
                            failures
                                .push(format!("  keyslot {i} (local, key {}): {e}", slot.key_id));
                            continue;
                        }
                    }
                }
                match &local {
                    Some(ks) => ks.unwrap(slot, &ctx).await,
                    None => continue,
                }
            }
            "passphrase" => {
                let Some(source) = &keys.passphrase else {
                    failures.push(format!("  keyslot {i} (passphrase): no passphrase given (use --passphrase-file FILE or --passphrase-fd N)"));
                    continue;
                };
                if passphrase.is_none() {
                    passphrase = Some(PassphraseBackend::new(source.read(false)?, keys.argon2));
                }
                match &passphrase {
                    Some(b) => b.unwrap(slot, &ctx).await,
                    None => continue,
                }
            }
            other => {
                failures.push(format!(
                    "  keyslot {i}: backend {other:?} is not available in this build"
                ));
                continue;
            }
        };
        match result {
            Ok(dek) => {
                let vol = Volume::open(path, &header, dek, opts)?;
                tracing::debug!(path = %path.display(), slot = i, backend = %slot.backend, "unlocked volume");
                return Ok((vol, header, health));
            }
            Err(e) => failures.push(format!(
                "  keyslot {i} ({}{}): {e}",
                slot.backend,
                key_suffix(slot)
            )),
        }
    }
    Err(OpsError::NoUsableKeyslot {
        path: path.display().to_string(),
        details: failures.join("\n"),
    })
}

fn key_suffix(slot: &WrappedDek) -> String {
    if slot.key_id.is_empty() {
        String::new()
    } else {
        format!(", key {}", slot.key_id)
    }
}

/// What `cryptvol info` shows. Never key material.
#[derive(Debug, serde::Serialize)]
pub struct VolumeInfo {
    pub path: String,
    pub format_version: u32,
    pub uuid: String,
    pub size: u64,
    pub sector_size: u32,
    pub data_offset: u64,
    pub cipher: String,
    pub sequence: u64,
    pub keyslots: Vec<KeyslotInfo>,
    pub header: HeaderHealthInfo,
}

#[derive(Debug, serde::Serialize)]
pub struct KeyslotInfo {
    pub slot: usize,
    pub backend: String,
    pub key_id: String,
    pub encryption_context: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, serde::Serialize)]
pub struct HeaderHealthInfo {
    pub primary: String,
    pub secondary: String,
    pub healthy: bool,
}

fn copy_status(c: &CopyStatus) -> String {
    match c {
        CopyStatus::Ok => "ok".to_string(),
        CopyStatus::Stale(seq) => format!("stale (sequence {seq})"),
        CopyStatus::Damaged(reason) => format!("damaged: {reason}"),
    }
}

/// Describes a volume from its header alone (no key needed).
pub fn info(path: &Path) -> Result<VolumeInfo, OpsError> {
    let (h, health) = volume::read_header(path)?;
    Ok(VolumeInfo {
        path: path.display().to_string(),
        format_version: h.format_version,
        uuid: h.uuid.to_string(),
        size: h.size,
        sector_size: h.sector_size,
        data_offset: h.data_offset,
        cipher: h.cipher.clone(),
        sequence: h.sequence,
        keyslots: h
            .keyslots
            .iter()
            .enumerate()
            .map(|(slot, k)| KeyslotInfo {
                slot,
                backend: k.backend.clone(),
                key_id: k.key_id.clone(),
                encryption_context: k.context.0.clone(),
            })
            .collect(),
        header: HeaderHealthInfo {
            primary: copy_status(&health.primary),
            secondary: copy_status(&health.secondary),
            healthy: health.primary == CopyStatus::Ok && health.secondary == CopyStatus::Ok,
        },
    })
}
