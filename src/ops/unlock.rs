//! Unlocking: unwrapping a data key through the first keyslot that works (reading a
//! passphrase once), checking it against what it should open (a volume header, a
//! re-encryption's new key, a snapshot manifest), and opening a volume with it.

use std::path::Path;

use crate::crypto::Dek;
use crate::keys::{EncryptionContext, KeyOp, PassphraseBackend, WrappedDek};
use crate::snapshot::{Manifest, SnapshotError};
use crate::volume::{self, CopyStatus, Header, HeaderHealth, OpenOptions, Volume, VolumeError};

use super::{key_suffix, KeyOptions, OpsError};

/// Logs a warning for each damaged header copy.
pub(super) fn warn_health(path: &Path, health: &HeaderHealth) {
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
pub(super) async fn unlock_dek(
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
