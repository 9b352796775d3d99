//! Volume lifecycle operations composed from `volume/` and `keys/`: create a volume
//! with a new data key, unlock one (unwrap its DEK through the right backend), describe
//! one, and change its keyslots without touching data (rekey, keyslot add/remove).
//! No protocol knowledge lives here.

use std::path::{Path, PathBuf};

use crate::crypto::Dek;
use crate::keys::{
    default_keystore_dir, Argon2Params, EncryptionContext, KeyError, KeyOp, KeyRef, KeyService,
    LocalKeystore, PassphraseBackend, PassphraseSource, WrappedDek, AWS_KMS,
};
use crate::volume::{
    self, crash_point, CopyStatus, Header, HeaderHealth, OpenOptions, Volume, VolumeError,
    VolumeSpec, MAX_KEYSLOTS,
};

/// Errors of lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path} (volume {uuid}): no keyslot could be unlocked:\n{details}")]
    NoUsableKeyslot {
        path: String,
        uuid: String,
        details: String,
    },
    #[error("{path}: {reason}")]
    Keyslot { path: String, reason: String },
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
    /// `--audit-log PATH`; `None` means `audit.jsonl` in the keystore directory.
    pub audit_log: Option<PathBuf>,
}

impl KeyOptions {
    /// The keystore directory in effect.
    pub fn keystore_dir(&self) -> PathBuf {
        self.keystore.clone().unwrap_or_else(default_keystore_dir)
    }
    /// Opens the local keystore (creating it when `create`), auditing into the log in
    /// effect.
    pub fn local(&self, create: bool) -> Result<LocalKeystore, KeyError> {
        self.service().local(create)
    }
    /// The key service over the keystore and audit log in effect.
    pub fn service(&self) -> KeyService {
        KeyService::new(&self.keystore_dir(), self.audit_log.as_deref())
    }
}

/// Which master key wraps a data key.
pub enum NewKey<'a> {
    /// The configured default key (`cryptvol key set-default`), else the local default
    /// key (created on first use).
    Default,
    /// A key reference: local id or alias, `exec:NAME[:KEY]`, an AWS KMS key.
    Key(KeyRef),
    /// A passphrase read from this source (asked twice when prompting).
    Passphrase(&'a PassphraseSource),
}

impl NewKey<'_> {
    /// A key reference as typed (`None`: the default key).
    pub fn parse(reference: Option<&str>) -> Result<NewKey<'static>, KeyError> {
        match reference {
            None => Ok(NewKey::Default),
            Some(r) => Ok(NewKey::Key(KeyRef::parse(r)?)),
        }
    }
}

/// Wraps `dek` under `target` for `op`.
async fn wrap_for(
    keys: &KeyOptions,
    svc: &KeyService,
    target: &NewKey<'_>,
    dek: &Dek,
    ctx: &EncryptionContext,
    op: KeyOp,
) -> Result<WrappedDek, KeyError> {
    match target {
        NewKey::Default => svc.wrap(&svc.default_key()?, dek, ctx, op).await,
        NewKey::Key(r) => svc.wrap(r, dek, ctx, op).await,
        NewKey::Passphrase(source) => {
            let backend = PassphraseBackend::new(source.read(true)?, keys.argon2);
            svc.wrap_passphrase(&backend, dek, ctx, op).await
        }
    }
}

/// Creates a new volume at `path` with a fresh random DEK wrapped by the chosen key.
pub async fn create_volume(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
) -> Result<Header, OpsError> {
    create_volume_with(path, spec, key, keys, &CreateOptions::default()).await
}

/// Extra choices of `cryptvol create`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// Fill the whole data area with ciphertext (of zeros) and mark every chunk
    /// allocated, so the file never shows which blocks were written. Costs the full
    /// size in disk space and a write of the whole volume up front.
    pub preallocate: bool,
    /// Show a progress bar (else only log lines) while preallocating.
    pub progress: bool,
    /// Make a volume without an allocation map (the original v1 layout, readable by
    /// cryptvol before 0.2; never-written blocks read as pseudo-random bytes).
    pub no_allocation_map: bool,
}

/// [`create_volume`] with [`CreateOptions`]. A failed preallocation removes the file.
pub async fn create_volume_with(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
    opts: &CreateOptions,
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
    let svc = keys.service();
    let (dek, wrapped) = match &key {
        NewKey::Default => svc.generate(&svc.default_key()?, &ctx).await?,
        NewKey::Key(r) => svc.generate(r, &ctx).await?,
        NewKey::Passphrase(_) => {
            let dek = Dek::generate().map_err(KeyError::from)?;
            let wrapped = wrap_for(keys, &svc, &key, &dek, &ctx, KeyOp::Generate).await?;
            (dek, wrapped)
        }
    };
    let header = volume::create_with(
        path,
        spec,
        uuid,
        vec![wrapped],
        &dek,
        !opts.no_allocation_map,
    )?;
    if opts.preallocate {
        let result = (|| {
            let vol = Volume::open(path, &header, dek, OpenOptions::default())?;
            let progress = if opts.progress {
                crate::progress::Progress::new(
                    format!("preallocate {}", path.display()),
                    header.size,
                )
            } else {
                crate::progress::Progress::hidden(header.size)
            };
            vol.preallocate(&|done| progress.set_done(done))?;
            progress.finish();
            Ok::<(), VolumeError>(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(e.into());
        }
    }
    Ok(header)
}

fn validate_spec(spec: &VolumeSpec) -> Result<(), VolumeError> {
    if spec.sector_size != 512 && spec.sector_size != 4096 {
        return Err(VolumeError::BadSectorSize(spec.sector_size));
    }
    if spec.size == 0 || !spec.size.is_multiple_of(u64::from(spec.sector_size)) {
        return Err(VolumeError::BadSize {
            size: spec.size,
            sector_size: spec.sector_size,
        });
    }
    Ok(())
}

fn warn_health(path: &Path, health: &HeaderHealth) {
    if let CopyStatus::Damaged(reason) = &health.primary {
        tracing::warn!(path = %path.display(), %reason, "primary header copy is damaged; opened from the secondary copy (it is repaired on the next header write)");
    }
    if let CopyStatus::Damaged(reason) = &health.secondary {
        tracing::warn!(path = %path.display(), %reason, "secondary header copy is damaged (it is repaired on the next header write)");
    }
}

/// Unwraps the DEK through the first keyslot that works (trying `order`), for `op`, and
/// checks it against the header (key check value and header MAC). Returns the DEK and
/// the slot that gave it.
async fn unlock_dek(
    path: &Path,
    header: &Header,
    keys: &KeyOptions,
    op: KeyOp,
    order: &[usize],
) -> Result<(Dek, usize), OpsError> {
    let ctx = EncryptionContext::for_volume(&header.uuid);
    let svc = keys.service();
    let mut failures = Vec::new();
    let mut passphrase: Option<PassphraseBackend> = None;
    for &i in order {
        let Some(slot) = header.keyslots.get(i) else {
            continue;
        };
        if slot.backend == crate::keys::PASSPHRASE && passphrase.is_none() {
            match &keys.passphrase {
                Some(source) => {
                    passphrase = Some(PassphraseBackend::new(source.read(false)?, keys.argon2))
                }
                None => {
                    failures.push(format!("  keyslot {i} (passphrase): no passphrase given (use --passphrase-file FILE or --passphrase-fd N)"));
                    continue;
                }
            }
        }
        match svc.unwrap(slot, &ctx, op, passphrase.as_ref()).await {
            Ok(dek) => match header.verify_with_dek(&dek, path) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), slot = i, backend = %slot.backend, "unlocked volume");
                    return Ok((dek, i));
                }
                Err(VolumeError::KeyCheckFailed { .. }) => failures.push(format!(
                    "  keyslot {i} ({}{}): it holds a data key that is not this volume's (key check failed)",
                    slot.backend.escape_debug(),
                    key_suffix(slot)
                )),
                Err(e) => return Err(e.into()),
            },
            Err(e) => failures.push(format!(
                "  keyslot {i} ({}{}): {e}",
                slot.backend.escape_debug(),
                key_suffix(slot)
            )),
        }
    }
    if failures.is_empty() {
        failures.push("  (no keyslot to try)".to_string());
    }
    Err(OpsError::NoUsableKeyslot {
        path: path.display().to_string(),
        uuid: header.uuid.to_string(),
        details: failures.join("\n"),
    })
}

/// Reads the header, unwraps the DEK through the first keyslot that works, verifies the
/// header with it and opens the volume. The DEK is unwrapped exactly once here.
pub async fn unlock(
    path: &Path,
    keys: &KeyOptions,
    opts: OpenOptions,
) -> Result<(Volume, Header, HeaderHealth), OpsError> {
    let (header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    let order: Vec<usize> = (0..header.keyslots.len()).collect();
    let (dek, _) = unlock_dek(path, &header, keys, KeyOp::Unwrap, &order).await?;
    let vol = Volume::open(path, &header, dek, opts)?;
    Ok((vol, header, health))
}

/// Destroys local keys whose deletion waiting period has passed (run explicitly with
/// `cryptvol key purge`, and when `serve` starts). Returns the deleted key ids.
pub fn purge_expired_keys(keys: &KeyOptions) -> Result<Vec<String>, KeyError> {
    keys.service().purge_expired()
}

/// The result of a keyslot change.
#[derive(Debug)]
pub struct KeyslotChange {
    /// The header as written.
    pub header: Header,
    /// The keyslot that was replaced, added or removed.
    pub slot: usize,
    /// The keyslot before the change (rekey, remove).
    pub old: Option<WrappedDek>,
}

fn keyslot_err(path: &Path, reason: String) -> OpsError {
    OpsError::Keyslot {
        path: path.display().to_string(),
        reason,
    }
}

fn slot_list(header: &Header) -> String {
    header
        .keyslots
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{i} ({}{})", s.backend.escape_debug(), key_suffix(s)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rewraps the volume's DEK under `target` and replaces keyslot `slot` (default: the
/// only keyslot) with the new wrap, in one crash-safe header update. The data area is
/// not touched. The DEK is unlocked through any keyslot (the replaced one first).
pub async fn rekey(
    path: &Path,
    keys: &KeyOptions,
    target: NewKey<'_>,
    slot: Option<usize>,
) -> Result<KeyslotChange, OpsError> {
    let (mut header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    let n = header.keyslots.len();
    let slot = match slot {
        Some(s) if s < n => s,
        Some(s) => {
            return Err(keyslot_err(
                path,
                format!(
                    "there is no keyslot {s}; the keyslots are {}",
                    slot_list(&header)
                ),
            ))
        }
        None if n == 1 => 0,
        None => {
            return Err(keyslot_err(
                path,
                format!(
                    "the volume has {n} keyslots ({}); say which one to rekey with --slot N",
                    slot_list(&header)
                ),
            ))
        }
    };
    let mut order = vec![slot];
    order.extend((0..n).filter(|&i| i != slot));
    let (dek, _) = unlock_dek(path, &header, keys, KeyOp::RewrapFrom, &order).await?;
    crash_point("after-unwrap");
    let ctx = EncryptionContext::for_volume(&header.uuid);
    let svc = keys.service();
    let wrapped = match &target {
        // Between two AWS KMS keys the data key is moved inside KMS (ReEncrypt).
        NewKey::Key(KeyRef::AwsKms(to)) if header.keyslots[slot].backend == AWS_KMS => {
            svc.reencrypt_aws(&header.keyslots[slot], &ctx, to).await?
        }
        _ => wrap_for(keys, &svc, &target, &dek, &ctx, KeyOp::RewrapTo).await?,
    };
    crash_point("after-wrap");
    let old = std::mem::replace(&mut header.keyslots[slot], wrapped);
    volume::write_header(path, &mut header, &dek)?;
    Ok(KeyslotChange {
        header,
        slot,
        old: Some(old),
    })
}

/// Adds a keyslot wrapping the volume's DEK under `target` (e.g. a recovery
/// passphrase), in one crash-safe header update.
pub async fn keyslot_add(
    path: &Path,
    keys: &KeyOptions,
    target: NewKey<'_>,
) -> Result<KeyslotChange, OpsError> {
    let (mut header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    if header.keyslots.len() >= MAX_KEYSLOTS {
        return Err(keyslot_err(
            path,
            format!(
                "the volume already has the maximum of {MAX_KEYSLOTS} keyslots; remove one first"
            ),
        ));
    }
    let order: Vec<usize> = (0..header.keyslots.len()).collect();
    let (dek, _) = unlock_dek(path, &header, keys, KeyOp::RewrapFrom, &order).await?;
    crash_point("after-unwrap");
    let ctx = EncryptionContext::for_volume(&header.uuid);
    let svc = keys.service();
    let wrapped = wrap_for(keys, &svc, &target, &dek, &ctx, KeyOp::RewrapTo).await?;
    crash_point("after-wrap");
    header.keyslots.push(wrapped);
    let slot = header.keyslots.len() - 1;
    volume::write_header(path, &mut header, &dek)?;
    Ok(KeyslotChange {
        header,
        slot,
        old: None,
    })
}

/// Removes keyslot `slot`, in one crash-safe header update. Refuses to remove the last
/// keyslot. The volume must be unlocked through one of the keyslots that remain, so
/// the caller cannot lock themselves out.
pub async fn keyslot_remove(
    path: &Path,
    keys: &KeyOptions,
    slot: usize,
) -> Result<KeyslotChange, OpsError> {
    let (mut header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    let n = header.keyslots.len();
    if slot >= n {
        return Err(keyslot_err(
            path,
            format!(
                "there is no keyslot {slot}; the keyslots are {}",
                slot_list(&header)
            ),
        ));
    }
    if n == 1 {
        return Err(keyslot_err(
            path,
            "refusing to remove the last keyslot: the volume would become unreadable; add \
                another keyslot first (cryptvol keyslot add), or use rekey to change its key"
                .to_string(),
        ));
    }
    let order: Vec<usize> = (0..n).filter(|&i| i != slot).collect();
    let (dek, _) = unlock_dek(path, &header, keys, KeyOp::RewrapFrom, &order).await?;
    crash_point("after-unwrap");
    let old = header.keyslots.remove(slot);
    volume::write_header(path, &mut header, &dek)?;
    Ok(KeyslotChange {
        header,
        slot,
        old: Some(old),
    })
}

fn key_suffix(slot: &WrappedDek) -> String {
    if slot.key_id.is_empty() {
        String::new()
    } else {
        format!(", key {}", slot.key_id.escape_debug())
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
    /// The allocation map (thin volumes); `null` for volumes made before it existed
    /// (everything allocated). Read from the file: on a served volume it reflects the
    /// last flush.
    pub allocation: Option<AllocationInfo>,
}

#[derive(Debug, serde::Serialize)]
pub struct AllocationInfo {
    pub chunk_size: u32,
    pub chunks: u64,
    pub allocated_chunks: u64,
    pub allocated_bytes: u64,
    /// "ok", or what is wrong with the map.
    pub map: String,
    pub map_healthy: bool,
    pub map_pages: u64,
    pub map_pages_one_copy_bad: u64,
    pub map_pages_damaged: Vec<u64>,
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

/// Describes a volume from its header and allocation map (no key needed).
pub fn info(path: &Path) -> Result<VolumeInfo, OpsError> {
    let (h, health) = volume::read_header(path)?;
    let allocation = volume::map_summary(path, &h)?.map(|m| AllocationInfo {
        chunk_size: m.chunk_size,
        chunks: m.chunks,
        allocated_chunks: m.allocated_chunks,
        allocated_bytes: m.allocated_bytes,
        map: if m.health.is_healthy() {
            "ok".to_string()
        } else if !m.health.pages_damaged.is_empty() {
            format!(
                "{} of {} pages damaged in both copies (treated as allocated; rewritten when the volume is next opened for writing)",
                m.health.pages_damaged.len(),
                m.health.pages
            )
        } else {
            format!(
                "{} of {} pages have one damaged copy (the other is used; repaired when the volume is next opened for writing)",
                m.health.pages_one_copy_bad, m.health.pages
            )
        },
        map_healthy: m.health.is_healthy(),
        map_pages: m.health.pages,
        map_pages_one_copy_bad: m.health.pages_one_copy_bad,
        map_pages_damaged: m.health.pages_damaged,
    });
    Ok(VolumeInfo {
        allocation,
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

/// The master key a keyslot is wrapped under, as a key reference (`None`: a passphrase
/// keyslot, which has no key to name).
pub fn slot_key_ref(path: &Path, slot: &WrappedDek) -> Result<Option<KeyRef>, OpsError> {
    let bad = |why: &str| {
        keyslot_err(
            path,
            format!(
                "keyslot ({}{}) {why}",
                slot.backend.escape_debug(),
                key_suffix(slot)
            ),
        )
    };
    match slot.backend.as_str() {
        crate::keys::PASSPHRASE => Ok(None),
        crate::keys::LOCAL if !slot.key_id.is_empty() => {
            Ok(Some(KeyRef::Local(Some(slot.key_id.clone()))))
        }
        crate::keys::EXEC => match slot.key_id.split_once(':') {
            Some((name, key)) if !name.is_empty() && !key.is_empty() => Ok(Some(KeyRef::Exec {
                name: name.to_string(),
                key: Some(key.to_string()),
            })),
            _ => Err(bad("has a malformed exec key id (expected NAME:KEY)")),
        },
        AWS_KMS if !slot.key_id.is_empty() => Ok(Some(KeyRef::AwsKms(slot.key_id.clone()))),
        _ => Err(bad("names no key this cryptvol can wrap under")),
    }
}

/// The message for a passphrase keyslot met by the daemon (online re-encryption).
fn passphrase_slot_refusal(path: &Path, slots: &[usize]) -> OpsError {
    let list = slots
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    keyslot_err(
        path,
        format!(
            "cannot re-encrypt online: keyslot {list} is a passphrase keyslot, and the daemon \
             does not keep passphrases, so it cannot wrap the new data key for it. Re-encrypt \
             offline instead (stop serving the volume, then run `cryptvol reencrypt {file} \
             --passphrase-file FILE`), or remove the passphrase keyslot first (`cryptvol \
             keyslot remove {file} N`)",
            file = path.display()
        ),
    )
}

/// For a re-encryption: a fresh DEK wrapped for every keyslot of `header` (same order,
/// the volume's encryption context): each key keyslot under the same master key (same
/// backend and key id), each passphrase keyslot under `passphrase`, which must open the
/// old keyslot (checked first, so a mistyped passphrase cannot lock the slot's owner
/// out). Without `passphrase`, a volume with passphrase keyslots is refused with advice
/// to re-encrypt offline, before anything is generated.
pub async fn reencrypt_new_dek(
    path: &Path,
    header: &Header,
    keys: &KeyOptions,
    passphrase: Option<&PassphraseBackend>,
) -> Result<(Dek, Vec<WrappedDek>), OpsError> {
    let mut targets = Vec::with_capacity(header.keyslots.len());
    let mut pass_slots = Vec::new();
    for (i, slot) in header.keyslots.iter().enumerate() {
        let r = slot_key_ref(path, slot)?;
        if r.is_none() {
            pass_slots.push(i);
        }
        targets.push(r);
    }
    if targets.is_empty() {
        return Err(keyslot_err(path, "the volume has no keyslot".into()));
    }
    let ctx = EncryptionContext::for_volume(&header.uuid);
    let svc = keys.service();
    if !pass_slots.is_empty() {
        let Some(pb) = passphrase else {
            return Err(passphrase_slot_refusal(path, &pass_slots));
        };
        for &i in &pass_slots {
            if let Err(e) = svc
                .unwrap(&header.keyslots[i], &ctx, KeyOp::RewrapFrom, Some(pb))
                .await
            {
                return Err(keyslot_err(
                    path,
                    format!(
                        "keyslot {i} (passphrase): the passphrase given does not open it ({e}); \
                         give its passphrase, or remove that keyslot first"
                    ),
                ));
            }
        }
    }
    let dek = Dek::generate().map_err(KeyError::from)?;
    let mut wrapped = Vec::with_capacity(targets.len());
    for target in targets {
        let w = match (target, passphrase) {
            (Some(r), _) => {
                wrap_for(keys, &svc, &NewKey::Key(r), &dek, &ctx, KeyOp::Generate).await?
            }
            (None, Some(pb)) => svc.wrap_passphrase(pb, &dek, &ctx, KeyOp::Generate).await?,
            (None, None) => return Err(passphrase_slot_refusal(path, &pass_slots)),
        };
        wrapped.push(w);
    }
    Ok((dek, wrapped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretBytes;

    const FAST: Argon2Params = Argon2Params {
        memory_kib: 8192,
        time: 1,
        lanes: 1,
    };

    fn keys(dir: &Path, pass: Option<&Path>) -> KeyOptions {
        KeyOptions {
            keystore: Some(dir.join("keys")),
            passphrase: pass.map(|p| PassphraseSource::File(p.to_path_buf())),
            argon2: FAST,
            audit_log: None,
        }
    }

    #[test]
    fn slot_key_refs() {
        let p = Path::new("v.img");
        let slot = |backend: &str, key_id: &str| WrappedDek {
            backend: backend.into(),
            key_id: key_id.into(),
            blob: vec![],
            context: EncryptionContext::default(),
            params: Default::default(),
        };
        assert_eq!(
            slot_key_ref(p, &slot("local", "mk-1")).unwrap(),
            Some(KeyRef::Local(Some("mk-1".into())))
        );
        assert_eq!(
            slot_key_ref(p, &slot("exec", "vault:k1")).unwrap(),
            Some(KeyRef::Exec {
                name: "vault".into(),
                key: Some("k1".into())
            })
        );
        assert_eq!(
            slot_key_ref(p, &slot("aws-kms", "arn:aws:kms:r:1:key/x")).unwrap(),
            Some(KeyRef::AwsKms("arn:aws:kms:r:1:key/x".into()))
        );
        assert_eq!(slot_key_ref(p, &slot("passphrase", "")).unwrap(), None);
        assert!(slot_key_ref(p, &slot("exec", "novault")).is_err());
        assert!(slot_key_ref(p, &slot("tpm", "x")).is_err());
        assert!(slot_key_ref(p, &slot("local", "")).is_err());
    }

    #[tokio::test]
    async fn new_dek_is_wrapped_for_every_keyslot_under_the_same_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let pass = tmp.path().join("pass");
        std::fs::write(&pass, "correct horse\n").unwrap();
        let wrong = tmp.path().join("wrong");
        std::fs::write(&wrong, "wrong horse\n").unwrap();
        let file = tmp.path().join("v.img");
        let k = keys(tmp.path(), None);
        let spec = VolumeSpec {
            size: 1 << 20,
            sector_size: 4096,
        };
        create_volume(&file, &spec, NewKey::Key(KeyRef::Local(None)), &k)
            .await
            .unwrap();
        let src = PassphraseSource::File(pass.clone());
        keyslot_add(&file, &k, NewKey::Passphrase(&src))
            .await
            .unwrap();
        let (header, _) = volume::read_header(&file).unwrap();
        let (old, _) = unlock_dek(&file, &header, &k, KeyOp::Unwrap, &[0])
            .await
            .unwrap();

        // The daemon (no passphrase) is refused, with advice to go offline.
        let err = reencrypt_new_dek(&file, &header, &k, None)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("keyslot 1 is a passphrase keyslot")
                && err.contains("does not keep passphrases")
                && err.contains("cryptvol reencrypt")
                && err.contains("--passphrase-file"),
            "{err}"
        );
        // A wrong passphrase is caught before anything is wrapped.
        let bad = PassphraseBackend::new(SecretBytes::new(b"wrong horse".to_vec()), FAST);
        let err = reencrypt_new_dek(&file, &header, &k, Some(&bad))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not open it"), "{err}");
        let _ = wrong;

        let good = PassphraseBackend::new(SecretBytes::new(b"correct horse".to_vec()), FAST);
        let (dek, slots) = reencrypt_new_dek(&file, &header, &k, Some(&good))
            .await
            .unwrap();
        assert_ne!(dek.expose(), old.expose());
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].backend, "local");
        assert_eq!(slots[0].key_id, header.keyslots[0].key_id);
        assert_ne!(slots[0].blob, header.keyslots[0].blob);
        assert_eq!(slots[1].backend, "passphrase");
        let ctx = EncryptionContext::for_volume(&header.uuid);
        assert!(slots.iter().all(|s| s.context == ctx));
        let svc = k.service();
        let a = svc
            .unwrap(&slots[0], &ctx, KeyOp::Unwrap, None)
            .await
            .unwrap();
        let b = svc
            .unwrap(&slots[1], &ctx, KeyOp::Unwrap, Some(&good))
            .await
            .unwrap();
        assert_eq!(a.expose(), dek.expose());
        assert_eq!(b.expose(), dek.expose());
    }
}
