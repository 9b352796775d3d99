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
//! Access denials (an IAM policy or a key policy without the action, or credentials AWS
//! does not accept) become [`KeyError::KmsAccessDenied`], naming the key, the KMS action,
//! the cryptvol operation and the AWS principal: the ARN from AWS's message ("User: ARN is
//! not authorized to perform: ACTION ..."), else from one `sts:GetCallerIdentity` call made
//! only on that error path.
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
use super::{
    EncryptionContext, KeyBackend, KeyDescription, KeyError, KeyState, KmsDenial, WrappedDek,
};
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
    /// Only for `GetCallerIdentity` when a denial does not name the principal.
    sts: aws_sdk_sts::Client,
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

/// Error codes of a refusal by an IAM policy or a key policy.
const DENIED_CODES: &[&str] = &[
    "AccessDeniedException",
    "AccessDenied",
    "NotAuthorizedException",
];
/// Error codes of credentials AWS did not accept (authentication, not authorization).
const CREDENTIAL_CODES: &[&str] = &[
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredTokenException",
    "ExpiredToken",
];
/// The principal of a denial whose message does not name it (replaced by the caller ARN
/// from `sts:GetCallerIdentity` when that answers).
const UNKNOWN_PRINCIPAL: &str = "the configured AWS principal";
/// The principal of a refusal of the credentials themselves.
const REFUSED_CREDENTIALS: &str = "the configured AWS credentials";
/// How much of an unparsed error body is searched for an XML error code and message.
const MAX_ERROR_BODY: usize = 8192;

/// The text between `<tag>` and `</tag>` in an XML error body, entities decoded.
fn xml_element(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&close)?;
    Some(
        body[start..start + len]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// The error code and message of a service error: the SDK's parsed metadata, else an XML
/// `<Code>`/`<Message>` in the raw body. (moto, and some proxies, answer a refusal of a
/// JSON API such as KMS with an XML body that the SDK's JSON error parser cannot read.)
fn code_and_message(
    code: Option<&str>,
    message: Option<&str>,
    body: Option<&[u8]>,
) -> (String, String) {
    let code = code.unwrap_or("");
    if !code.is_empty() {
        return (code.to_string(), shown(message.unwrap_or("")));
    }
    let text = body
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(MAX_ERROR_BODY)]).into_owned())
        .unwrap_or_default();
    match xml_element(&text, "Code") {
        Some(c) => (
            shown(&c),
            shown(&xml_element(&text, "Message").unwrap_or_default()),
        ),
        None => (String::new(), shown(message.unwrap_or(""))),
    }
}

/// An access denial by an IAM or key policy: `principal` may not perform `action` on
/// `key`, needed for the cryptvol operation `op`.
fn kms_denied(key: &str, op: &str, action: &str, principal: &str, aws_said: String) -> KeyError {
    KeyError::KmsAccessDenied(Box::new(KmsDenial {
        key: key.to_string(),
        operation: op.to_string(),
        action: action.to_string(),
        principal: principal.to_string(),
        aws_said,
        remedy: format!(
            "grant {action} on {key} to {principal} (in the principal's IAM policy, and in \
             the key policy if that restricts or denies it), or run cryptvol with the \
             credentials of a principal that has it"
        ),
    }))
}

/// Maps an SDK error of the KMS call `action` (`kms:Decrypt`), made for the cryptvol
/// operation `op` on `key`, to the typed key errors.
fn map_err<E>(
    err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
    key: &str,
    op: &str,
    action: &str,
) -> KeyError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key = shown(key);
    match &err {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let (code, message) =
                code_and_message(se.err().code(), se.err().message(), se.raw().body().bytes());
            let refusal = Refusal {
                status,
                code: &code,
                message: &message,
            };
            refusal.into_error(key, op, action)
        }
        _ => KeyError::Transient(format!(
            "AWS KMS {op} on {key} failed: {}; check the region, the endpoint \
             (AWS_ENDPOINT_URL) and the credentials, then retry",
            shown(&aws_sdk_kms::error::DisplayErrorContext(&err).to_string())
        )),
    }
}

/// What AWS KMS answered to a refused call: the HTTP status, the error code (empty if
/// none) and the message.
struct Refusal<'a> {
    status: u16,
    code: &'a str,
    message: &'a str,
}

impl Refusal<'_> {
    /// The typed key error for this refusal of `action` (for operation `op` on `key`).
    fn into_error(self, key: String, op: &str, action: &str) -> KeyError {
        let Refusal {
            status,
            code,
            message,
        } = self;
        let aws_said = match (code.is_empty(), message.is_empty()) {
            (true, _) => format!("HTTP {status} {message}").trim_end().to_string(),
            (false, true) => code.to_string(),
            (false, false) => format!("{code}: {message}"),
        };
        if DENIED_CODES.contains(&code) || (code.is_empty() && status == 403) {
            // AWS names the action it refused ("... to perform: kms:ReEncryptTo ...").
            let action = action_from(message).unwrap_or_else(|| action.to_string());
            let principal = principal_from(message);
            return kms_denied(
                &key,
                op,
                &action,
                principal.as_deref().unwrap_or(UNKNOWN_PRINCIPAL),
                aws_said,
            );
        }
        if CREDENTIAL_CODES.contains(&code) {
            return credentials_refused(key, op, action, aws_said);
        }
        self.by_code(key, op)
    }

    /// The error for a refusal that is neither a denial nor refused credentials.
    fn by_code(self, key: String, op: &str) -> KeyError {
        let Refusal {
            status,
            code,
            message,
        } = self;
        match code {
            "NotFoundException" => KeyError::NotFound {
                backend: AWS_KMS.into(),
                key: format!("{key} ({message})"),
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
            "InvalidCiphertextException" | "IncorrectKeyException" => KeyError::WrongKey { key },
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
}

/// AWS did not accept the credentials (an unknown access key, a bad signature, an
/// expired token).
fn credentials_refused(key: String, op: &str, action: &str, aws_said: String) -> KeyError {
    KeyError::KmsAccessDenied(Box::new(KmsDenial {
        key,
        operation: op.to_string(),
        action: action.to_string(),
        principal: REFUSED_CREDENTIALS.to_string(),
        aws_said,
        remedy: "AWS did not accept the credentials: check AWS_ACCESS_KEY_ID, \
                 AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or AWS_PROFILE and \
                 its files), that they have not expired, and the system clock"
            .to_string(),
    }))
}

/// AWS's AccessDenied messages usually read "User: ARN is not authorized to perform:
/// ACTION on resource: ...": the ARN.
fn principal_from(message: &str) -> Option<String> {
    message
        .split_once("User: ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .filter(|p| p.starts_with("arn:"))
        .map(str::to_string)
}

/// The action of such a message ("... to perform: kms:Decrypt ...").
fn action_from(message: &str) -> Option<String> {
    message
        .split_once("to perform: ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(|a| a.trim_end_matches([',', '.', ';']))
        .filter(|a| a.contains(':'))
        .map(str::to_string)
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
            sts: aws_sdk_sts::Client::new(&conf),
        })
    }

    /// Resolves `key` (ARN, key id, alias name or alias ARN) with `DescribeKey` and
    /// refuses a key that is not Enabled.
    async fn resolve(&self, key: &str, op: &str) -> Result<Resolved, KeyError> {
        let out = match self.client.describe_key().key_id(key).send().await {
            Ok(out) => out,
            Err(e) => return Err(self.fail(e, key, op, "kms:DescribeKey").await),
        };
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
        let out = match self.client.describe_key().key_id(key).send().await {
            Ok(out) => out,
            Err(e) => return Err(self.fail(e, key, "describe", "kms:DescribeKey").await),
        };
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
        let sent = self
            .client
            .generate_data_key()
            .key_id(&r.arn)
            .number_of_bytes(DEK_LEN as i32)
            .set_encryption_context(Some(context_map(ctx)))
            .send()
            .await;
        let mut out = match sent {
            Ok(out) => out,
            Err(e) => {
                return Err(self
                    .fail(e, &r.arn, "generate", "kms:GenerateDataKey")
                    .await)
            }
        };
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
        let sent = self
            .client
            .encrypt()
            .key_id(&r.arn)
            .plaintext(Blob::new(dek.expose().to_vec()))
            .set_encryption_context(Some(context_map(ctx)))
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            Err(e) => return Err(self.fail(e, &r.arn, "wrap", "kms:Encrypt").await),
        };
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
        let sent = self
            .client
            .decrypt()
            .key_id(&r.arn)
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .set_encryption_context(Some(context_map(expected)))
            .send()
            .await;
        let mut out = match sent {
            Ok(out) => out,
            Err(e) => return Err(self.fail(e, &r.arn, "unwrap", "kms:Decrypt").await),
        };
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
        let sent = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .source_key_id(&from.arn)
            .set_source_encryption_context(Some(context_map(expected)))
            .destination_key_id(&dest.arn)
            .set_destination_encryption_context(Some(context_map(expected)))
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            Err(e) => {
                // A refused kms:ReEncryptTo is about the destination key.
                let to_dest = e
                    .as_service_error()
                    .and_then(|se| se.message())
                    .and_then(action_from)
                    .is_some_and(|a| a == "kms:ReEncryptTo");
                let key = if to_dest { &dest.arn } else { &from.arn };
                return Err(self.fail(e, key, "rewrap", "kms:ReEncryptFrom").await);
            }
        };
        let blob = ciphertext(out.ciphertext_blob, "ReEncrypt", &dest.arn)?;
        Ok(self.slot(&dest, blob, expected))
    }

    /// The typed error of a failed KMS call; an access denial whose message did not name
    /// the principal gets the caller ARN from `sts:GetCallerIdentity` (one call, on this
    /// error path only; the call is always allowed in AWS).
    async fn fail<E>(
        &self,
        err: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
        key: &str,
        op: &str,
        action: &str,
    ) -> KeyError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match map_err(err, key, op, action) {
            KeyError::KmsAccessDenied(d) if d.principal == UNKNOWN_PRINCIPAL => {
                let caller = self
                    .sts
                    .get_caller_identity()
                    .send()
                    .await
                    .ok()
                    .and_then(|out| out.arn().map(shown));
                match caller {
                    Some(arn) => kms_denied(&d.key, &d.operation, &d.action, &arn, d.aws_said),
                    None => KeyError::KmsAccessDenied(d),
                }
            }
            other => other,
        }
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
mod tests;
