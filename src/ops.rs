//! Volume lifecycle operations composed from `volume/` and `keys/`: create a volume
//! with a new data key, unlock one (unwrap its DEK through the right backend), describe
//! one, and change its keyslots without touching data (rekey, keyslot add/remove).
//! No protocol knowledge lives here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::crypto::Dek;
use crate::keys::{
    default_keystore_dir, Argon2Params, EncryptionContext, KeyError, KeyOp, KeyRef, KeyService,
    LocalKeystore, PassphraseBackend, PassphraseSource, WrappedDek, AWS_KMS,
};
use crate::progress::Progress;
use crate::snapshot::{
    self, CopyStats, CreateStats, Manifest, RestoreStats, SnapshotError, SnapshotId, Store,
    VolumeKeys,
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
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{path} is being served by a running cryptvol (its open lock is held): a served volume is snapshotted through the daemon that serves it (`cryptvol snapshot create EXPORT [--control SOCKET]`), or stop serving it first")]
    VolumeServed { path: String },
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
    if !opts.preallocate {
        let (header, _) = create_with_dek(path, spec, key, keys, !opts.no_allocation_map).await?;
        return Ok(header);
    }
    // A preallocation takes a while: build it under a hidden name, published only when
    // complete (an interrupted one is removed by the next run).
    if path.exists() {
        return Err(VolumeError::AlreadyExists {
            path: path.display().to_string(),
        }
        .into());
    }
    let partial = partial_path(path);
    match std::fs::remove_file(&partial) {
        Ok(()) => tracing::info!(path = %partial.display(), "removed an interrupted preallocation"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(VolumeError::Io {
                path: partial.display().to_string(),
                source: e,
            }
            .into())
        }
    }
    let (header, dek) = create_with_dek(&partial, spec, key, keys, !opts.no_allocation_map).await?;
    {
        let path = partial.as_path();
        let result = (|| {
            let vol = Volume::open(path, &header, dek, OpenOptions::default())?;
            let progress = if opts.progress {
                Progress::new(format!("preallocate {}", path.display()), header.size)
            } else {
                Progress::hidden(header.size)
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
    if let Err(e) = publish_partial(&partial, path) {
        let _ = std::fs::remove_file(&partial);
        return Err(e.into());
    }
    Ok(header)
}

/// Like [`create_volume`], and opens the new (thin) volume with the DEK it was made
/// with (no second unwrap: a passphrase read from a descriptor can be read only once).
pub async fn create_and_open(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
    opts: OpenOptions,
) -> Result<(Volume, Header), OpsError> {
    let (header, dek) = create_with_dek(path, spec, key, keys, true).await?;
    let vol = Volume::open(path, &header, dek, opts)?;
    Ok((vol, header))
}

async fn create_with_dek(
    path: &Path,
    spec: &VolumeSpec,
    key: NewKey<'_>,
    keys: &KeyOptions,
    thin: bool,
) -> Result<(Header, Dek), OpsError> {
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
    let header = volume::create_with(path, spec, uuid, vec![wrapped], &dek, thin)?;
    Ok((header, dek))
}

/// Keyslot changes while a re-encryption is in progress would be lost when it finishes
/// (the new key's slots replace the old ones): refuse them.
fn refuse_during_reencryption(path: &Path, header: &Header) -> Result<(), VolumeError> {
    match &header.reencrypt {
        Some(r) => Err(VolumeError::Reencrypt {
            path: path.display().to_string(),
            detail: format!(
                "a re-encryption is in progress ({} of {} bytes done); change keyslots after it finishes (cryptvol reencrypt --status)",
                r.watermark, header.size
            ),
        }),
        None => Ok(()),
    }
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
    let verify = |d: &Dek| header.verify_with_dek(d, path);
    unlock_slots(path, header, &header.keyslots, keys, op, order, &verify).await
}

/// Unwraps a DEK through the first of `slots` (in `order`) that works and passes
/// `verify` (the key check value and MAC of the header, or of a re-encryption's new key).
async fn unlock_slots(
    path: &Path,
    header: &Header,
    slots: &[WrappedDek],
    keys: &KeyOptions,
    op: KeyOp,
    order: &[usize],
    verify: &(dyn Fn(&Dek) -> Result<(), VolumeError> + Sync),
) -> Result<(Dek, usize), OpsError> {
    let check = |d: &Dek| match verify(d) {
        Ok(()) => Ok(true),
        Err(VolumeError::KeyCheckFailed { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    };
    let target = SlotTarget {
        ctx: EncryptionContext::for_volume(&header.uuid),
        check: &check,
        wrong_key: "it holds a data key that is not this volume's (key check failed)",
        name: path.display().to_string(),
        uuid: header.uuid.to_string(),
    };
    unlock_from(slots, keys, op, order, &target).await
}

/// What keyslots are unlocked for (a volume, a re-encryption's new key, a snapshot).
struct SlotTarget<'a> {
    /// The encryption context the slots are bound to.
    ctx: EncryptionContext,
    /// Checks an unwrapped DEK: `Ok(true)` it is the one, `Ok(false)` a data key that is
    /// not this target's (key check failed: try the next slot), `Err` stop.
    check: &'a (dyn Fn(&Dek) -> Result<bool, OpsError> + Sync),
    /// The failure line for `Ok(false)`.
    wrong_key: &'a str,
    /// How errors name the target, and its UUID.
    name: String,
    uuid: String,
}

/// The keyslot loop shared by volumes and snapshots: tries `slots` in `order` (reading
/// the passphrase once, when the first passphrase slot comes), returns the first DEK
/// `target.check` accepts and its slot, else `NoUsableKeyslot` listing why each failed.
async fn unlock_from(
    slots: &[WrappedDek],
    keys: &KeyOptions,
    op: KeyOp,
    order: &[usize],
    target: &SlotTarget<'_>,
) -> Result<(Dek, usize), OpsError> {
    let svc = keys.service();
    let mut failures = Vec::new();
    let mut passphrase: Option<PassphraseBackend> = None;
    for &i in order {
        let Some(slot) = slots.get(i) else {
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
        match svc.unwrap(slot, &target.ctx, op, passphrase.as_ref()).await {
            Ok(dek) => {
                if (target.check)(&dek)? {
                    tracing::debug!(target = %target.name, slot = i, backend = %slot.backend, "unlocked");
                    return Ok((dek, i));
                }
                failures.push(format!(
                    "  keyslot {i} ({}{}): {}",
                    slot.backend.escape_debug(),
                    key_suffix(slot),
                    target.wrong_key
                ));
            }
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
        path: target.name.clone(),
        uuid: target.uuid.clone(),
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
    let (mut header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    let order: Vec<usize> = (0..header.keyslots.len()).collect();
    let (dek, _) = unlock_dek(path, &header, keys, KeyOp::Unwrap, &order).await?;
    if !opts.read_only && !health.is_healthy() {
        // A damaged or stale copy (an interrupted header update, e.g. a crash while a
        // re-encryption finished: the stale copy may still hold an old wrapped key):
        // rewrite both copies from the verified header now.
        volume::write_header(path, &mut header, &dek)?;
        tracing::info!(path = %path.display(), "rewrote both header copies (one was damaged or stale)");
    }
    // A re-encryption in progress: the new data key is needed too.
    let next = match &header.reencrypt {
        Some(r) => {
            let order: Vec<usize> = (0..r.keyslots.len()).collect();
            let verify = |d: &Dek| header.verify_next_dek(d, path);
            let (next, _) = unlock_slots(
                path,
                &header,
                &r.keyslots,
                keys,
                KeyOp::Unwrap,
                &order,
                &verify,
            )
            .await?;
            tracing::info!(path = %path.display(), watermark = r.watermark, size = header.size, "a re-encryption is in progress; it resumes when the volume is served or `cryptvol reencrypt` runs");
            Some(next)
        }
        None => None,
    };
    let vol = Volume::open_with_next(path, &header, dek, next, opts)?;
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
    refuse_during_reencryption(path, &header)?;
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
    refuse_during_reencryption(path, &header)?;
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
    refuse_during_reencryption(path, &header)?;
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
    /// A re-encryption under a new data key in progress (`null` when none): as recorded
    /// in the header (on a served volume, as of the last step).
    pub reencrypt: Option<ReencryptionInfo>,
}

/// `cryptvol info`: the header's record of a re-encryption in progress.
#[derive(Debug, serde::Serialize)]
pub struct ReencryptionInfo {
    /// Bytes of the data area already under the new data key.
    pub watermark: u64,
    /// Size of the data area.
    pub size: u64,
    /// Wrapped copies of the new data key (they replace the keyslots at the end).
    pub new_keyslots: Vec<KeyslotInfo>,
    /// The zone of a step interrupted by a crash (finished when the volume is next
    /// opened for writing), or `null`.
    pub hotzone: Option<HotzoneInfo>,
}

/// The zone of an interrupted re-encryption step.
#[derive(Debug, serde::Serialize)]
pub struct HotzoneInfo {
    pub offset: u64,
    pub length: u64,
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
    let slot_info = |slots: &[WrappedDek]| -> Vec<KeyslotInfo> {
        slots
            .iter()
            .enumerate()
            .map(|(slot, k)| KeyslotInfo {
                slot,
                backend: k.backend.clone(),
                key_id: k.key_id.clone(),
                encryption_context: k.context.0.clone(),
            })
            .collect()
    };
    let reencrypt = h.reencrypt.as_ref().map(|r| ReencryptionInfo {
        watermark: r.watermark,
        size: h.size,
        new_keyslots: slot_info(&r.keyslots),
        hotzone: r.hotzone.as_ref().map(|z| HotzoneInfo {
            offset: z.offset,
            length: z.len,
        }),
    });
    Ok(VolumeInfo {
        allocation,
        reencrypt,
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

// ---------------------------------------------------------------------------------------
// Snapshots (src/snapshot/): the key handling around the snapshot layer.

/// Creates a volume file at `path` with the given UUID, keyslots and data key (the key
/// check value and MAC are computed from `dek`). For restores that keep a snapshot's DEK.
pub fn create_volume_with_dek(
    path: &Path,
    spec: &VolumeSpec,
    uuid: uuid::Uuid,
    keyslots: Vec<WrappedDek>,
    dek: &Dek,
) -> Result<Header, OpsError> {
    validate_spec(spec)?;
    Ok(volume::create(path, spec, uuid, keyslots, dek)?)
}

/// A fresh data key wrapped under `target` bound to `ctx` (as `create_volume` does).
async fn generate_for(
    keys: &KeyOptions,
    svc: &KeyService,
    target: &NewKey<'_>,
    ctx: &EncryptionContext,
) -> Result<(Dek, WrappedDek), KeyError> {
    match target {
        NewKey::Default => svc.generate(&svc.default_key()?, ctx).await,
        NewKey::Key(r) => svc.generate(r, ctx).await,
        NewKey::Passphrase(_) => {
            let dek = Dek::generate().map_err(KeyError::from)?;
            let wrapped = wrap_for(keys, svc, target, &dek, ctx, KeyOp::Generate).await?;
            Ok((dek, wrapped))
        }
    }
}

/// A copy of a DEK (the type is deliberately not `Clone`).
fn dek_copy(dek: &Dek) -> Result<Dek, OpsError> {
    Ok(Dek::from_slice(dek.expose()).map_err(KeyError::from)?)
}

/// Takes an offline snapshot of the volume file at `path` into `store`. The volume is
/// opened read-only, which its open lock refuses while a `cryptvol serve` has it open for
/// writing (and which keeps writers out until the snapshot is done).
pub async fn snapshot_create(
    path: &Path,
    keys: &KeyOptions,
    store: &Store,
    opts: &snapshot::CreateOptions,
) -> Result<CreateStats, OpsError> {
    let (header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    let order: Vec<usize> = (0..header.keyslots.len()).collect();
    let (dek, _) = unlock_dek(path, &header, keys, KeyOp::Unwrap, &order).await?;
    let ro = OpenOptions {
        read_only: true,
        discard: false,
    };
    let vol = match Volume::open(path, &header, dek_copy(&dek)?, ro) {
        Ok(v) => v,
        Err(VolumeError::InUse { path }) => return Err(OpsError::VolumeServed { path }),
        Err(e) => return Err(e.into()),
    };
    let progress = Progress::new(format!("snapshot {}", path.display()), header.size);
    let vk = VolumeKeys {
        uuid: header.uuid,
        keyslots: header.keyslots.clone(),
    };
    Ok(snapshot::create_snapshot(store, Arc::new(vol), &dek, &vk, opts, &progress).await?)
}

/// Unwraps a snapshot's DEK through the first keyslot that works and verifies the
/// manifest with it (key check value: a wrong key; then the MAC: tampering). Returns the
/// DEK and the keyslot that gave it.
pub async fn unlock_snapshot(m: &Manifest, keys: &KeyOptions) -> Result<(Dek, usize), OpsError> {
    let check = |d: &Dek| match m.verify(d) {
        Ok(()) => Ok(true),
        Err(SnapshotError::WrongKey { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    };
    let target = SlotTarget {
        ctx: m.expected_context()?,
        check: &check,
        wrong_key: "wrong key: it holds a data key that is not this snapshot's (key check failed)",
        name: format!("snapshot {}", m.id),
        uuid: m.volume_uuid.to_string(),
    };
    let order: Vec<usize> = (0..m.keyslots.len()).collect();
    unlock_from(&m.keyslots, keys, KeyOp::Unwrap, &order, &target).await
}

/// Whether `target` names the master key of keyslot `slot` (which unlocked the DEK).
/// Only exact matches count: a KMS alias naming the same key counts as another key (the
/// data is then re-encrypted, which is correct, only slower).
fn same_master_key(target: &NewKey<'_>, slot: &WrappedDek, keys: &KeyOptions) -> bool {
    use crate::keys::{EXEC, LOCAL, PASSPHRASE};
    let matches = |r: &KeyRef| match r {
        KeyRef::Local(name) => {
            slot.backend == LOCAL
                && keys
                    .local(false)
                    .and_then(|ks| ks.resolve(name.as_deref()))
                    .is_ok_and(|id| id == slot.key_id)
        }
        KeyRef::AwsKms(k) => {
            slot.backend == AWS_KMS
                && (slot.key_id == *k || slot.key_id.ends_with(&format!(":key/{k}")))
        }
        KeyRef::Exec { name, key } => {
            slot.backend == EXEC
                && key
                    .as_ref()
                    .is_some_and(|k| slot.key_id == format!("{name}:{k}"))
        }
    };
    match target {
        NewKey::Default => keys.service().default_key().is_ok_and(|r| matches(&r)),
        NewKey::Key(r) => matches(r),
        NewKey::Passphrase(_) => slot.backend == PASSPHRASE,
    }
}

/// The master key of a keyslot, as a wrapping target.
fn slot_key<'a>(slot: &WrappedDek, keys: &'a KeyOptions) -> Result<NewKey<'a>, OpsError> {
    use crate::keys::{EXEC, LOCAL, PASSPHRASE};
    Ok(match slot.backend.as_str() {
        LOCAL => NewKey::Key(KeyRef::Local(Some(slot.key_id.clone()))),
        AWS_KMS => NewKey::Key(KeyRef::AwsKms(slot.key_id.clone())),
        EXEC => {
            let (name, key) = slot.key_id.split_once(':').unwrap_or((&slot.key_id, ""));
            NewKey::Key(KeyRef::Exec {
                name: name.to_string(),
                key: (!key.is_empty()).then(|| key.to_string()),
            })
        }
        PASSPHRASE => match &keys.passphrase {
            Some(source) => NewKey::Passphrase(source),
            None => {
                return Err(KeyError::Unsupported(
                    "the snapshot's key is a passphrase: give it with --passphrase-file or --passphrase-fd".into(),
                )
                .into())
            }
        },
        other => {
            return Err(KeyError::Unsupported(format!(
                "keyslot backend {:?} is not available in this build",
                other.escape_debug().to_string()
            ))
            .into())
        }
    })
}

/// The hidden name a restore writes to before renaming: `.FILE.partial` beside `FILE`.
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "volume".into());
    path.with_file_name(format!(".{name}.partial"))
}

/// Gives a finished `.FILE.partial` its final name `path`: a hard link (never replacing a
/// file that appeared at `path` meanwhile), then the partial name is removed. On
/// filesystems without hard links, a rename after checking that `path` is free.
fn publish_partial(partial: &Path, path: &Path) -> Result<(), VolumeError> {
    let io = |p: &Path, e: std::io::Error| VolumeError::Io {
        path: p.display().to_string(),
        source: e,
    };
    match std::fs::hard_link(partial, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(VolumeError::AlreadyExists {
                path: path.display().to_string(),
            })
        }
        Err(_) if !path.exists() => {
            std::fs::rename(partial, path).map_err(|e| io(path, e))?;
        }
        Err(e) => return Err(io(path, e)),
    }
    match std::fs::remove_file(partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(partial, e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(&dir, e))
}

/// Removes a file on drop unless disarmed (a restore that did not finish).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreOutcome {
    pub header: Header,
    pub stats: RestoreStats,
}

/// Creates the volume `path` from snapshot `id` of `store`, under a new random DEK
/// wrapped by `target` (`None`: the snapshot's own master key): every chunk is decrypted
/// with the snapshot's DEK and re-encrypted with the new one. The restore writes every
/// chunk anyway, so this costs nothing, and it keeps the rule that every volume has its
/// own data key: two volumes sharing one would let whoever holds both files compare
/// their ciphertexts sector by sector (which sectors hold the same data). There is no
/// option to keep the snapshot's DEK. The manifest MAC and every chunk hash are verified. The volume is built
/// under `.FILE.partial` and renamed only when complete: on any error (or when the future
/// is dropped, e.g. on Ctrl-C) the partial file is removed; one left by a killed process
/// is removed by the next restore to the same name.
pub async fn restore_snapshot(
    store: &Store,
    id: &SnapshotId,
    path: &Path,
    keys: &KeyOptions,
    target: Option<NewKey<'_>>,
) -> Result<RestoreOutcome, OpsError> {
    if path.exists() {
        return Err(VolumeError::AlreadyExists {
            path: path.display().to_string(),
        }
        .into());
    }
    let m = snapshot::restore::load_manifest(store, id).await?;
    let (dek, slot) = unlock_snapshot(&m, keys).await?;
    let uuid = uuid::Uuid::new_v4();
    let ctx = EncryptionContext::for_volume(&uuid);
    let svc = keys.service();
    let to = match target {
        Some(t) => t,
        None => slot_key(&m.keyslots[slot], keys)?,
    };
    let (new_dek, wrapped) = generate_for(keys, &svc, &to, &ctx).await?;
    let partial = partial_path(path);
    // symlink_metadata: a (dangling) symlink planted at the derived name is removed too;
    // the partial volume itself is then created with O_EXCL.
    if std::fs::symlink_metadata(&partial).is_ok() {
        tracing::info!(
            "removing {} left by an interrupted restore",
            partial.display()
        );
        std::fs::remove_file(&partial).map_err(|e| VolumeError::Io {
            path: partial.display().to_string(),
            source: e,
        })?;
    }
    let spec = VolumeSpec {
        size: m.volume_size,
        sector_size: m.sector_size,
    };
    let header = create_volume_with_dek(&partial, &spec, uuid, vec![wrapped], &new_dek)?;
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let vol = Arc::new(Volume::open(
        &partial,
        &header,
        new_dek,
        OpenOptions::default(),
    )?);
    let progress = Progress::new(format!("restore {id}"), m.volume_size);
    let stats = snapshot::restore_into(store, &m, &dek, Arc::clone(&vol), &progress).await?;
    drop(vol);
    publish_partial(&partial, path)?;
    guard.0 = None;
    Ok(RestoreOutcome { header, stats })
}

/// Copies snapshot `id` from `from` to `to`. Without `target` (or with the snapshot's own
/// master key) the snapshot is copied as it is: same id, same keyslots, no key needed
/// without `target`. With another key the copy is a new snapshot (new id, no parent)
/// under a new DEK wrapped by that key and bound to the copy's own encryption context
/// (`cryptvol:snapshot-id`), every chunk re-encrypted.
pub async fn snapshot_copy(
    from: &Store,
    id: &SnapshotId,
    to: &Store,
    keys: &KeyOptions,
    target: Option<NewKey<'_>>,
) -> Result<CopyStats, OpsError> {
    let m = snapshot::restore::load_manifest(from, id).await?;
    let total: u64 = m.chunks.keys().map(|&i| m.chunk_len(i) as u64).sum();
    let progress = Progress::new(format!("copy {id}"), total);
    let Some(target) = target else {
        return Ok(snapshot::copy_as_is(from, to, id, &progress).await?);
    };
    let (dek, slot) = unlock_snapshot(&m, keys).await?;
    if same_master_key(&target, &m.keyslots[slot], keys) {
        return Ok(snapshot::copy_as_is(from, to, id, &progress).await?);
    }
    let new_id = SnapshotId::generate()?;
    let ctx = snapshot::manifest::snapshot_context(&new_id);
    let svc = keys.service();
    let (new_dek, wrapped) = generate_for(keys, &svc, &target, &ctx).await?;
    let new = snapshot::NewSnapshotKey {
        id: new_id,
        dek: &new_dek,
        keyslots: vec![wrapped],
    };
    Ok(snapshot::copy_reencrypt(from, &m, &dek, to, new, &progress).await?)
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

/// Takes a snapshot of a served volume from its point-in-time `view` (the daemon's
/// `snapshot` control request). The parent is the newest snapshot of the volume in the
/// store (or `parent`: an id, or "none"); when the volume's changed-chunk tracking is
/// relative to that parent, only the changed chunks are read. On success the tracking
/// restarts from this snapshot.
pub async fn snapshot_served(
    volume: &Volume,
    view: crate::volume::SnapshotView,
    store: &str,
    description: &str,
    parent: Option<&str>,
    progress: &Progress,
) -> Result<CreateStats, OpsError> {
    let store = Store::open(store, true)?;
    let dek = volume.data_key()?;
    let path = Path::new(volume.path());
    let (header, _) = volume::read_header(path)?;
    let choice = match parent {
        None => snapshot::Parent::Auto,
        Some("none") => snapshot::Parent::None,
        Some(id) => snapshot::Parent::Id(SnapshotId::parse(id)?),
    };
    let found = snapshot::resolve_parent(
        &store,
        &choice,
        &dek,
        header.uuid,
        volume.size(),
        volume.sector_size(),
    )
    .await?;
    let (parent, changed) = match found {
        Some(m) => {
            let changed = view
                .changed_since(&m.id.to_string())
                .map(|v| v.into_iter().collect::<snapshot::ChunkSet>());
            match &changed {
                Some(c) => {
                    tracing::info!(path = %path.display(), parent = %m.id, changed = c.len(), "incremental snapshot from changed-chunk tracking")
                }
                None => {
                    tracing::info!(path = %path.display(), parent = %m.id, "no changed-chunk tracking relative to the parent: reading every chunk (only changed ones are uploaded)")
                }
            }
            (snapshot::Parent::Id(m.id.clone()), changed)
        }
        None => (snapshot::Parent::None, None),
    };
    let view = Arc::new(view);
    let keys = VolumeKeys {
        uuid: header.uuid,
        keyslots: header.keyslots.clone(),
    };
    let opts = snapshot::CreateOptions {
        parent,
        changed,
        description: description.to_string(),
    };
    let stats =
        snapshot::create_snapshot(&store, view.clone(), &dek, &keys, &opts, progress).await?;
    view.completed(&stats.id)?;
    Ok(stats)
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
