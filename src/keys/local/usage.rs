//! Cryptographic use of a key: wrapping and unwrapping data keys under the key policy
//! and state, audited.

use crate::crypto::Dek;
use crate::keys::seal;
use crate::keys::{EncryptionContext, KeyError, KeyOp, KeyState, WrappedDek};

use super::aliases::label;
use super::files::ks_err;
use super::record::{is_key_id, MasterKey};
use super::states::unusable;
use super::{LocalKeystore, KIND};

/// Keyslot parameter naming the material version that wrapped the DEK.
const MATERIAL_VERSION_PARAM: &str = "material_version";

impl LocalKeystore {
    /// Wraps `dek` under `key` (`None`: the local default key) for `op`, checking the
    /// key policy and state, and audits the attempt.
    pub async fn wrap_as(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
        op: KeyOp,
    ) -> Result<WrappedDek, KeyError> {
        let writer = self.audit.open()?;
        let keystore = self.clone();
        let key_owned = key.map(str::to_owned);
        let loaded = seal::blocking(move || {
            Ok(match keystore.resolve(key_owned.as_deref()) {
                Err(e) => Err((None, e)),
                Ok(id) => keystore
                    .load_for_use(&id, op)
                    .map_err(|e| (Some(id.clone()), e)),
            })
        })
        .await;
        let master = match loaded {
            Ok(Ok(m)) => m,
            Ok(Err((id, e))) => {
                let id = id.unwrap_or_else(|| label(key));
                let _ = self.audit_write(&writer, op.name(), &id, Some(ctx), Err(&e), None);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let key_id = master.meta.key_id.clone();
        let version = master.meta.current_version();
        let result = (|| {
            let material = master.material(version).ok_or_else(|| {
                ks_err(
                    &self.key_path(&key_id),
                    "the current material version is missing",
                )
            })?;
            let aad = seal::associated_data(KIND, &key_id, ctx)?;
            let blob = seal::seal(material.expose(), &aad, dek)?;
            let mut params = seal::base_params();
            params.insert(MATERIAL_VERSION_PARAM.to_string(), version.to_string());
            Ok(WrappedDek {
                backend: KIND.to_string(),
                key_id: key_id.clone(),
                blob,
                context: ctx.clone(),
                params,
            })
        })();
        let detail = format!("material_version={version}");
        match &result {
            Ok(_) => self.audit_write(
                &writer,
                op.name(),
                &key_id,
                Some(ctx),
                Ok(()),
                Some(&detail),
            )?,
            Err(e) => {
                let _ = self.audit_write(
                    &writer,
                    op.name(),
                    &key_id,
                    Some(ctx),
                    Err(e),
                    Some(&detail),
                );
            }
        }
        result
    }

    /// Unwraps a local keyslot for `op`, checking the context, the key policy and state,
    /// and audits the attempt.
    pub async fn unwrap_as(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
        op: KeyOp,
    ) -> Result<Dek, KeyError> {
        let writer = self.audit.open()?;
        let key_label = wrapped.key_id.escape_debug().to_string();
        let result = self.unwrap_inner(wrapped, expected, op).await;
        let detail = wrapped
            .params
            .get(MATERIAL_VERSION_PARAM)
            .map(|v| format!("material_version={}", v.escape_debug()));
        match &result {
            Ok(_) => self.audit_write(
                &writer,
                op.name(),
                &key_label,
                Some(&wrapped.context),
                Ok(()),
                detail.as_deref(),
            )?,
            Err(e) => {
                let _ = self.audit_write(
                    &writer,
                    op.name(),
                    &key_label,
                    Some(&wrapped.context),
                    Err(e),
                    detail.as_deref(),
                );
            }
        }
        result
    }

    async fn unwrap_inner(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
        op: KeyOp,
    ) -> Result<Dek, KeyError> {
        seal::check_kind_and_alg(wrapped, KIND)?;
        seal::check_context(wrapped, expected)?;
        if !is_key_id(&wrapped.key_id) {
            return Err(KeyError::Malformed(format!(
                "{:?} is not a local master key id",
                wrapped.key_id.escape_debug().to_string()
            )));
        }
        let version = match wrapped.params.get(MATERIAL_VERSION_PARAM) {
            None => 1,
            Some(v) => v.parse::<u32>().map_err(|_| {
                KeyError::Malformed(format!(
                    "keyslot parameter {MATERIAL_VERSION_PARAM} = {:?} is not a number",
                    v.escape_debug().to_string()
                ))
            })?,
        };
        let keystore = self.clone();
        let key_id = wrapped.key_id.clone();
        let master = seal::blocking(move || keystore.load_for_use(&key_id, op)).await?;
        let material = master.material(version).ok_or_else(|| KeyError::NotFound {
            backend: KIND.to_string(),
            key: format!(
                "{} material version {version} (this keystore is older than the keyslot; \
                 restore the key file from a recent backup)",
                wrapped.key_id
            ),
        })?;
        let aad = seal::associated_data(KIND, &wrapped.key_id, &wrapped.context)?;
        seal::open(material.expose(), &aad, &wrapped.blob, &wrapped.key_id)
    }

    /// Loads a key for a cryptographic operation: the policy must allow it and the key
    /// must be Enabled.
    fn load_for_use(&self, key_id: &str, op: KeyOp) -> Result<MasterKey, KeyError> {
        let key = self.load_key(key_id, true)?;
        self.authorize(&key.meta, op.permission(), op.name())?;
        if key.meta.state != KeyState::Enabled {
            return Err(unusable(&key.meta));
        }
        Ok(key)
    }
}
