//! [`KeyService`]: one entry point for every backend. It resolves a [`KeyRef`] (or the
//! configured default key) to a backend, wraps and unwraps through it, and writes the
//! audit log for the backends that do not audit themselves (the local keystore checks
//! its key policies and audits its own operations).

use std::path::{Path, PathBuf};

use super::audit::{AuditEvent, AuditLog};
use super::aws_kms::AwsKmsBackend;
use super::keyref::{AWS_KMS, EXEC, LOCAL, PASSPHRASE};
use super::{
    EncryptionContext, ExecBackend, KeyBackend, KeyError, KeyOp, KeyRef, LocalKeystore,
    PassphraseBackend, Principal, WrappedDek,
};
use crate::crypto::Dek;

/// Dispatches key operations to backends and audits them.
#[derive(Debug, Clone)]
pub struct KeyService {
    keystore_dir: PathBuf,
    audit: AuditLog,
    principal: Principal,
}

impl KeyService {
    /// A service over the keystore at `keystore_dir`, auditing into `audit_log` (default:
    /// `audit.jsonl` in the keystore directory).
    pub fn new(keystore_dir: &Path, audit_log: Option<&Path>) -> KeyService {
        KeyService {
            keystore_dir: keystore_dir.to_path_buf(),
            audit: AuditLog::choose(audit_log, keystore_dir),
            principal: Principal::current(),
        }
    }

    pub fn keystore_dir(&self) -> &Path {
        &self.keystore_dir
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The local keystore (created when `create` and missing), auditing into this
    /// service's log.
    pub fn local(&self, create: bool) -> Result<LocalKeystore, KeyError> {
        Ok(LocalKeystore::open(&self.keystore_dir, create)?.with_audit_log(self.audit.clone()))
    }

    /// The key used when none is given: the keystore's configured default
    /// (`cryptvol key set-default`), else the local default key.
    pub fn default_key(&self) -> Result<KeyRef, KeyError> {
        if !self.keystore_dir.is_dir() {
            return Ok(KeyRef::Local(None));
        }
        match self.local(false)?.default_key_ref()? {
            Some(r) => KeyRef::parse(&r).map_err(|e| KeyError::Keystore {
                path: self.keystore_dir.join("settings.json").display().to_string(),
                reason: format!("the configured default key is invalid ({e}); set it again with `cryptvol key set-default`"),
            }),
            None => Ok(KeyRef::Local(None)),
        }
    }

    /// Sets (`Some`) or resets (`None`) the configured default key. The reference must
    /// name a usable backend: a local key that exists (administer permission needed) or
    /// a registered exec backend.
    pub fn set_default_key(&self, reference: Option<&KeyRef>) -> Result<(), KeyError> {
        let ks = self.local(true)?;
        let refused = match reference {
            Some(KeyRef::Exec { name, .. }) => ks.exec_backend(name).err(),
            Some(KeyRef::Local(None)) => return ks.set_default_key_ref(None),
            _ => None,
        };
        if let Some(e) = refused {
            let writer = self.audit.open()?;
            let label = reference.map(KeyRef::to_string).unwrap_or_default();
            let _ = writer.write(&AuditEvent {
                operation: "set-default",
                backend: reference.map(KeyRef::backend).unwrap_or(LOCAL),
                key_id: &label,
                context: None,
                principal: &self.principal,
                outcome: Err(&e),
                detail: None,
            });
            return Err(e);
        }
        ks.set_default_key_ref(reference)
    }

    /// The exec backend registered as `name`.
    pub fn exec(&self, name: &str) -> Result<ExecBackend, KeyError> {
        if !self.keystore_dir.is_dir() {
            return Err(KeyError::NotFound {
                backend: EXEC.to_string(),
                key: format!(
                    "{} (no exec backend is registered: there is no keystore at {}; register \
                     one with `cryptvol key exec add NAME -- PROGRAM [ARGS...]`)",
                    name.escape_debug(),
                    self.keystore_dir.display()
                ),
            });
        }
        self.local(false)?.exec_backend(name)
    }

    /// Destroys local keys whose deletion waiting period has passed (nothing when there
    /// is no keystore). Returns the deleted key ids.
    pub fn purge_expired(&self) -> Result<Vec<String>, KeyError> {
        if !self.keystore_dir.is_dir() {
            return Ok(Vec::new());
        }
        self.local(false)?.purge_expired()
    }

    /// Wraps `dek` under `target` for `op`.
    pub async fn wrap(
        &self,
        target: &KeyRef,
        dek: &Dek,
        ctx: &EncryptionContext,
        op: KeyOp,
    ) -> Result<WrappedDek, KeyError> {
        counted(target.backend(), self.wrap_uncounted(target, dek, ctx, op)).await
    }

    async fn wrap_uncounted(
        &self,
        target: &KeyRef,
        dek: &Dek,
        ctx: &EncryptionContext,
        op: KeyOp,
    ) -> Result<WrappedDek, KeyError> {
        match target {
            KeyRef::Local(key) => {
                let ks = self.local(true)?;
                ks.wrap_as(key.as_deref(), dek, ctx, op).await
            }
            KeyRef::Exec { name, key } => {
                let writer = self.audit.open()?;
                let label = target.to_string();
                let result = match self.exec(name) {
                    Ok(b) => b.wrap(key.as_deref(), dek, ctx).await,
                    Err(e) => Err(e),
                };
                let key_id = result.as_ref().map(|w| w.key_id.as_str()).unwrap_or(&label);
                let key_id = key_id.strip_prefix("exec:").unwrap_or(key_id).to_string();
                self.finish(&writer, op, EXEC, &key_id, ctx, result)
            }
            KeyRef::AwsKms(k) => {
                let writer = self.audit.open()?;
                let result = match AwsKmsBackend::connect().await {
                    Ok(b) => b.wrap(k, dek, ctx).await,
                    Err(e) => Err(e),
                };
                let key_id = result.as_ref().map(|w| w.key_id.as_str()).unwrap_or(k);
                let key_id = key_id.to_string();
                self.finish(&writer, op, AWS_KMS, &key_id, ctx, result)
            }
        }
    }

    /// A new volume's data key under `target`: from AWS KMS `GenerateDataKey` for an
    /// aws-kms key, else a fresh random key wrapped by the backend.
    pub async fn generate(
        &self,
        target: &KeyRef,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError> {
        match target {
            KeyRef::AwsKms(k) => counted(AWS_KMS, self.generate_aws(k, ctx)).await,
            _ => {
                let dek = Dek::generate()?;
                let wrapped = self.wrap(target, &dek, ctx, KeyOp::Generate).await?;
                Ok((dek, wrapped))
            }
        }
    }

    /// `GenerateDataKey` under the AWS KMS key `k`, audited.
    async fn generate_aws(
        &self,
        k: &str,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError> {
        let writer = self.audit.open()?;
        let result = match AwsKmsBackend::connect().await {
            Ok(b) => b.generate_dek(k, ctx).await,
            Err(e) => Err(e),
        };
        let key_id = result.as_ref().map(|(_, w)| w.key_id.as_str()).unwrap_or(k);
        let key_id = key_id.to_string();
        self.finish(&writer, KeyOp::Generate, AWS_KMS, &key_id, ctx, result)
    }

    /// Moves an aws-kms keyslot to another AWS KMS key with `ReEncrypt` (audited as
    /// `rewrap-to` under the destination key).
    pub async fn reencrypt_aws(
        &self,
        slot: &WrappedDek,
        ctx: &EncryptionContext,
        to: &str,
    ) -> Result<WrappedDek, KeyError> {
        counted(AWS_KMS, self.reencrypt_aws_uncounted(slot, ctx, to)).await
    }

    async fn reencrypt_aws_uncounted(
        &self,
        slot: &WrappedDek,
        ctx: &EncryptionContext,
        to: &str,
    ) -> Result<WrappedDek, KeyError> {
        let writer = self.audit.open()?;
        let result = match AwsKmsBackend::connect().await {
            Ok(b) => b.reencrypt(slot, ctx, to).await,
            Err(e) => Err(e),
        };
        let key_id = result.as_ref().map(|w| w.key_id.as_str()).unwrap_or(to);
        let key_id = key_id.to_string();
        self.finish(&writer, KeyOp::RewrapTo, AWS_KMS, &key_id, ctx, result)
    }

    /// Wraps `dek` under a passphrase for `op`.
    pub async fn wrap_passphrase(
        &self,
        backend: &PassphraseBackend,
        dek: &Dek,
        ctx: &EncryptionContext,
        op: KeyOp,
    ) -> Result<WrappedDek, KeyError> {
        counted(PASSPHRASE, async {
            let writer = self.audit.open()?;
            let result = backend.wrap(None, dek, ctx).await;
            self.finish(&writer, op, PASSPHRASE, "", ctx, result)
        })
        .await
    }

    /// Unwraps one keyslot for `op`. Passphrase keyslots need `passphrase`.
    pub async fn unwrap(
        &self,
        slot: &WrappedDek,
        ctx: &EncryptionContext,
        op: KeyOp,
        passphrase: Option<&PassphraseBackend>,
    ) -> Result<Dek, KeyError> {
        let backend = slot.backend.as_str();
        counted(backend, self.unwrap_uncounted(slot, ctx, op, passphrase)).await
    }

    async fn unwrap_uncounted(
        &self,
        slot: &WrappedDek,
        ctx: &EncryptionContext,
        op: KeyOp,
        passphrase: Option<&PassphraseBackend>,
    ) -> Result<Dek, KeyError> {
        match slot.backend.as_str() {
            LOCAL => self.local(false)?.unwrap_as(slot, ctx, op).await,
            PASSPHRASE => {
                let writer = self.audit.open()?;
                let result = match passphrase {
                    Some(b) => b.unwrap(slot, ctx).await,
                    None => Err(KeyError::Passphrase {
                        source_name: "the command line".into(),
                        reason:
                            "no passphrase given (use --passphrase-file FILE or --passphrase-fd N)"
                                .into(),
                    }),
                };
                self.finish(&writer, op, PASSPHRASE, "", ctx, result)
            }
            EXEC => {
                let writer = self.audit.open()?;
                let name = slot.key_id.split_once(':').map(|(n, _)| n).unwrap_or("");
                let result = match self.exec(name) {
                    Ok(b) => b.unwrap(slot, ctx).await,
                    Err(e) => Err(e),
                };
                let key_id = slot.key_id.escape_debug().to_string();
                self.finish(&writer, op, EXEC, &key_id, ctx, result)
            }
            AWS_KMS => {
                let writer = self.audit.open()?;
                let result = match AwsKmsBackend::connect().await {
                    Ok(b) => b.unwrap(slot, ctx).await,
                    Err(e) => Err(e),
                };
                let key_id = slot.key_id.escape_debug().to_string();
                self.finish(&writer, op, AWS_KMS, &key_id, ctx, result)
            }
            other => Err(KeyError::Unsupported(format!(
                "keyslot backend {:?} is not available in this build",
                other.escape_debug().to_string()
            ))),
        }
    }

    /// Audits the outcome of an operation on a non-local backend. A success that cannot
    /// be recorded is refused (the audit log fails closed).
    fn finish<T>(
        &self,
        writer: &super::AuditWriter,
        op: KeyOp,
        backend: &str,
        key_id: &str,
        ctx: &EncryptionContext,
        result: Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let event = |outcome| AuditEvent {
            operation: op.name(),
            backend,
            key_id,
            context: Some(ctx),
            principal: &self.principal,
            outcome,
            detail: None,
        };
        match &result {
            Ok(_) => writer.write(&event(Ok(())))?,
            Err(e) => {
                let _ = writer.write(&event(Err(e)));
            }
        }
        result
    }
}

/// Runs one backend call, counting it (and its latency, and whether it failed) in
/// [`super::stats`] under `backend`.
async fn counted<T>(
    backend: &str,
    call: impl std::future::Future<Output = Result<T, KeyError>>,
) -> Result<T, KeyError> {
    let started = std::time::Instant::now();
    let result = call.await;
    super::stats::record(backend, started.elapsed(), result.is_ok());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretBytes;
    use crate::keys::Argon2Params;

    fn lines(p: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn passphrase_operations_are_audited_without_secrets() {
        let tmp = tempfile::tempdir().unwrap();
        let audit = tmp.path().join("audit.jsonl");
        let svc = KeyService::new(&tmp.path().join("keys"), Some(&audit));
        let fast = Argon2Params {
            memory_kib: 8192,
            time: 1,
            lanes: 1,
        };
        let pb = PassphraseBackend::new(SecretBytes::new(b"hunter2hunter2".to_vec()), fast);
        let vol = uuid::Uuid::new_v4();
        let ctx = EncryptionContext::for_volume(&vol);
        let dek = Dek::generate().unwrap();
        let w = svc
            .wrap_passphrase(&pb, &dek, &ctx, KeyOp::Generate)
            .await
            .unwrap();
        let back = svc
            .unwrap(&w, &ctx, KeyOp::Unwrap, Some(&pb))
            .await
            .unwrap();
        assert_eq!(back.expose(), dek.expose());
        let err = svc
            .unwrap(&w, &ctx, KeyOp::Unwrap, None)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::Passphrase { .. }), "{err:?}");
        let text = std::fs::read_to_string(&audit).unwrap();
        assert!(!text.contains("hunter2"));
        let l = lines(&audit);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0]["backend"], "passphrase");
        assert_eq!(l[1]["result"], "ok");
        assert_eq!(l[2]["error"], "Passphrase");
    }

    #[tokio::test]
    async fn default_key_setting() {
        let tmp = tempfile::tempdir().unwrap();
        let svc = KeyService::new(&tmp.path().join("keys"), None);
        assert_eq!(svc.default_key().unwrap(), KeyRef::Local(None));
        let ks = svc.local(true).unwrap();
        let k = ks.create_key(Some("alias/vols")).unwrap();
        let r = KeyRef::parse("alias/vols").unwrap();
        svc.set_default_key(Some(&r)).unwrap();
        assert_eq!(svc.default_key().unwrap(), r);
        let vol = uuid::Uuid::new_v4();
        let ctx = EncryptionContext::for_volume(&vol);
        let dek = Dek::generate().unwrap();
        let w = svc
            .wrap(&svc.default_key().unwrap(), &dek, &ctx, KeyOp::Generate)
            .await
            .unwrap();
        assert_eq!(w.key_id, k.key_id);
        // An unregistered exec backend cannot become the default.
        let err = svc
            .set_default_key(Some(&KeyRef::parse("exec:nope").unwrap()))
            .err()
            .unwrap();
        assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
        svc.set_default_key(None).unwrap();
        assert_eq!(svc.default_key().unwrap(), KeyRef::Local(None));
    }
}
