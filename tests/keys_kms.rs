//! The aws-kms backend end to end against a local `moto_server` (PyPI `moto[server]`,
//! installed by scripts/install-deps.sh), started here on loopback with throwaway
//! credentials. Also: key hygiene of a running daemon (locked key memory).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use cryptvol::keys::{
    AwsKmsBackend, EncryptionContext, KeyBackend, KeyError, KeyOp, KeyService, KeyState,
};

fn slot0(env: &Env, vol: &Path) -> (String, String) {
    let info = info_json(env, vol);
    (
        info["keyslots"][0]["backend"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        info["keyslots"][0]["key_id"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

fn serve_fails(env: &Env, vol: &Path) -> String {
    let out = run(Command::new("timeout")
        .arg("60")
        .arg(bin())
        .env("CRYPTVOL_KEYSTORE", env.keystore())
        .args(["serve", "--unix", s(&env.path("fail.sock"))])
        .arg(vol));
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "serve should fail ({})",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[tokio::test]
async fn aws_kms_volume_lifecycle() {
    let env = Env::new();
    let moto = Moto::start(&env.path("moto.log"), &[]);
    aws_env(&moto.endpoint(), env.dir.path());

    // A KMS key and an alias, made with the SDK against moto.
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let kms = aws_sdk_kms::Client::new(&conf);
    let key = kms.create_key().send().await.expect("CreateKey");
    let meta = key.key_metadata().expect("metadata");
    let arn = meta.arn().expect("arn").to_string();
    let key_id = meta.key_id().to_string();
    kms.create_alias()
        .alias_name("alias/cv-test")
        .target_key_id(&key_id)
        .send()
        .await
        .expect("CreateAlias");
    let key2 = kms.create_key().send().await.expect("CreateKey 2");
    let arn2 = key2
        .key_metadata()
        .and_then(|m| m.arn())
        .expect("arn 2")
        .to_string();

    // The backend describes keys through aliases.
    let backend = AwsKmsBackend::connect().await.expect("connect");
    let d = backend
        .describe_key(Some("alias/cv-test"))
        .await
        .expect("describe");
    assert_eq!(
        (d.key_id.as_str(), d.state),
        (arn.as_str(), KeyState::Enabled)
    );
    assert!(backend.describe_key(None).await.is_err());

    // Create with --kms-key-id ARN and with --key aws-kms:alias/NAME: the keyslot holds
    // the key ARN, never the alias.
    let vol = env.create("a.img", "16M", &["--kms-key-id", &arn]);
    assert_eq!(slot0(&env, &vol), ("aws-kms".into(), arn.clone()));
    let vol2 = env.create("b.img", "8M", &["--key", "aws-kms:alias/cv-test"]);
    assert_eq!(slot0(&env, &vol2), ("aws-kms".into(), arn.clone()));

    // Serve and read back through a real NBD client.
    let srv = env.serve(&[s(&vol), s(&vol2)], &[], false);
    qemu_io(&srv.uri("a"), &["write -P 0x5a 0 2M", "read -P 0x5a 0 2M"]);
    qemu_io(
        &srv.uri("b"),
        &["write -P 0x33 1M 1M", "read -P 0x33 1M 1M"],
    );
    srv.stop();

    // The keyslot is bound to its volume: another volume's context is refused by us
    // (stored context differs) and by KMS (stored context edited to match).
    let (header, _) = cryptvol::volume::read_header(&vol).expect("header");
    let svc = KeyService::new(&env.keystore(), None);
    let other = EncryptionContext::for_volume(&uuid::Uuid::new_v4());
    let err = svc
        .unwrap(&header.keyslots[0], &other, KeyOp::Unwrap, None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeyError::ContextMismatch { .. }), "{err:?}");
    let mut forged = header.keyslots[0].clone();
    forged.context = other.clone();
    let err = svc
        .unwrap(&forged, &other, KeyOp::Unwrap, None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeyError::WrongKey { .. }), "{err:?}");
    let right = EncryptionContext::for_volume(&header.uuid);
    let dek = svc
        .unwrap(&header.keyslots[0], &right, KeyOp::Unwrap, None)
        .await
        .expect("unwrap");
    assert!(!contains(&read(&vol), dek.expose()));
    drop(dek);

    // A key that does not exist in KMS.
    let mut missing = header.keyslots[0].clone();
    missing.key_id =
        "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000".into();
    let err = svc
        .unwrap(&missing, &right, KeyOp::Unwrap, None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");

    // Rekey KMS -> local -> KMS (via the alias) -> another KMS key (ReEncrypt); data intact.
    run_ok(env.cmd().args(["key", "create", "--alias", "alias/l"]));
    run_ok(env.cmd().args(["rekey", s(&vol), "--to-key", "alias/l"]));
    assert_eq!(slot0(&env, &vol).0, "local");
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("a"), &["read -P 0x5a 0 2M"]);
    srv.stop();
    run_ok(
        env.cmd()
            .args(["rekey", s(&vol), "--to-key", "aws-kms:alias/cv-test"]),
    );
    assert_eq!(slot0(&env, &vol), ("aws-kms".into(), arn.clone()));
    run_ok(env.cmd().args(["rekey", s(&vol), "--to-key", &arn2]));
    assert_eq!(slot0(&env, &vol), ("aws-kms".into(), arn2.clone()));
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("a"), &["read -P 0x5a 0 2M"]);
    srv.stop();

    // Disabled in KMS: attach refused, naming the volume and the key; enabled again: works.
    kms.disable_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("DisableKey");
    let d = backend.describe_key(Some(&arn)).await.expect("describe");
    assert_eq!(d.state, KeyState::Disabled);
    let err = serve_fails(&env, &vol2);
    assert!(
        err.contains(s(&vol2)) && err.contains(&arn) && err.contains("disabled"),
        "{err}"
    );
    let err = fails(
        env.cmd()
            .args(["create", "--size", "4M", "--kms-key-id", &arn])
            .arg(env.path("c.img")),
    );
    assert!(err.contains("disabled"), "{err}");
    kms.enable_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("EnableKey");
    let srv = env.serve(&[s(&vol2)], &[], false);
    qemu_io(&srv.uri("b"), &["read -P 0x33 1M 1M"]);
    srv.stop();

    // Pending deletion: refused as well.
    kms.schedule_key_deletion()
        .key_id(&key_id)
        .pending_window_in_days(7)
        .send()
        .await
        .expect("ScheduleKeyDeletion");
    let err = serve_fails(&env, &vol2);
    assert!(
        err.contains(&arn) && err.contains("pending deletion"),
        "{err}"
    );

    // Every aws-kms operation is audited with the volume UUID, without key material.
    let log = std::fs::read_to_string(env.keystore().join("audit.jsonl")).expect("audit log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|v: &serde_json::Value| v["backend"] == "aws-kms")
        .collect();
    let ops: Vec<&str> = lines
        .iter()
        .map(|v| v["operation"].as_str().unwrap_or(""))
        .collect();
    for op in ["generate", "unwrap", "rewrap-to"] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    assert!(lines
        .iter()
        .any(|v| v["result"] != "ok" && v["error"] == "KeyUnusable"));
    assert!(lines
        .iter()
        .all(|v| v["volume_uuid"].as_str().is_some_and(|u| !u.is_empty())));
    drop(moto);
}

fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// The daemon holds its data keys and cipher key schedules in locked memory.
#[test]
fn serve_locks_key_memory() {
    let env = Env::new();
    let vol = env.create("h.img", "4M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.pid())).expect("status");
    let vmlck: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck line");
    // One page for the engine's key schedules at least (the DEK itself is dropped once
    // the engine exists). Fails when RLIMIT_MEMLOCK is 0; the warning says how to fix.
    assert!(
        vmlck >= 4,
        "VmLck {vmlck} kB: key memory is not locked:\n{}",
        srv.log_text()
    );
    srv.stop();
}
