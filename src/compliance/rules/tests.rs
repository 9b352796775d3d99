//! Unit tests of the rules: verdicts and finding codes for each rule family.

use super::rotation::SECS_PER_DAY;
use super::*;
use crate::compliance::detect::DataKind;
use crate::keys::{EncryptionContext, KeyState, WrappedDek, AWS_KMS, EXEC, LOCAL, PASSPHRASE};
use crate::volume::{CopyStatus, Header, HeaderHealth};

const NOW: u64 = 1_750_000_000;
const DAY: u64 = SECS_PER_DAY;

fn healthy() -> HeaderHealth {
    HeaderHealth {
        primary: CopyStatus::Ok,
        secondary: CopyStatus::Ok,
    }
}

fn enabled(versions: u32, since: u64) -> KeyFacts {
    KeyFacts::Found {
        state: KeyState::Enabled,
        deletion_date: None,
        rotation: Some(RotationFacts {
            versions,
            current_since_unix: since,
        }),
    }
}

fn local(id: &str, key: KeyFacts) -> SlotFacts {
    SlotFacts {
        backend: LOCAL.into(),
        key_id: id.into(),
        key,
    }
}

fn pass() -> SlotFacts {
    SlotFacts {
        backend: PASSPHRASE.into(),
        key_id: String::new(),
        key: KeyFacts::Passphrase,
    }
}

fn vol(slots: Vec<SlotFacts>) -> VolumeFacts {
    VolumeFacts {
        uuid: uuid::Uuid::nil(),
        health: healthy(),
        required_features: Vec::new(),
        needed_len: 2 << 20,
        file_len: Some(2 << 20),
        slots,
        map_problem: None,
        header_invalid: None,
    }
}

#[test]
fn an_invalid_header_geometry_is_non_compliant() {
    let mut v = vol(Vec::new());
    v.header_invalid = Some("allocation map of 9 pages does not fit".into());
    let f = volume_findings(&v, &Policy::default(), 0);
    assert!(f.iter().any(|f| f.code == Code::HeaderInvalid
        && f.code.severity() == Severity::NonCompliant
        && f.message.contains("9 pages")
        && f.message.contains("restore the header from a backup")));
}

#[test]
fn a_damaged_allocation_map_is_non_compliant() {
    let mut v = vol(Vec::new());
    v.map_problem = Some("1 of 1 pages damaged in both copies".into());
    let f = volume_findings(&v, &Policy::default(), 0);
    assert!(f.iter().any(|f| f.code == Code::AllocationMapDamaged
        && f.code.severity() == Severity::NonCompliant
        && f.message.contains("1 of 1 pages")));
}

fn ident(backend: &str, id: &str, label: &str) -> KeyIdentity {
    KeyIdentity {
        backend: backend.into(),
        key_id: id.into(),
        label: label.into(),
    }
}

fn eval(v: VolumeFacts, p: &Policy) -> (Verdict, Vec<Code>) {
    let (verdict, f) = evaluate(&Subject::Volume(v), p, NOW);
    (verdict, f.iter().map(|f| f.code).collect())
}

fn good() -> SlotFacts {
    local("mk-a", enabled(1, NOW - DAY))
}

#[test]
fn a_healthy_volume_is_compliant() {
    let (v, codes) = eval(vol(vec![good()]), &Policy::default());
    assert_eq!((v, codes), (Verdict::Compliant, vec![]));
    // A recovery passphrase next to a key is fine.
    let (v, _) = eval(vol(vec![good(), pass()]), &Policy::default());
    assert_eq!(v, Verdict::Compliant);
}

#[test]
fn foreign_data_is_not_a_volume() {
    for kind in [
        DataKind::Qcow2 { version: 3 },
        DataKind::Empty,
        DataKind::Zeros,
    ] {
        let (v, f) = evaluate(&Subject::Foreign(kind.clone()), &Policy::default(), NOW);
        assert_eq!(v, Verdict::NonCompliant);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, Code::NotAVolume);
        assert!(f[0].message.contains(&kind.describe()), "{}", f[0].message);
    }
}

#[test]
fn unreadable_is_an_error_and_skipped_is_skipped() {
    let (v, f) = evaluate(
        &Subject::Unreadable("permission denied".into()),
        &Policy::default(),
        NOW,
    );
    assert_eq!(v, Verdict::Error);
    assert_eq!(f[0].code, Code::ScanError);
    let (v, f) = evaluate(&Subject::Skipped("socket".into()), &Policy::default(), NOW);
    assert_eq!((v, f.len()), (Verdict::Skipped, 1));
    assert_eq!(f[0].code.severity(), Severity::Note);
}

#[test]
fn key_states() {
    let cases = [
        (
            KeyFacts::Found {
                state: KeyState::Disabled,
                deletion_date: None,
                rotation: None,
            },
            Code::KeyDisabled,
        ),
        (
            KeyFacts::Found {
                state: KeyState::PendingDeletion,
                deletion_date: Some("2030-01-01T00:00:00Z".into()),
                rotation: None,
            },
            Code::KeyPendingDeletion,
        ),
        (KeyFacts::Missing("gone".into()), Code::KeyMissing),
        (KeyFacts::UnsupportedBackend, Code::KeyBackendUnsupported),
    ];
    for (facts, code) in cases {
        let (v, codes) = eval(vol(vec![local("mk-a", facts)]), &Policy::default());
        assert_eq!((v, codes), (Verdict::NonCompliant, vec![code]));
    }
    // Only one bad slot among good ones still counts.
    let (v, codes) = eval(
        vol(vec![
            good(),
            local("mk-b", KeyFacts::Missing("gone".into())),
        ]),
        &Policy::default(),
    );
    assert_eq!((v, codes), (Verdict::NonCompliant, vec![Code::KeyMissing]));
}

#[test]
fn pending_deletion_message_has_the_date() {
    let facts = KeyFacts::Found {
        state: KeyState::PendingDeletion,
        deletion_date: Some("2030-01-01T00:00:00Z".into()),
        rotation: None,
    };
    let (_, f) = evaluate(
        &Subject::Volume(vol(vec![local("mk-a", facts)])),
        &Policy::default(),
        NOW,
    );
    assert!(f[0].message.contains("2030-01-01"), "{}", f[0].message);
    assert_eq!(f[0].keyslot, Some(0));
}

#[test]
fn lookup_failure_is_an_error_unless_something_is_non_compliant() {
    let failed = local("mk-a", KeyFacts::LookupFailed("EACCES".into()));
    let (v, codes) = eval(vol(vec![failed.clone()]), &Policy::default());
    assert_eq!((v, codes), (Verdict::Error, vec![Code::KeyLookupFailed]));
    let mut broken = vol(vec![failed]);
    broken.health.primary = CopyStatus::Damaged("checksum mismatch".into());
    let (v, codes) = eval(broken, &Policy::default());
    assert_eq!(v, Verdict::NonCompliant);
    assert_eq!(codes, vec![Code::HeaderCopyDamaged, Code::KeyLookupFailed]);
}

#[test]
fn header_copies() {
    let mut v = vol(vec![good()]);
    v.health.secondary = CopyStatus::Damaged("checksum mismatch".into());
    let (_, f) = evaluate(&Subject::Volume(v), &Policy::default(), NOW);
    assert_eq!(f[0].code, Code::HeaderCopyDamaged);
    assert!(
        f[0].message.contains("secondary") && f[0].message.contains("checksum"),
        "{}",
        f[0].message
    );
    let mut v = vol(vec![good()]);
    v.health.primary = CopyStatus::Stale(3);
    let (verdict, codes) = eval(v, &Policy::default());
    assert_eq!(
        (verdict, codes),
        (Verdict::NonCompliant, vec![Code::HeaderCopyStale])
    );
}

#[test]
fn broken_headers() {
    let cases = [
        (
            HeaderProblem::BothCopiesDamaged {
                primary: "a".into(),
                secondary: "b".into(),
            },
            vec![Code::HeaderBothCopiesDamaged],
        ),
        (
            HeaderProblem::Truncated("100 bytes".into()),
            vec![Code::HeaderBothCopiesDamaged],
        ),
        (
            HeaderProblem::UnsupportedVersion {
                version: 7,
                supported: "1".into(),
            },
            vec![Code::UnsupportedVersion],
        ),
        (
            HeaderProblem::UnsupportedFeature {
                features: vec!["sparse-map".into()],
            },
            vec![Code::UnsupportedFeature],
        ),
        (
            HeaderProblem::UnsupportedFeature {
                features: vec!["reencrypt".into()],
            },
            vec![Code::ReencryptionInterrupted],
        ),
        (
            HeaderProblem::UnsupportedFeature {
                features: vec!["reencrypt".into(), "x".into()],
            },
            vec![Code::ReencryptionInterrupted, Code::UnsupportedFeature],
        ),
    ];
    for (p, want) in cases {
        let (v, f) = evaluate(&Subject::BrokenVolume(p), &Policy::default(), NOW);
        assert_eq!(v, Verdict::NonCompliant);
        assert_eq!(f.iter().map(|f| f.code).collect::<Vec<_>>(), want);
    }
}

#[test]
fn reencrypt_detection_on_a_header_value() {
    let uuid = uuid::Uuid::new_v4();
    let mut header = Header {
        format_version: 1,
        sequence: 1,
        uuid,
        size: 1 << 20,
        sector_size: 4096,
        data_offset: 1 << 20,
        cipher: crate::volume::CIPHER.into(),
        keyslots: vec![WrappedDek {
            backend: LOCAL.into(),
            key_id: "mk-a".into(),
            blob: vec![0; 92],
            context: EncryptionContext::for_volume(&uuid),
            params: Default::default(),
        }],
        iv_unit: 4096,
        required_features: Vec::new(),
        compatible_features: Vec::new(),
        allocation_map: None,
        reencrypt: None,
        key_check: [0; 32],
        header_mac: [0; 32],
    };
    assert!(!reencrypt_in_progress(&header.required_features));
    header.required_features.push("reencrypt".into());
    assert!(reencrypt_in_progress(&header.required_features));
    // A compatible feature of that name does not count: only a required one marks it.
    assert!(!reencrypt_in_progress(&["reencrypt-done"]));
    let mut v = vol(vec![good()]);
    v.required_features = header.required_features.clone();
    let (verdict, codes) = eval(v, &Policy::default());
    assert_eq!(
        (verdict, codes),
        (Verdict::NonCompliant, vec![Code::ReencryptionInterrupted])
    );
}

#[test]
fn truncated_data_area() {
    let mut v = vol(vec![good()]);
    v.file_len = Some(v.needed_len - 4096);
    let (_, codes) = eval(v.clone(), &Policy::default());
    assert_eq!(codes, vec![Code::VolumeTruncated]);
    v.file_len = None;
    assert_eq!(eval(v, &Policy::default()).0, Verdict::Compliant);
}

#[test]
fn passphrase_only() {
    let (v, codes) = eval(vol(vec![pass(), pass()]), &Policy::default());
    assert_eq!(
        (v, codes),
        (Verdict::NonCompliant, vec![Code::PassphraseOnly])
    );
    // With a required key, it also says that no slot uses it.
    let p = Policy {
        required_keys: vec![ident(LOCAL, "mk-a", "alias/a")],
        ..Policy::default()
    };
    let (_, codes) = eval(vol(vec![pass()]), &p);
    assert_eq!(codes, vec![Code::PassphraseOnly, Code::KeyNotRequired]);
}

#[test]
fn required_key() {
    let p = Policy {
        required_keys: vec![ident(LOCAL, "mk-a", "alias/a")],
        ..Policy::default()
    };
    assert_eq!(eval(vol(vec![good()]), &p).0, Verdict::Compliant);
    assert_eq!(eval(vol(vec![good(), pass()]), &p).0, Verdict::Compliant);
    let other = local("mk-b", enabled(1, NOW));
    let (v, codes) = eval(vol(vec![other.clone()]), &p);
    assert_eq!(v, Verdict::NonCompliant);
    assert_eq!(codes, vec![Code::KeyNotRequired, Code::KeyNotRequired]);
    // A second key next to the required one is flagged too.
    let (_, f) = evaluate(&Subject::Volume(vol(vec![good(), other])), &p, NOW);
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].code, f[0].keyslot), (Code::KeyNotRequired, Some(1)));
    assert!(f[0].message.contains("alias/a"), "{}", f[0].message);
    // Same id, other backend: not the required key.
    let exec = SlotFacts {
        backend: EXEC.into(),
        key_id: "mk-a".into(),
        key: enabled(1, NOW),
    };
    assert_eq!(eval(vol(vec![exec]), &p).0, Verdict::NonCompliant);
}

#[test]
fn default_key() {
    let dflt = ident(LOCAL, "mk-d", "alias/cryptvol/default");
    let on_default = || vol(vec![local("mk-d", enabled(1, NOW))]);
    // Not asked for: fine.
    let p = Policy {
        default_keys: vec![dflt.clone()],
        ..Policy::default()
    };
    assert_eq!(eval(on_default(), &p).0, Verdict::Compliant);
    // --no-default-key.
    let p = Policy {
        default_keys: vec![dflt.clone()],
        forbid_default_key: true,
        ..Policy::default()
    };
    assert_eq!(eval(on_default(), &p).1, vec![Code::DefaultKey]);
    assert_eq!(eval(vol(vec![good()]), &p).0, Verdict::Compliant);
    // --require-key another key: DEFAULT_KEY for the slot (not KEY_NOT_REQUIRED too),
    // plus "no keyslot uses the required key".
    let p = Policy {
        default_keys: vec![dflt.clone()],
        required_keys: vec![ident(LOCAL, "mk-a", "alias/a")],
        ..Policy::default()
    };
    assert_eq!(
        eval(on_default(), &p).1,
        vec![Code::DefaultKey, Code::KeyNotRequired]
    );
    // --require-key the default key itself: compliant.
    let p = Policy {
        default_keys: vec![dflt.clone()],
        required_keys: vec![dflt],
        forbid_default_key: false,
        ..Policy::default()
    };
    assert_eq!(eval(on_default(), &p).0, Verdict::Compliant);
}

#[test]
fn kms_keys_match_by_arn_or_key_id() {
    let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let k = ident(AWS_KMS, arn, "aws-kms:alias/ebs");
    assert!(k.matches(AWS_KMS, arn));
    assert!(k.matches(AWS_KMS, "1234abcd-12ab-34cd-56ef-1234567890ab"));
    assert!(!k.matches(AWS_KMS, "ffff"));
    assert!(!k.matches(LOCAL, arn));
    // Two ARNs of different accounts with the same id are different keys.
    let other = "arn:aws:kms:us-east-1:999999999999:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    assert!(!k.matches(AWS_KMS, other));
    let bare = ident(AWS_KMS, "1234abcd-12ab-34cd-56ef-1234567890ab", "x");
    assert!(bare.matches(AWS_KMS, arn));
}

#[test]
fn rotation_rules() {
    let old = NOW - 400 * DAY;
    let young = NOW - 10 * DAY;
    let never_rotated_old = || vol(vec![local("mk-a", enabled(1, old))]);
    let rotated_old = || vol(vec![local("mk-a", enabled(3, old))]);
    let rotated_young = || vol(vec![local("mk-a", enabled(2, young))]);
    // No rotation rule: nothing.
    assert_eq!(
        eval(never_rotated_old(), &Policy::default()).0,
        Verdict::Compliant
    );
    // --require-rotation: default period 365 days.
    let p = Policy {
        require_rotation: true,
        ..Policy::default()
    };
    assert_eq!(eval(never_rotated_old(), &p).1, vec![Code::KeyRotationOff]);
    assert_eq!(eval(rotated_old(), &p).1, vec![Code::KeyRotationOverdue]);
    assert_eq!(eval(rotated_young(), &p).0, Verdict::Compliant);
    let young_never = vol(vec![local("mk-a", enabled(1, young))]);
    assert_eq!(eval(young_never, &p).0, Verdict::Compliant);
    // --max-key-age alone: overdue, whatever the history.
    let p = Policy {
        max_key_age_days: Some(30),
        ..Policy::default()
    };
    assert_eq!(
        eval(never_rotated_old(), &p).1,
        vec![Code::KeyRotationOverdue]
    );
    assert_eq!(eval(rotated_young(), &p).0, Verdict::Compliant);
    // --max-key-age 0: everything is due.
    let p = Policy {
        max_key_age_days: Some(0),
        ..Policy::default()
    };
    let now_key = vol(vec![local("mk-a", enabled(2, NOW))]);
    assert_eq!(eval(now_key, &p).1, vec![Code::KeyRotationOverdue]);
    // Both: the period is --max-key-age; never rotated says "off".
    let p = Policy {
        max_key_age_days: Some(5),
        require_rotation: true,
        ..Policy::default()
    };
    assert_eq!(eval(rotated_young(), &p).1, vec![Code::KeyRotationOverdue]);
    // A clock before the material (skew) is not overdue.
    let future = vol(vec![local("mk-a", enabled(1, NOW + DAY))]);
    assert_eq!(
        eval(
            future,
            &Policy {
                max_key_age_days: Some(1),
                ..Policy::default()
            }
        )
        .0,
        Verdict::Compliant
    );
}

#[test]
fn rotation_of_other_backends_is_a_note() {
    let kms = SlotFacts {
        backend: AWS_KMS.into(),
        key_id: "arn:aws:kms:r:a:key/k".into(),
        key: KeyFacts::Found {
            state: KeyState::Enabled,
            deletion_date: None,
            rotation: None,
        },
    };
    let p = Policy {
        require_rotation: true,
        ..Policy::default()
    };
    let (v, codes) = eval(vol(vec![kms]), &p);
    assert_eq!(
        (v, codes),
        (Verdict::Compliant, vec![Code::KeyRotationNotChecked])
    );
}

#[test]
fn codes_are_stable_strings() {
    for c in Code::ALL {
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, format!("\"{}\"", c.as_str()));
    }
    assert_eq!(Code::ALL.len(), 23);
    let v = serde_json::to_string(&Verdict::NonCompliant).unwrap();
    assert_eq!(v, "\"NON_COMPLIANT\"");
}
