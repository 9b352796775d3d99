//! Unit tests of the AWS KMS backend: error mapping, message parsing, keyslot checks.

use super::*;

#[test]
fn principal_and_action_are_taken_from_kms_messages() {
    let m = "User: arn:aws:iam::1:user/bob is not authorized to perform: kms:Decrypt on \
             resource: arn:aws:kms:us-east-1:1:key/x";
    assert_eq!(
        principal_from(m).as_deref(),
        Some("arn:aws:iam::1:user/bob")
    );
    assert_eq!(action_from(m).as_deref(), Some("kms:Decrypt"));
    assert_eq!(
        action_from("User: x is not authorized to perform: kms:ReEncryptTo.").as_deref(),
        Some("kms:ReEncryptTo")
    );
    assert_eq!(principal_from("nope"), None);
    assert_eq!(principal_from("User: bob is not authorized"), None);
    assert_eq!(action_from("Action kms:DescribeKey is now allowed"), None);
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

type DecryptSdkError = SdkError<
    aws_sdk_kms::operation::decrypt::DecryptError,
    aws_sdk_kms::config::http::HttpResponse,
>;

fn service_error(status: u16, code: &str, message: &str) -> DecryptSdkError {
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

/// A response whose body the SDK's JSON error parser could not read (no code).
fn unparsed_error(status: u16, body: &str) -> DecryptSdkError {
    let meta = aws_sdk_kms::error::ErrorMetadata::builder().build();
    let raw = aws_sdk_kms::config::http::HttpResponse::new(
        status.try_into().expect("status"),
        body.to_string().into(),
    );
    SdkError::service_error(
        aws_sdk_kms::operation::decrypt::DecryptError::generic(meta),
        raw,
    )
}

const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const BOB: &str = "arn:aws:iam::111122223333:user/bob";

/// The fields of a KmsAccessDenied, or a panic naming what came instead.
fn denied(e: &KeyError) -> (&str, &str, &str, &str, String) {
    match e {
        KeyError::KmsAccessDenied(d) => {
            (&d.key, &d.operation, &d.action, &d.principal, e.to_string())
        }
        other => panic!("not a KMS access denial: {other:?}"),
    }
}

#[test]
fn kms_errors_map_to_typed_errors() {
    let k = KEY;
    let m = |e, op| map_err(e, k, op, "kms:Decrypt");
    let e = m(service_error(400, "NotFoundException", "gone"), "unwrap");
    assert!(matches!(e, KeyError::NotFound { .. }), "{e:?}");
    let e = m(
        service_error(
            400,
            "AccessDeniedException",
            &format!("User: {BOB} is not authorized to perform: kms:Decrypt"),
        ),
        "unwrap",
    );
    assert_eq!(e.kind(), "AccessDenied");
    let (key, op, action, principal, _) = denied(&e);
    assert_eq!(
        (key, op, action, principal),
        (k, "unwrap", "kms:Decrypt", BOB)
    );
    for code in ["DisabledException", "KMSInvalidStateException"] {
        let e = m(service_error(400, code, "no"), "unwrap");
        assert!(matches!(e, KeyError::KeyUnusable { .. }), "{e:?}");
    }
    for code in ["InvalidCiphertextException", "IncorrectKeyException"] {
        let e = m(service_error(400, code, ""), "unwrap");
        assert!(matches!(e, KeyError::WrongKey { .. }), "{e:?}");
    }
    let e = m(service_error(400, "ThrottlingException", ""), "unwrap");
    assert!(matches!(e, KeyError::Transient(_)), "{e:?}");
    let e = m(service_error(503, "SomethingNew", ""), "unwrap");
    assert!(matches!(e, KeyError::Transient(_)), "{e:?}");
    let e = m(service_error(400, "ValidationException", "bad"), "unwrap");
    assert!(matches!(e, KeyError::Unsupported(_)), "{e:?}");
}

/// A KEY POLICY denial: moto does not enforce key policies on Decrypt, so this is the
/// test of that path. AWS answers it as an IAM denial is answered (same code, the
/// message says "explicit deny in a resource-based policy"), and it must read the same.
#[test]
fn key_policy_denial_of_decrypt_names_key_action_principal_and_remedy() {
    let aws = format!(
        "User: {BOB} is not authorized to perform: kms:Decrypt on resource: {KEY} with an \
         explicit deny in a resource-based policy"
    );
    let e = map_err(
        service_error(400, "AccessDeniedException", &aws),
        KEY,
        "unwrap",
        "kms:Decrypt",
    );
    let (key, op, action, principal, text) = denied(&e);
    assert_eq!(
        (key, op, action, principal),
        (KEY, "unwrap", "kms:Decrypt", BOB)
    );
    assert!(text.starts_with("access denied"), "{text}");
    assert!(
        text.contains(&format!("grant kms:Decrypt on {KEY} to {BOB}")),
        "{text}"
    );
    assert!(
        text.contains("resource-based policy"),
        "AWS's words kept: {text}"
    );
    // The same for GenerateDataKey at create.
    let aws =
        format!("User: {BOB} is not authorized to perform: kms:GenerateDataKey on resource: {KEY}");
    let e = map_err(
        service_error(400, "AccessDeniedException", &aws),
        KEY,
        "generate",
        "kms:GenerateDataKey",
    );
    assert!(e
        .to_string()
        .contains(&format!("grant kms:GenerateDataKey on {KEY} to {BOB}")));
}

/// moto refuses a JSON API call by IAM policy with HTTP 403 and an XML body.
#[test]
fn xml_denial_body_is_read_when_the_sdk_found_no_code() {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<ErrorResponse><Errors><Error>\
         <Code>AccessDenied</Code><Message>User: {BOB} is not authorized to perform: \
         kms:GenerateDataKey</Message><Type>Sender</Type></Error></Errors></ErrorResponse>"
    );
    let e = map_err(
        unparsed_error(403, &body),
        KEY,
        "generate",
        "kms:GenerateDataKey",
    );
    let (key, op, action, principal, text) = denied(&e);
    assert_eq!(
        (key, op, action, principal),
        (KEY, "generate", "kms:GenerateDataKey", BOB)
    );
    assert!(!text.contains("<Code>"), "{text}");
    // A bare 403 without a readable code is still a denial, with the principal to be
    // looked up.
    let e = map_err(
        unparsed_error(403, "forbidden"),
        KEY,
        "unwrap",
        "kms:Decrypt",
    );
    let (_, _, action, principal, text) = denied(&e);
    assert_eq!((action, principal), ("kms:Decrypt", UNKNOWN_PRINCIPAL));
    assert!(text.contains("HTTP 403"), "{text}");
    assert_eq!(
        xml_element("<Message>a &lt;b&gt; &amp; c</Message>", "Message").as_deref(),
        Some("a <b> & c")
    );
    assert_eq!(xml_element("<Message>unterminated", "Message"), None);
}

#[test]
fn refused_credentials_say_to_check_them() {
    for code in [
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
    ] {
        let e = map_err(
            service_error(400, code, "bad token"),
            KEY,
            "unwrap",
            "kms:Decrypt",
        );
        let (_, _, _, principal, text) = denied(&e);
        assert_eq!(principal, REFUSED_CREDENTIALS);
        assert!(text.contains("AWS_ACCESS_KEY_ID"), "{text}");
        assert!(!text.contains("grant"), "{text}");
    }
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
