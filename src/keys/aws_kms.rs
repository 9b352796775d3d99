//! The `aws-kms` backend: data keys generated and wrapped by AWS KMS (or anything that
//! speaks its API, such as `moto_server` in the tests).
//!
//! Configuration is the standard AWS chain (environment, shared config/credentials
//! files and profile, region), including the endpoint overrides `AWS_ENDPOINT_URL` and
//! `AWS_ENDPOINT_URL_KMS`. Every call has bounded timeouts (connect 5 s, attempt 10 s,
//! operation 30 s) and at most 3 attempts (standard retry mode: throttling, 5xx and
//! network errors are retried with backoff).
//!
//! - generate: `DescribeKey` (resolve an alias to the key ARN, refuse a key that is not
//!   Enabled), then `GenerateDataKey` with `NumberOfBytes=64` and the volume's
//!   encryption context. The keyslot stores the key ARN, never an alias.
//! - unwrap: the stored context must equal the expected one (refused before any call),
//!   then `DescribeKey` on the stored ARN (state check: the moto test server does not
//!   enforce key states, and we refuse consistently everywhere), then `Decrypt` with
//!   `KeyId` = the stored ARN and the same context.
//! - wrap (a DEK we hold, e.g. rekey from another backend): `DescribeKey`, `Encrypt`.
//! - rewrap between two KMS keys: `DescribeKey` on both, `ReEncrypt`.
//!
//! The plaintext data key is moved out of the SDK's `Blob` into a zeroizing locked
//! [`Dek`] at once and the SDK's buffer is wiped. Buffers inside the HTTP and JSON layers
//! of the SDK (base64 text) cannot be reached; this residual risk is documented.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState as AwsKeyState;
use zeroize::Zeroize;

use super::keyref::AWS_KMS;
use super::{EncryptionContext, KeyBackend, KeyDescription, KeyError, KeyState, WrappedDek};
use crate::crypto::{Dek, DEK_LEN};

/// Attempts per call (first try + retries).
pub const MAX_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_MESSAGE_LEN: usize = 300;

/// A connected AWS KMS client.
#[derive(Clone, Debug)]
pub struct AwsKmsBackend {
    client: aws_sdk_kms::Client,
}

/// What `DescribeKey` told about a usable key.
struct Resolved {
    arn: String,
}

/// The non-empty ciphertext blob of a KMS response, or a Malformed error naming the call.
fn ciphertext(blob: Option<Blob>, call: &str, arn: &str) -> Result<Vec<u8>, KeyError> {
    blob.map(Blob::into_inner)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| {
            KeyError::Malformed(format!(
                "AWS KMS {call} returned no ciphertext for {}",
                shown(arn)
            ))
        })
}

fn shown(s: &str) -> String {
    let mut out: String = s.escape_debug().take(MAX_MESSAGE_LEN).collect();
    if s.len() > MAX_MESSAGE_LEN {
        out.push('…');
    }
    out
}

fn context_map(ctx: &EncryptionContext) -> HashMap<String, String> {
    ctx.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Maps an SDK error of operation `op` on `key` to the typed key errors.
fn map_err<E>(
    err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
    key: &str,
    op: &str,
) -> KeyError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key = shown(key);
    match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("");
            let message = shown(se.err().message().unwrap_or(""));
            let status = se.raw().status().as_u16();
            match code {
                "NotFoundException" => KeyError::NotFound {
                    backend: AWS_KMS.into(),
                    key: format!("{key} ({message})"),
                },
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "NotAuthorizedException" => KeyError::AccessDenied {
                    key,
                    operation: format!("{op} (AWS KMS said {code}: {message})"),
                    principal: principal_from(&message),
                },
                "DisabledException" | "KMSInvalidStateException" | "KeyUnavailableException" => {
                    KeyError::KeyUnusable {
                        key,
                        state: format!(
                            "not usable for {op} (AWS KMS said {code}: {message}); enable it \
                             (aws kms enable-key) or cancel its deletion"
                        ),
                    }
                }
                "InvalidCiphertextException" | "IncorrectKeyException" => {
                    KeyError::WrongKey { key }
                }
                "ThrottlingException"
                | "KMSInternalException"
                | "DependencyTimeoutException"
                | "LimitExceededException" => {
                    KeyError::Transient(format!("AWS KMS {op} on {key}: {code}: {message}"))
                }
                _ if status >= 500 || status == 429 => KeyError::Transient(format!(
                    "AWS KMS {op} on {key}: HTTP {status} {code}: {message}"
                )),
                _ => KeyError::Unsupported(format!(
                    "AWS KMS refused {op} on {key}: {} {message}",
                    if code.is_empty() { "error" } else { code }
                )),
            }
        }
        _ => KeyError::Transient(format!(
            "AWS KMS {op} on {key} failed: {}; check the region, the endpoint \
             (AWS_ENDPOINT_URL) and the credentials, then retry",
            shown(&aws_sdk_kms::error::DisplayErrorContext(&err).to_string())
        )),
    }
}

/// KMS's AccessDenied messages usually read "User: arn:... is not authorized ...".
fn principal_from(message: &str) -> String {
    message
        .split_once("User: ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| "the configured AWS principal".to_string())
}

/// Copies a plaintext data key out of the SDK's blob into a locked, zeroizing [`Dek`]
/// and wipes the SDK's buffer.
fn take_dek(blob: Option<Blob>, key: &str) -> Result<Dek, KeyError> {
    let mut raw = blob.map(Blob::into_inner).unwrap_or_default();
    let dek = if raw.len() == DEK_LEN {
        Dek::from_slice(&raw).map_err(KeyError::from)
    } else {
        Err(KeyError::Malformed(format!(
            "AWS KMS returned a {}-byte data key for {}; expected {DEK_LEN}",
            raw.len(),
            shown(key)
        )))
    };
    raw.zeroize();
    dek
}

impl AwsKmsBackend {
    /// A client from the standard AWS configuration chain, with bounded timeouts and
    /// retries.
    pub async fn connect() -> Result<AwsKmsBackend, KeyError> {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(
                aws_config::retry::RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS),
            )
            .load()
            .await;
        if conf.region().is_none() {
            return Err(KeyError::Unsupported(
                "AWS KMS: no AWS region is configured; set AWS_REGION (or a region in the \
                 AWS profile)"
                    .into(),
            ));
        }
        Ok(AwsKmsBackend {
            client: aws_sdk_kms::Client::new(&conf),
        })
    }

    /// Resolves `key` (ARN, key id, alias name or alias ARN) with `DescribeKey` and
    /// refuses a key that is not Enabled.
    async fn resolve(&self, key: &str, op: &str) -> Result<Resolved, KeyError> {
        let out = self
            .client
            .describe_key()
            .key_id(key)
            .send()
            .await
            .map_err(|e| map_err(e, key, op))?;
        let meta = out.key_metadata().ok_or_else(|| {
            KeyError::Malformed(format!(
                "AWS KMS DescribeKey returned no metadata for {}",
                shown(key)
            ))
        })?;
        let arn = meta.arn().unwrap_or(meta.key_id()).to_string();
        match meta.key_state() {
            Some(AwsKeyState::Enabled) => Ok(Resolved { arn }),
            Some(AwsKeyState::Disabled) => Err(KeyError::KeyUnusable {
                key: shown(&arn),
                state: "disabled in AWS KMS; enable it (aws kms enable-key --key-id ...) to use it"
                    .into(),
            }),
            Some(AwsKeyState::PendingDeletion) => Err(KeyError::KeyUnusable {
                key: shown(&arn),
                state: format!(
                    "pending deletion in AWS KMS{}; cancel the deletion (aws kms \
                     cancel-key-deletion) and enable it to use it",
                    meta.deletion_date()
                        .map(|d| format!(" (to be deleted at {d})"))
                        .unwrap_or_default()
                ),
            }),
            other => Err(KeyError::KeyUnusable {
                key: shown(&arn),
                state: format!(
                    "in state {} in AWS KMS, not Enabled",
                    other
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_else(|| "unknown".into())
                ),
            }),
        }
    }

    /// Describes `key` (must be given: AWS KMS has no implicit default key here).
    pub async fn describe(&self, key: &str) -> Result<KeyDescription, KeyError> {
        let out = self
            .client
            .describe_key()
            .key_id(key)
            .send()
            .await
            .map_err(|e| map_err(e, key, "describe"))?;
        let meta = out.key_metadata().ok_or_else(|| {
            KeyError::Malformed(format!(
                "AWS KMS DescribeKey returned no metadata for {}",
                shown(key)
            ))
        })?;
        let state = match meta.key_state() {
            Some(AwsKeyState::Enabled) => KeyState::Enabled,
            Some(AwsKeyState::PendingDeletion) => KeyState::PendingDeletion,
            _ => KeyState::Disabled,
        };
        Ok(KeyDescription {
            backend: AWS_KMS.into(),
            key_id: meta.arn().unwrap_or(meta.key_id()).to_string(),
            aliases: if key.starts_with("alias/") || key.contains(":alias/") {
                vec![key.to_string()]
            } else {
                Vec::new()
            },
            state,
            created_at: meta
                .creation_date()
                .map(|d| d.to_string())
                .unwrap_or_default(),
        })
    }

    /// A fresh 64-byte data key from `GenerateDataKey` under `key`, bound to `ctx`.
    pub async fn generate_dek(
        &self,
        key: &str,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError> {
        let r = self.resolve(key, "generate").await?;
        let mut out = self
            .client
            .generate_data_key()
            .key_id(&r.arn)
            .number_of_bytes(DEK_LEN as i32)
            .set_encryption_context(Some(context_map(ctx)))
            .send()
            .await
            .map_err(|e| map_err(e, &r.arn, "generate"))?;
        let dek = take_dek(out.plaintext.take(), &r.arn)?;
        let blob = ciphertext(out.ciphertext_blob.take(), "GenerateDataKey", &r.arn)?;
        Ok((dek, self.slot(&r, blob, ctx)))
    }

    /// Wraps a DEK we hold (`Encrypt`) under `key`, bound to `ctx`.
    pub async fn wrap(
        &self,
        key: &str,
        dek: &Dek,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        let r = self.resolve(key, "wrap").await?;
        // The SDK takes ownership of this copy and does not wipe it (residual risk, as
        // for its HTTP buffers).
        let out = self
            .client
            .encrypt()
            .key_id(&r.arn)
            .plaintext(Blob::new(dek.expose().to_vec()))
            .set_encryption_context(Some(context_map(ctx)))
            .send()
            .await
            .map_err(|e| map_err(e, &r.arn, "wrap"))?;
        let blob = ciphertext(out.ciphertext_blob, "Encrypt", &r.arn)?;
        Ok(self.slot(&r, blob, ctx))
    }

    /// Unwraps a keyslot (`Decrypt` with the stored key ARN and the expected context).
    pub async fn unwrap(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
    ) -> Result<Dek, KeyError> {
        check_slot(wrapped, expected)?;
        let r = self.resolve(&wrapped.key_id, "unwrap").await?;
        let mut out = self
            .client
            .decrypt()
            .key_id(&r.arn)
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .set_encryption_context(Some(context_map(expected)))
            .send()
            .await
            .map_err(|e| map_err(e, &r.arn, "unwrap"))?;
        take_dek(out.plaintext.take(), &r.arn)
    }

    /// Moves a keyslot from its KMS key to `to` with `ReEncrypt` (the plaintext never
    /// leaves KMS).
    pub async fn reencrypt(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
        to: &str,
    ) -> Result<WrappedDek, KeyError> {
        check_slot(wrapped, expected)?;
        let from = self.resolve(&wrapped.key_id, "rewrap-from").await?;
        let dest = self.resolve(to, "rewrap-to").await?;
        let out = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .source_key_id(&from.arn)
            .set_source_encryption_context(Some(context_map(expected)))
            .destination_key_id(&dest.arn)
            .set_destination_encryption_context(Some(context_map(expected)))
            .send()
            .await
            .map_err(|e| map_err(e, &from.arn, "rewrap"))?;
        let blob = ciphertext(out.ciphertext_blob, "ReEncrypt", &dest.arn)?;
        Ok(self.slot(&dest, blob, expected))
    }

    fn slot(&self, r: &Resolved, blob: Vec<u8>, ctx: &EncryptionContext) -> WrappedDek {
        WrappedDek {
            backend: AWS_KMS.into(),
            key_id: r.arn.clone(),
            blob,
            context: ctx.clone(),
            params: Default::default(),
        }
    }
}

fn need_key(key: Option<&str>) -> Result<&str, KeyError> {
    key.ok_or_else(|| {
        KeyError::Unsupported(
            "the aws-kms backend needs a key (an ARN, aws-kms:KEY_ID or aws-kms:alias/NAME)".into(),
        )
    })
}

#[async_trait::async_trait]
impl KeyBackend for AwsKmsBackend {
    fn kind(&self) -> &'static str {
        AWS_KMS
    }
    async fn describe_key(&self, key: Option<&str>) -> Result<KeyDescription, KeyError> {
        self.describe(need_key(key)?).await
    }
    async fn generate_dek(
        &self,
        key: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<(Dek, WrappedDek), KeyError> {
        AwsKmsBackend::generate_dek(self, need_key(key)?, ctx).await
    }
    async fn wrap(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        AwsKmsBackend::wrap(self, need_key(key)?, dek, ctx).await
    }
    async fn unwrap(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
    ) -> Result<Dek, KeyError> {
        AwsKmsBackend::unwrap(self, wrapped, expected).await
    }
}

/// The keyslot must be an aws-kms slot bound to `expected`.
fn check_slot(wrapped: &WrappedDek, expected: &EncryptionContext) -> Result<(), KeyError> {
    if wrapped.backend != AWS_KMS {
        return Err(KeyError::Malformed(format!(
            "keyslot of backend {:?} given to the aws-kms backend",
            wrapped.backend.escape_debug().to_string()
        )));
    }
    if wrapped.key_id.is_empty() || wrapped.blob.is_empty() {
        return Err(KeyError::Malformed(
            "aws-kms keyslot without a key id or ciphertext".into(),
        ));
    }
    if &wrapped.context != expected {
        let show = |c: &EncryptionContext| {
            c.0.get("cryptvol:volume-uuid")
                .map(|u| format!("volume {}", shown(u)))
                .unwrap_or_else(|| format!("context {:?}", c.0))
        };
        return Err(KeyError::ContextMismatch {
            expected: show(expected),
            found: show(&wrapped.context),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_is_taken_from_kms_messages() {
        assert_eq!(
            principal_from(
                "User: arn:aws:iam::1:user/bob is not authorized to perform: kms:Decrypt"
            ),
            "arn:aws:iam::1:user/bob"
        );
        assert_eq!(principal_from("nope"), "the configured AWS principal");
    }

    #[test]
    fn slot_checks_refuse_other_volumes_before_any_call() {
        let a = EncryptionContext::for_volume(&uuid::Uuid::new_v4());
        let b = EncryptionContext::for_volume(&uuid::Uuid::new_v4());
        let slot = WrappedDek {
            backend: AWS_KMS.into(),
            key_id: "arn:aws:kms:us-east-1:1:key/x".into(),
            blob: vec![1, 2],
            context: a.clone(),
            params: Default::default(),
        };
        assert!(check_slot(&slot, &a).is_ok());
        let err = check_slot(&slot, &b).err().unwrap();
        assert!(matches!(err, KeyError::ContextMismatch { .. }), "{err:?}");
        let mut other = slot.clone();
        other.backend = "local".into();
        assert!(matches!(
            check_slot(&other, &a).err().unwrap(),
            KeyError::Malformed(_)
        ));
        let mut empty = slot;
        empty.blob.clear();
        assert!(check_slot(&empty, &a).is_err());
    }

    fn service_error(
        status: u16,
        code: &str,
        message: &str,
    ) -> SdkError<
        aws_sdk_kms::operation::decrypt::DecryptError,
        aws_sdk_kms::config::http::HttpResponse,
    > {
        let meta = aws_sdk_kms::error::ErrorMetadata::builder()
            .code(code)
            .message(message)
            .build();
        let raw = aws_sdk_kms::config::http::HttpResponse::new(
            status.try_into().expect("status"),
            "{}".into(),
        );
        SdkError::service_error(
            aws_sdk_kms::operation::decrypt::DecryptError::generic(meta),
            raw,
        )
    }

    #[test]
    fn kms_errors_map_to_typed_errors() {
        let k = "arn:aws:kms:us-east-1:1:key/x";
        let e = map_err(service_error(400, "NotFoundException", "gone"), k, "unwrap");
        assert!(matches!(e, KeyError::NotFound { .. }), "{e:?}");
        let e = map_err(
            service_error(
                400,
                "AccessDeniedException",
                "User: arn:aws:iam::1:user/bob is not authorized to perform: kms:Decrypt",
            ),
            k,
            "unwrap",
        );
        match &e {
            KeyError::AccessDenied {
                key,
                operation,
                principal,
            } => {
                assert_eq!(key, k);
                assert!(operation.starts_with("unwrap"), "{operation}");
                assert_eq!(principal, "arn:aws:iam::1:user/bob");
            }
            other => panic!("{other:?}"),
        }
        for code in ["DisabledException", "KMSInvalidStateException"] {
            let e = map_err(service_error(400, code, "no"), k, "unwrap");
            assert!(matches!(e, KeyError::KeyUnusable { .. }), "{e:?}");
        }
        for code in ["InvalidCiphertextException", "IncorrectKeyException"] {
            let e = map_err(service_error(400, code, ""), k, "unwrap");
            assert!(matches!(e, KeyError::WrongKey { .. }), "{e:?}");
        }
        let e = map_err(service_error(400, "ThrottlingException", ""), k, "unwrap");
        assert!(matches!(e, KeyError::Transient(_)), "{e:?}");
        let e = map_err(service_error(503, "SomethingNew", ""), k, "unwrap");
        assert!(matches!(e, KeyError::Transient(_)), "{e:?}");
        let e = map_err(
            service_error(400, "ValidationException", "bad"),
            k,
            "unwrap",
        );
        assert!(matches!(e, KeyError::Unsupported(_)), "{e:?}");
    }

    #[test]
    fn plaintext_of_the_wrong_length_is_refused() {
        let err = take_dek(Some(Blob::new(vec![1u8; 32])), "k").err().unwrap();
        assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");
        let mut raw = vec![0u8; 64];
        raw[0] = 1;
        let dek = take_dek(Some(Blob::new(raw)), "k").unwrap();
        assert_eq!(dek.expose()[0], 1);
    }
}
