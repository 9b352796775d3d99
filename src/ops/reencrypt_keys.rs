//! The keys of a re-encryption under a new data key: a fresh DEK wrapped for every
//! keyslot of the volume under the same master key (passphrase keyslots under a
//! passphrase checked against the old slot first), or a refusal that explains why not.

use std::path::Path;

use crate::crypto::Dek;
use crate::keys::{EncryptionContext, KeyError, KeyOp, KeyService, PassphraseBackend, WrappedDek};
use crate::volume::Header;

use super::key_choice::{slot_key_ref, wrap_for};
use super::{keyslot_err, KeyOptions, NewKey, OpsError};

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

/// Checks that `passphrase` opens each of the passphrase keyslots `slots` of `header`
/// (so a mistyped passphrase cannot lock a slot's owner out).
async fn check_passphrase_opens(
    path: &Path,
    header: &Header,
    svc: &KeyService,
    ctx: &EncryptionContext,
    slots: &[usize],
    passphrase: &PassphraseBackend,
) -> Result<(), OpsError> {
    for &i in slots {
        if let Err(e) = svc
            .unwrap(
                &header.keyslots[i],
                ctx,
                KeyOp::RewrapFrom,
                Some(passphrase),
            )
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
    Ok(())
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
        check_passphrase_opens(path, header, &svc, &ctx, &pass_slots, pb).await?;
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
    use crate::keys::{Argon2Params, KeyRef, PassphraseSource};
    use crate::ops::unlock::unlock_dek;
    use crate::ops::{create_volume, keyslot_add};
    use crate::volume::{self, VolumeSpec};

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
