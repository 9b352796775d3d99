//! Key states, rotation, deletion, aliases, policies and their audit records.

use super::*;

/// The audit records of a keystore, as (operation, result, error kind) triples.
fn audit(ks: &LocalKeystore) -> Vec<serde_json::Value> {
    fs::read_to_string(ks.dir().join(AUDIT_FILE))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ops(ks: &LocalKeystore) -> Vec<String> {
    audit(ks)
        .iter()
        .map(|v| {
            let mut s = format!(
                "{} {}",
                v["operation"].as_str().unwrap(),
                v["result"].as_str().unwrap()
            );
            if let Some(e) = v["error"].as_str() {
                s.push(' ');
                s.push_str(e);
            }
            s
        })
        .collect()
}

fn state(ks: &LocalKeystore, id: &str) -> KeyState {
    ks.describe(id).unwrap().state
}

/// Moves a pending deletion into the past, as if the waiting period had passed.
fn expire(ks: &LocalKeystore, id: &str) {
    let path = ks.key_path(id);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    v["deletion_unix"] = (now_unix() - 1).into();
    fs::write(&path, v.to_string()).unwrap();
}

#[tokio::test]
async fn every_state_transition_and_refusal() {
    let (_tmp, ks) = new_store();
    let id = ks.create_key(Some("alias/s")).unwrap().key_id;
    let vol = uuid::Uuid::new_v4();
    let (_dek, wrapped) = ks.generate_dek(Some(&id), &ctx(&vol)).await.unwrap();

    // Enabled -> Disabled: wrap and unwrap refused, naming the key and the remedy.
    ks.disable("alias/s").unwrap();
    assert_eq!(state(&ks, &id), KeyState::Disabled);
    let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::KeyUnusable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&id) && msg.contains("disabled") && msg.contains("cryptvol key enable"),
        "{msg}"
    );
    let err = ks.generate_dek(Some(&id), &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::KeyUnusable { .. }), "{err:?}");
    // Disabling twice is fine (as KMS).
    ks.disable(&id).unwrap();

    // Disabled -> Enabled.
    ks.enable(&id).unwrap();
    assert!(ks.unwrap(&wrapped, &ctx(&vol)).await.is_ok());
    ks.enable(&id).unwrap();

    // Waiting period bounds.
    for days in [0, 6, 31] {
        let err = ks.schedule_deletion(&id, days).err().unwrap();
        assert!(err.to_string().contains("7 to 30"), "{err}");
    }
    // Enabled -> PendingDeletion.
    let date = ks.schedule_deletion(&id, 7).unwrap();
    let d = ks.describe(&id).unwrap();
    assert_eq!(d.state, KeyState::PendingDeletion);
    assert_eq!(d.deletion_date.as_deref(), Some(date.as_str()));
    let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("pending deletion") && msg.contains(&date) && msg.contains("cancel-deletion"),
        "{msg}"
    );
    // Refusals while pending.
    for e in [
        ks.enable(&id).err().unwrap(),
        ks.disable(&id).err().unwrap(),
        ks.schedule_deletion(&id, 30).err().unwrap(),
    ] {
        assert!(matches!(e, KeyError::InvalidState { .. }), "{e:?}");
    }
    assert!(matches!(
        ks.rotate(&id).err().unwrap(),
        KeyError::KeyUnusable { .. }
    ));
    // Purge before the date keeps it.
    assert!(ks.purge_expired().unwrap().is_empty());
    // PendingDeletion -> Disabled (not Enabled).
    ks.cancel_deletion(&id).unwrap();
    assert_eq!(state(&ks, &id), KeyState::Disabled);
    assert!(ks.describe(&id).unwrap().deletion_date.is_none());
    assert!(matches!(
        ks.cancel_deletion(&id).err().unwrap(),
        KeyError::InvalidState { .. }
    ));
    // Disabled -> PendingDeletion is allowed too; then the deletion happens.
    ks.schedule_deletion(&id, 30).unwrap();
    expire(&ks, &id);
    assert_eq!(ks.purge_expired().unwrap(), vec![id.clone()]);
    assert!(!ks.key_path(&id).exists());
    assert!(ks.list_keys().unwrap().is_empty());
    let err = ks.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(&id));
    // Its alias went with it.
    assert!(matches!(
        ks.resolve(Some("alias/s")),
        Err(KeyError::NotFound { .. })
    ));

    assert_eq!(
        ops(&ks),
        vec![
            "create-key ok",
            "generate ok",
            "disable ok",
            "unwrap error KeyUnusable",
            "generate error KeyUnusable",
            "disable ok",
            "enable ok",
            "unwrap ok",
            "enable ok",
            "schedule-deletion error Unsupported",
            "schedule-deletion error Unsupported",
            "schedule-deletion error Unsupported",
            "schedule-deletion ok",
            "unwrap error KeyUnusable",
            "enable error InvalidState",
            "disable error InvalidState",
            "schedule-deletion error InvalidState",
            "rotate error KeyUnusable",
            "cancel-deletion ok",
            "cancel-deletion error InvalidState",
            "schedule-deletion ok",
            "delete ok",
            "unwrap error NotFound",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    );
    // Every record names the key; the volume's records carry its UUID; no material.
    let records = audit(&ks);
    for r in &records[1..records.len() - 1] {
        assert_eq!(r["key_id"], id.as_str(), "{r}");
    }
    assert_eq!(records[1]["volume_uuid"], vol.to_string());
    assert!(records[2]["volume_uuid"].is_null());
    assert!(records[12]["detail"].as_str().unwrap().contains("days=7"));
    let text = fs::read_to_string(ks.dir().join(AUDIT_FILE)).unwrap();
    assert!(!text.contains("material\""), "{text}");
}

#[test]
fn schedule_deletion_with_bad_days_changes_nothing() {
    let (_tmp, ks) = new_store();
    let id = ks.create_key(None).unwrap().key_id;
    assert!(ks.schedule_deletion(&id, 31).is_err());
    assert_eq!(state(&ks, &id), KeyState::Enabled);
}

#[tokio::test]
async fn rotation_keeps_old_material_and_wraps_with_the_newest() {
    let (_tmp, ks) = new_store();
    let id = ks.create_key(None).unwrap().key_id;
    let vol = uuid::Uuid::new_v4();
    let (dek1, w1) = ks.generate_dek(Some(&id), &ctx(&vol)).await.unwrap();
    assert_eq!(
        w1.params.get("material_version").map(String::as_str),
        Some("1")
    );
    assert_eq!(ks.rotate(&id).unwrap(), 2);
    assert_eq!(ks.rotate(&id).unwrap(), 3);
    let d = ks.describe(&id).unwrap();
    assert_eq!(d.current_material_version, 3);
    assert_eq!(d.material_versions.len(), 3);
    let (dek3, w3) = ks.generate_dek(Some(&id), &ctx(&vol)).await.unwrap();
    assert_eq!(w3.key_id, id, "the key id does not change");
    assert_eq!(
        w3.params.get("material_version").map(String::as_str),
        Some("3")
    );
    assert_eq!(
        ks.unwrap(&w1, &ctx(&vol)).await.unwrap().expose(),
        dek1.expose()
    );
    assert_eq!(
        ks.unwrap(&w3, &ctx(&vol)).await.unwrap().expose(),
        dek3.expose()
    );
    // A keyslot pointing at the wrong version does not authenticate.
    let mut moved = w1.clone();
    moved.params.insert("material_version".into(), "2".into());
    assert!(matches!(
        ks.unwrap(&moved, &ctx(&vol)).await,
        Err(KeyError::WrongKey { .. })
    ));
    // An unknown version is reported, not a panic.
    moved.params.insert("material_version".into(), "9".into());
    let err = ks.unwrap(&moved, &ctx(&vol)).await.err().unwrap();
    assert!(err.to_string().contains("material version 9"), "{err}");
    moved.params.insert("material_version".into(), "x".into());
    assert!(matches!(
        ks.unwrap(&moved, &ctx(&vol)).await,
        Err(KeyError::Malformed(_))
    ));
    // The rotated key file holds all three materials, distinct.
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(ks.key_path(&id)).unwrap()).unwrap();
    let m: Vec<&str> = v["materials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["material"].as_str().unwrap())
        .collect();
    assert_eq!(m.len(), 3);
    assert!(m[0] != m[1] && m[1] != m[2] && m[0] != m[2]);
}

#[tokio::test]
async fn version_1_key_files_still_work() {
    let (_tmp, ks) = new_store();
    let id = "mk-00112233445566778899aabbccddeeff";
    let material = STANDARD.encode([7u8; 32]);
    let v1 = format!(
        r#"{{"version":1,"key_id":"{id}","spec":"AES_256","state":"Enabled","created_at":"2025-01-01T00:00:00Z","material":"{material}"}}"#
    );
    let path = ks.key_path(id);
    fs::write(&path, v1).unwrap();
    fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
    let vol = uuid::Uuid::new_v4();
    let (dek, mut w) = ks.generate_dek(Some(id), &ctx(&vol)).await.unwrap();
    // A keyslot written before material versions existed has no parameter: version 1.
    w.params.remove("material_version");
    assert_eq!(
        ks.unwrap(&w, &ctx(&vol)).await.unwrap().expose(),
        dek.expose()
    );
    // The file owner (us) administers it; the first change upgrades the file.
    ks.rotate(id).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(v["materials"][0]["material"], material.as_str());
    assert_eq!(
        ks.unwrap(&w, &ctx(&vol)).await.unwrap().expose(),
        dek.expose()
    );
}

#[tokio::test]
async fn purge_destroys_only_due_keys_and_clears_defaults() {
    let (_tmp, ks) = new_store();
    let default = ks.resolve(None).unwrap();
    let other = ks.create_key(Some("alias/keep")).unwrap().key_id;
    let later = ks.create_key(None).unwrap().key_id;
    ks.set_default_key_ref(Some(&KeyRef::Local(Some(default.clone()))))
        .unwrap();
    ks.schedule_deletion(&default, 7).unwrap();
    ks.schedule_deletion(&later, 30).unwrap();
    expire(&ks, &default);
    // A leftover temporary file from an interrupted write is removed too.
    let tmp_file = ks.dir().join(".tmp-mk-x.json-0011");
    fs::write(&tmp_file, b"secret").unwrap();
    assert_eq!(ks.purge_expired().unwrap(), vec![default.clone()]);
    assert!(!tmp_file.exists());
    let ids: Vec<String> = ks
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&other) && ids.contains(&later));
    assert_eq!(ks.default_key_ref().unwrap(), None);
    // The local default key is created afresh on next use.
    let new_default = ks.resolve(None).unwrap();
    assert_ne!(new_default, default);
    assert_eq!(ks.resolve(Some("alias/keep")).unwrap(), other);
}

#[tokio::test]
async fn aliases_add_retarget_remove() {
    let (_tmp, ks) = new_store();
    let a = ks.create_key(None).unwrap().key_id;
    let b = ks.create_key(None).unwrap().key_id;
    assert_eq!(ks.alias_add("alias/app", &a).unwrap(), a);
    let err = ks.alias_add("alias/app", &b).err().unwrap();
    assert!(err.to_string().contains("retarget"), "{err}");
    assert!(ks.alias_add("alias/cryptvol/x", &a).is_err());
    assert!(ks.alias_add("alias/new", "alias/none").is_err());
    let vol = uuid::Uuid::new_v4();
    let (dek, w) = ks
        .generate_dek(Some("alias/app"), &ctx(&vol))
        .await
        .unwrap();
    assert_eq!(w.key_id, a, "the keyslot stores the resolved id");
    // Retargeting changes new wraps only; the old keyslot still names key a.
    ks.alias_retarget("alias/app", &b).unwrap();
    let (_d, w2) = ks
        .generate_dek(Some("alias/app"), &ctx(&vol))
        .await
        .unwrap();
    assert_eq!(w2.key_id, b);
    assert_eq!(
        ks.unwrap(&w, &ctx(&vol)).await.unwrap().expose(),
        dek.expose()
    );
    assert!(ks.alias_retarget("alias/none", &a).is_err());
    assert_eq!(ks.alias_remove("alias/app").unwrap(), b);
    assert!(matches!(
        ks.resolve(Some("alias/app")),
        Err(KeyError::NotFound { .. })
    ));
    assert!(ks.alias_remove("alias/app").is_err());
    let log = ops(&ks);
    assert!(log.contains(&"alias-add ok".to_string()));
    assert!(log.contains(&"alias-retarget ok".to_string()));
    assert!(log.contains(&"alias-remove ok".to_string()));
    assert!(log.contains(&"alias-remove error NotFound".to_string()));
}

#[tokio::test]
async fn policy_denies_and_grants() {
    let (_tmp, owner) = new_store();
    let id = owner.create_key(Some("alias/p")).unwrap().key_id;
    let vol = uuid::Uuid::new_v4();
    let (dek, w) = owner.generate_dek(Some(&id), &ctx(&vol)).await.unwrap();
    let bob = Principal::from_uid(4_000_000_001);
    let as_bob = LocalKeystore::open(owner.dir(), false)
        .unwrap()
        .with_principal(bob.clone());

    let err = as_bob.unwrap(&w, &ctx(&vol)).await.err().unwrap();
    match &err {
        KeyError::AccessDenied {
            key,
            operation,
            principal,
        } => {
            assert_eq!(key, &id);
            assert_eq!(operation, "unwrap");
            assert_eq!(principal, "uid 4000000001");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        as_bob.generate_dek(Some(&id), &ctx(&vol)).await,
        Err(KeyError::AccessDenied { .. })
    ));
    let err = as_bob.disable(&id).err().unwrap();
    assert!(err.to_string().contains("administer (disable)"), "{err}");
    assert!(as_bob.grant(&id, &bob, &[Permission::Unwrap]).is_err());
    assert!(as_bob.alias_remove("alias/p").is_err());
    assert_eq!(state(&owner, &id), KeyState::Enabled);

    owner.grant(&id, &bob, &[Permission::Unwrap]).unwrap();
    assert_eq!(
        as_bob.unwrap(&w, &ctx(&vol)).await.unwrap().expose(),
        dek.expose()
    );
    // Unwrap does not imply generate, rewrap or administer.
    assert!(as_bob.generate_dek(Some(&id), &ctx(&vol)).await.is_err());
    assert!(matches!(
        as_bob.unwrap_as(&w, &ctx(&vol), KeyOp::RewrapFrom).await,
        Err(KeyError::AccessDenied { .. })
    ));
    assert!(as_bob.rotate(&id).is_err());
    let d = owner.describe(&id).unwrap();
    assert!(
        d.policy["unwrap"].contains(&"uid:4000000001".to_string()),
        "{:?}",
        d.policy
    );
    assert!(!d.policy["generate"].contains(&"uid:4000000001".to_string()));

    owner.revoke(&id, &bob, &[Permission::Unwrap]).unwrap();
    assert!(as_bob.unwrap(&w, &ctx(&vol)).await.is_err());
    // Root is always allowed.
    let as_root = LocalKeystore::open(owner.dir(), false)
        .unwrap()
        .with_principal(Principal::from_uid(0));
    owner
        .revoke(&id, &Principal::from_uid(0), &Permission::ALL)
        .unwrap();
    assert!(as_root.unwrap(&w, &ctx(&vol)).await.is_ok());

    let denials: Vec<serde_json::Value> = audit(&owner)
        .into_iter()
        .filter(|r| r["error"] == "AccessDenied")
        .collect();
    assert_eq!(denials.len(), 9, "{denials:?}");
    assert!(denials.iter().all(|r| r["uid"] == 4_000_000_001u32));
    assert_eq!(denials[0]["operation"], "unwrap");
    assert_eq!(denials[0]["volume_uuid"], vol.to_string());
    let grants: Vec<serde_json::Value> = audit(&owner)
        .into_iter()
        .filter(|r| r["operation"] == "grant" && r["result"] == "ok")
        .collect();
    assert!(grants[0]["detail"]
        .as_str()
        .unwrap()
        .contains("uid=4000000001 operations=unwrap"));
}

#[test]
fn group_shared_keystore_modes() {
    let (_tmp, ks) = new_store();
    ks.create_key(None).unwrap();
    fs::set_permissions(ks.dir(), Permissions::from_mode(0o2750)).unwrap();
    let ks = LocalKeystore::open(ks.dir(), false).unwrap();
    let id = ks.create_key(None).unwrap().key_id;
    assert_eq!(mode(&ks.key_path(&id)), 0o640);
    for bad in [0o770, 0o755, 0o705] {
        fs::set_permissions(ks.dir(), Permissions::from_mode(bad)).unwrap();
        let reason = keystore_reason(LocalKeystore::open(ks.dir(), false).err().unwrap());
        assert!(reason.contains("chmod 700"), "{reason}");
    }
    fs::set_permissions(ks.dir(), Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(ks.key_path(&id), Permissions::from_mode(0o660)).unwrap();
    let reason = keystore_reason(LocalKeystore::open(ks.dir(), false).err().unwrap());
    assert!(reason.contains("chmod 600"), "{reason}");
    // The audit log holds no secret: a group-writable one is accepted.
    fs::set_permissions(ks.key_path(&id), Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(ks.dir().join(AUDIT_FILE), Permissions::from_mode(0o660)).unwrap();
    assert!(LocalKeystore::open(ks.dir(), false).is_ok());
}

#[test]
fn unwritable_audit_log_refuses_operations() {
    let (tmp, ks) = new_store();
    let ks = ks.with_audit_log(AuditLog::at(&tmp.path().join("missing-dir/audit.jsonl")));
    let err = ks.create_key(None).err().unwrap();
    assert!(matches!(err, KeyError::Audit { .. }), "{err:?}");
    assert!(ks.list_keys().unwrap().is_empty(), "nothing was created");
}
