//! Changing a volume's keyslots without touching its data, each in one crash-safe header
//! update: rewrap one under another master key ([`rekey`]), add one ([`keyslot_add`]),
//! remove one ([`keyslot_remove`]); and purging local keys past their deletion date.

use std::path::Path;

use crate::keys::{EncryptionContext, KeyError, KeyOp, KeyRef, WrappedDek, AWS_KMS};
use crate::volume::{self, crash_point, Header, VolumeError, MAX_KEYSLOTS};

use super::key_choice::wrap_for;
use super::unlock::{unlock_dek, warn_health};
use super::{key_suffix, keyslot_err, KeyOptions, NewKey, OpsError};

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

/// The keyslots as messages list them: `0 (local, key mk-1), 1 (passphrase)`.
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
    let slot = slot_to_rekey(path, &header, slot)?;
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

/// The keyslot a rekey replaces: the one asked for (which must exist), else the only one.
fn slot_to_rekey(path: &Path, header: &Header, slot: Option<usize>) -> Result<usize, OpsError> {
    let n = header.keyslots.len();
    match slot {
        Some(s) if s < n => Ok(s),
        Some(s) => Err(keyslot_err(
            path,
            format!(
                "there is no keyslot {s}; the keyslots are {}",
                slot_list(header)
            ),
        )),
        None if n == 1 => Ok(0),
        None => Err(keyslot_err(
            path,
            format!(
                "the volume has {n} keyslots ({}); say which one to rekey with --slot N",
                slot_list(header)
            ),
        )),
    }
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
