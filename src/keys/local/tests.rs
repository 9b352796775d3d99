use super::*;

use std::ffi::OsString;
use std::fs::{self, Permissions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::{Arc, Barrier};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::aliases::{ALIASES_FILE, MAX_ALIAS_NAME_LEN};
use super::directory::{keystore_dir_for, LOCK_FILE};
use super::files::TMP_PREFIX;
use super::record::is_key_id;
use crate::keys::audit::AUDIT_FILE;
use crate::keys::clock::now_unix;
use crate::keys::{KeyRef, KeyState, Permission};

mod admin;

fn ctx(uuid: &uuid::Uuid) -> EncryptionContext {
    EncryptionContext::for_volume(uuid)
}

fn new_store() -> (tempfile::TempDir, LocalKeystore) {
    let tmp = tempfile::tempdir().unwrap();
    let ks = LocalKeystore::open(&tmp.path().join("keys"), true).unwrap();
    (tmp, ks)
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn keystore_reason(err: KeyError) -> String {
    match err {
        KeyError::Keystore { reason, .. } => reason,
        other => panic!("expected a Keystore error, got {other:?}"),
    }
}

#[tokio::test]
async fn generate_and_unwrap_round_trip() {
    let (_tmp, ks) = new_store();
    let id = ks.create_key(None).unwrap().key_id;
    let vol = uuid::Uuid::new_v4();
    let (dek, wrapped) = ks.generate_dek(Some(&id), &ctx(&vol)).await.unwrap();
    assert_eq!(wrapped.backend, "local");
    assert_eq!(wrapped.key_id, id);
    assert_eq!(wrapped.context, ctx(&vol));
    assert_eq!(
        wrapped.params.get("alg").map(String::as_str),
        Some("AES-256-GCM")
    );
    assert_eq!(wrapped.params.get("version").map(String::as_str), Some("1"));
    assert_eq!(wrapped.blob.len(), 12 + 64 + 16);
    let back = ks.unwrap(&wrapped, &ctx(&vol)).await.unwrap();
    assert_eq!(back.expose(), dek.expose());
}

#[tokio::test]
async fn wrap_existing_dek_round_trip() {
    let (_tmp, ks) = new_store();
    let vol = uuid::Uuid::new_v4();
    let dek = Dek::generate().unwrap();
    let wrapped = ks.wrap(None, &dek, &ctx(&vol)).await.unwrap();
    let back = ks.unwrap(&wrapped, &ctx(&vol)).await.unwrap();
    assert_eq!(back.expose(), dek.expose());
}

#[tokio::test]
async fn two_deks_under_one_key_differ() {
    let (_tmp, ks) = new_store();
    let vol = uuid::Uuid::new_v4();
    let (a, wa) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
    let (b, wb) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
    assert_eq!(wa.key_id, wb.key_id);
    assert_ne!(a.expose(), b.expose());
    assert_ne!(wa.blob, wb.blob);
}

#[tokio::test]
async fn context_of_another_volume_is_refused() {
    let (_tmp, ks) = new_store();
    let (vol_a, vol_b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let (_dek, wrapped) = ks.generate_dek(None, &ctx(&vol_a)).await.unwrap();
    let err = ks.unwrap(&wrapped, &ctx(&vol_b)).await.err().unwrap();
    match &err {
        KeyError::ContextMismatch { expected, found } => {
            assert_eq!(expected, &format!("volume {vol_b}"));
            assert_eq!(found, &format!("volume {vol_a}"));
        }
        other => panic!("expected ContextMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&vol_a.to_string()) && msg.contains(&vol_b.to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn edited_context_fails_to_authenticate() {
    let (_tmp, ks) = new_store();
    let (vol_a, vol_b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let (_dek, mut wrapped) = ks.generate_dek(None, &ctx(&vol_a)).await.unwrap();
    wrapped.context = ctx(&vol_b);
    let err = ks.unwrap(&wrapped, &ctx(&vol_b)).await.err().unwrap();
    assert!(
        matches!(err, KeyError::WrongKey { ref key } if key == &wrapped.key_id),
        "{err:?}"
    );
    assert!(err.to_string().contains(&wrapped.key_id));
}

#[tokio::test]
async fn blob_moved_to_another_key_fails() {
    let (_tmp, ks) = new_store();
    let k1 = ks.create_key(None).unwrap().key_id;
    let k2 = ks.create_key(None).unwrap().key_id;
    let vol = uuid::Uuid::new_v4();
    let (_dek, mut wrapped) = ks.generate_dek(Some(&k1), &ctx(&vol)).await.unwrap();
    wrapped.key_id = k2.clone();
    let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(
        matches!(err, KeyError::WrongKey { ref key } if key == &k2),
        "{err:?}"
    );
}

#[tokio::test]
async fn tampered_blob_and_wrong_backend() {
    let (_tmp, ks) = new_store();
    let vol = uuid::Uuid::new_v4();
    let (_dek, wrapped) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();

    let mut flipped = wrapped.clone();
    flipped.blob[30] ^= 0x80;
    let err = ks.unwrap(&flipped, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::WrongKey { .. }), "{err:?}");

    let mut short = wrapped.clone();
    short.blob.truncate(40);
    let err = ks.unwrap(&short, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");

    let mut other = wrapped.clone();
    other.backend = "passphrase".into();
    let err = ks.unwrap(&other, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");

    let mut alg = wrapped.clone();
    alg.params.insert("alg".into(), "AES-128-CBC".into());
    let err = ks.unwrap(&alg, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");

    let mut path = wrapped.clone();
    path.key_id = "../../etc/passwd".into();
    let err = ks.unwrap(&path, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");
}

#[tokio::test]
async fn unknown_key_id_is_not_found() {
    let (_tmp, ks) = new_store();
    let (_tmp2, other) = new_store();
    let vol = uuid::Uuid::new_v4();
    let (_dek, wrapped) = other.generate_dek(None, &ctx(&vol)).await.unwrap();
    let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(&wrapped.key_id), "{err}");

    let missing = "mk-00000000000000000000000000000000";
    let err = ks.resolve(Some(missing)).err().unwrap();
    assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(missing), "{err}");
    let err = ks
        .generate_dek(Some(missing), &ctx(&vol))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains(missing), "{err}");

    let err = ks.resolve(Some("alias/nope")).err().unwrap();
    assert!(err.to_string().contains("alias/nope"), "{err}");
    let err = ks.resolve(Some("garbage")).err().unwrap();
    assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
    let err = ks.describe_key(Some("alias/nope")).await.err().unwrap();
    assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn alias_resolves_and_is_never_stored() {
    let (_tmp, ks) = new_store();
    let info = ks.create_key(Some("alias/db-keys/prod_1")).unwrap();
    assert_eq!(info.aliases, vec!["alias/db-keys/prod_1".to_string()]);
    assert!(!info.default);
    assert!(is_key_id(&info.key_id), "{}", info.key_id);
    assert_eq!(
        ks.resolve(Some("alias/db-keys/prod_1")).unwrap(),
        info.key_id
    );
    assert_eq!(ks.resolve(Some(&info.key_id)).unwrap(), info.key_id);

    let vol = uuid::Uuid::new_v4();
    let (_d, wrapped) = ks
        .generate_dek(Some("alias/db-keys/prod_1"), &ctx(&vol))
        .await
        .unwrap();
    assert_eq!(wrapped.key_id, info.key_id);

    let desc = ks.describe_key(Some("alias/db-keys/prod_1")).await.unwrap();
    assert_eq!(desc.backend, "local");
    assert_eq!(desc.key_id, info.key_id);
    assert_eq!(desc.aliases, vec!["alias/db-keys/prod_1".to_string()]);
    assert_eq!(desc.state, KeyState::Enabled);
    assert_eq!(desc.created_at, info.created_at);
}

#[test]
fn duplicate_alias_refused() {
    let (_tmp, ks) = new_store();
    let first = ks.create_key(Some("alias/app")).unwrap();
    let reason = keystore_reason(ks.create_key(Some("alias/app")).err().unwrap());
    assert!(
        reason.contains("alias/app") && reason.contains(&first.key_id),
        "{reason}"
    );
    assert_eq!(ks.list_keys().unwrap().len(), 1);
}

#[test]
fn invalid_aliases_refused() {
    let (_tmp, ks) = new_store();
    let long = format!("alias/{}", "a".repeat(MAX_ALIAS_NAME_LEN + 1));
    for bad in [
        "app",
        "alias/",
        "alias/has space",
        "alias/dot.name",
        "alias/aws/ebs",
        "alias/cryptvol/default",
        long.as_str(),
    ] {
        let err = ks.create_key(Some(bad)).err();
        assert!(
            matches!(err, Some(KeyError::Keystore { .. })),
            "{bad}: {err:?}"
        );
    }
    let ok = format!("alias/{}", "a".repeat(MAX_ALIAS_NAME_LEN));
    assert!(ks.create_key(Some(&ok)).is_ok());
    assert_eq!(ks.list_keys().unwrap().len(), 1);
}

#[tokio::test]
async fn default_key_created_once() {
    let (_tmp, ks) = new_store();
    let a = ks.resolve(None).unwrap();
    let b = ks.resolve(None).unwrap();
    assert_eq!(a, b);
    let vol = uuid::Uuid::new_v4();
    let (_d, wrapped) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
    assert_eq!(wrapped.key_id, a);
    assert_eq!(ks.resolve(Some(DEFAULT_KEY_ALIAS)).unwrap(), a);
    let keys = ks.list_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].default);
    assert_eq!(keys[0].aliases, vec![DEFAULT_KEY_ALIAS.to_string()]);
    // A reopened handle sees the same default.
    let again = LocalKeystore::open(ks.dir(), false).unwrap();
    assert_eq!(again.resolve(None).unwrap(), a);
}

#[test]
fn concurrent_default_creation_yields_one_key() {
    let (_tmp, ks) = new_store();
    let dir = ks.dir().to_path_buf();
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let dir = dir.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let ks = LocalKeystore::open(&dir, false).unwrap();
                barrier.wait();
                ks.resolve(None).unwrap()
            })
        })
        .collect();
    let ids: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    let keys = ks.list_keys().unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].default);
}

#[test]
fn concurrent_same_alias_creation_yields_one_key() {
    let (_tmp, ks) = new_store();
    let dir = ks.dir().to_path_buf();
    let threads = 6;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let dir = dir.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let ks = LocalKeystore::open(&dir, false).unwrap();
                barrier.wait();
                ks.create_key(Some("alias/shared")).is_ok()
            })
        })
        .collect();
    let successes = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(successes, 1);
    assert_eq!(ks.list_keys().unwrap().len(), 1);
}

#[test]
fn keystore_created_private() {
    let (tmp, ks) = new_store();
    assert_eq!(ks.dir(), tmp.path().join("keys"));
    assert_eq!(mode(ks.dir()), 0o700);
    let id = ks.resolve(None).unwrap();
    ks.create_key(Some("alias/x")).unwrap();
    assert_eq!(mode(&ks.key_path(&id)), 0o600);
    assert_eq!(mode(&ks.dir().join(ALIASES_FILE)), 0o600);
    assert_eq!(mode(&ks.dir().join(LOCK_FILE)), 0o600);
    // No temporary files are left behind.
    let names: Vec<String> = fs::read_dir(ks.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(TMP_PREFIX)),
        "{names:?}"
    );
    // .lock, aliases.json, two keys, audit.jsonl
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(mode(&ks.dir().join("audit.jsonl")), 0o600);
}

#[test]
fn key_file_format() {
    let (_tmp, ks) = new_store();
    let info = ks.create_key(None).unwrap();
    let text = fs::read_to_string(ks.key_path(&info.key_id)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(v["key_id"], info.key_id.as_str());
    assert_eq!(v["state"], "Enabled");
    assert_eq!(v["spec"], "AES_256");
    assert_eq!(v["created_at"], info.created_at.as_str());
    assert_eq!(v["creator_uid"], ks.principal().uid);
    assert_eq!(v["policy"]["unwrap"][0], ks.principal().uid);
    assert_eq!(v["materials"].as_array().unwrap().len(), 1);
    assert_eq!(v["materials"][0]["version"], 1);
    let material = STANDARD
        .decode(v["materials"][0]["material"].as_str().unwrap())
        .unwrap();
    assert_eq!(material.len(), 32);
    assert!(v.get("deletion_unix").is_none());
    assert_eq!(info.created_at.len(), 20, "{}", info.created_at);
    assert!(info.created_at.ends_with('Z'));
}

#[test]
fn group_readable_keystore_refused() {
    let (_tmp, ks) = new_store();
    fs::set_permissions(ks.dir(), Permissions::from_mode(0o755)).unwrap();
    for create in [false, true] {
        let reason = keystore_reason(LocalKeystore::open(ks.dir(), create).err().unwrap());
        assert!(reason.contains("chmod 700"), "{reason}");
        assert!(reason.contains("0755"), "{reason}");
    }
}

#[tokio::test]
async fn group_readable_key_file_refused() {
    let (_tmp, ks) = new_store();
    let id = ks.resolve(None).unwrap();
    let path = ks.key_path(&id);
    fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
    let err = LocalKeystore::open(ks.dir(), false).err().unwrap();
    match err {
        KeyError::Keystore { path: p, reason } => {
            assert_eq!(p, path.display().to_string());
            assert!(reason.contains("chmod 600"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // An already open handle refuses it at use too.
    let vol = uuid::Uuid::new_v4();
    let err = ks.generate_dek(None, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::Keystore { .. }), "{err:?}");
}

#[test]
fn symlinked_key_file_refused() {
    let (tmp, ks) = new_store();
    let target = tmp.path().join("elsewhere.json");
    fs::write(&target, b"{}").unwrap();
    fs::set_permissions(&target, Permissions::from_mode(0o600)).unwrap();
    let link = ks.dir().join("mk-0123456789abcdef0123456789abcdef.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let reason = keystore_reason(LocalKeystore::open(ks.dir(), false).err().unwrap());
    assert!(reason.contains("symbolic link"), "{reason}");
    let reason = keystore_reason(
        ks.load_key("mk-0123456789abcdef0123456789abcdef", true)
            .err()
            .unwrap(),
    );
    assert!(reason.contains("symbolic link"), "{reason}");
}

#[test]
fn missing_keystore_refused_without_create() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nope");
    let err = LocalKeystore::open(&dir, false).err().unwrap();
    let msg = err.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("cryptvol key create"), "{msg}");
    assert!(!dir.exists());
}

#[test]
fn newer_format_and_corrupt_files_refused() {
    let (_tmp, ks) = new_store();
    let id = ks.create_key(None).unwrap().key_id;
    let path = ks.key_path(&id);
    let text = fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["version"] = 9.into();
    fs::write(&path, v.to_string()).unwrap();
    let reason = keystore_reason(ks.load_key(&id, true).err().unwrap());
    assert!(reason.contains("upgrade cryptvol"), "{reason}");

    fs::write(&path, b"{ not json").unwrap();
    let reason = keystore_reason(ks.load_key(&id, true).err().unwrap());
    assert!(reason.contains("not valid"), "{reason}");

    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["materials"][0]["material"] = "AAAA".into();
    fs::write(&path, v.to_string()).unwrap();
    let reason = keystore_reason(ks.load_key(&id, true).err().unwrap());
    assert!(reason.contains("32 bytes"), "{reason}");

    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["materials"] = serde_json::json!([]);
    fs::write(&path, v.to_string()).unwrap();
    let reason = keystore_reason(ks.load_key(&id, false).err().unwrap());
    assert!(reason.contains("materials"), "{reason}");
}

#[tokio::test]
async fn disabled_key_is_unusable() {
    let (_tmp, ks) = new_store();
    let id = ks.resolve(None).unwrap();
    let vol = uuid::Uuid::new_v4();
    let (_d, wrapped) = ks.generate_dek(None, &ctx(&vol)).await.unwrap();
    let path = ks.key_path(&id);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("\"Enabled\"", "\"Disabled\"")).unwrap();
    let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::KeyUnusable { .. }), "{err:?}");
    assert!(err.to_string().contains(&id), "{err}");
    let desc = ks.describe_key(None).await.unwrap();
    assert_eq!(desc.state, KeyState::Disabled);
}

#[test]
fn keystore_dir_from_environment() {
    let os = |s: &str| Some(OsString::from(s));
    assert_eq!(
        keystore_dir_for(os("/srv/ks"), true, os("/x"), os("/home/u")),
        PathBuf::from("/srv/ks")
    );
    assert_eq!(
        keystore_dir_for(None, true, os("/x"), os("/home/u")),
        PathBuf::from("/var/lib/cryptvol/keys")
    );
    assert_eq!(
        keystore_dir_for(os(""), false, os("/data"), os("/home/u")),
        PathBuf::from("/data/cryptvol/keys")
    );
    assert_eq!(
        keystore_dir_for(None, false, os("relative"), os("/home/u")),
        PathBuf::from("/home/u/.local/share/cryptvol/keys")
    );
    assert_eq!(
        keystore_dir_for(None, false, None, os("/home/u")),
        PathBuf::from("/home/u/.local/share/cryptvol/keys")
    );
}

#[test]
fn key_id_format() {
    assert!(is_key_id("mk-0123456789abcdef0123456789abcdef"));
    assert!(!is_key_id("mk-0123456789ABCDEF0123456789abcdef"));
    assert!(!is_key_id("mk-0123456789abcdef0123456789abcde"));
    assert!(!is_key_id("mk-../../../../../../../etc/passwd"));
    assert!(!is_key_id("0123456789abcdef0123456789abcdef"));
}

/// Issue 14 B6 (keystore side): a symlink planted in the keystore after it was opened
/// (at the lock file, a key record, the audit log) is never written through: the
/// operation fails and the file it points to is unchanged.
#[test]
fn keystore_writes_never_follow_a_planted_symlink() {
    let (tmp, ks) = new_store();
    let info = ks.create_key(Some("alias/planted")).unwrap();
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let plant = |at: &Path| {
        let _ = fs::remove_file(at);
        std::os::unix::fs::symlink(&victim, at).unwrap();
    };

    let lock = ks.dir().join(LOCK_FILE);
    plant(&lock);
    assert!(ks.rotate(&info.key_id).is_err());
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    fs::remove_file(&lock).unwrap();

    let record = ks.key_path(&info.key_id);
    let saved = fs::read(&record).unwrap();
    plant(&record);
    assert!(ks.rotate(&info.key_id).is_err());
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    fs::remove_file(&record).unwrap();
    fs::write(&record, saved).unwrap();
    fs::set_permissions(&record, Permissions::from_mode(0o600)).unwrap();

    let audit = ks.dir().join(crate::keys::audit::AUDIT_FILE);
    plant(&audit);
    let err = ks.rotate(&info.key_id).unwrap_err();
    assert!(err.to_string().contains("audit"), "{err}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    fs::remove_file(&audit).unwrap();

    // Unplanted, the same operation works.
    assert_eq!(ks.rotate(&info.key_id).unwrap(), 2);
}
