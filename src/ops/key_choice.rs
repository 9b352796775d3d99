//! Which keys an operation uses: where keys come from as chosen on the command line
//! ([`KeyOptions`]), which master key wraps a new data key ([`NewKey`]) and the wrapping
//! itself, and the way back from a keyslot to the master key it is wrapped under.

use std::path::{Path, PathBuf};

use crate::crypto::Dek;
use crate::keys::{
    default_keystore_dir, Argon2Params, EncryptionContext, KeyError, KeyOp, KeyRef, KeyService,
    LocalKeystore, PassphraseBackend, PassphraseSource, WrappedDek, AWS_KMS,
};

use super::{key_suffix, keyslot_err, OpsError};

/// Where keys come from, as chosen on the command line.
#[derive(Debug)]
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
#[derive(Debug)]
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
pub(super) async fn wrap_for(
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

/// A fresh data key wrapped under `target` bound to `ctx` (as `create_volume` does).
pub(super) async fn generate_for(
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

/// The master key of a keyslot, as a wrapping target.
pub(super) fn slot_key<'a>(
    slot: &WrappedDek,
    keys: &'a KeyOptions,
) -> Result<NewKey<'a>, OpsError> {
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

/// Whether `target` names the master key of keyslot `slot` (which unlocked the DEK).
/// Only exact matches count: a KMS alias naming the same key counts as another key (the
/// data is then re-encrypted, which is correct, only slower).
pub(super) fn same_master_key(target: &NewKey<'_>, slot: &WrappedDek, keys: &KeyOptions) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
