//! Master key states, deletion, rotation, the default key, key references and the audit
//! log, end to end through the CLI and a real NBD client (qemu-io).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn key_create(env: &Env, alias: &str) -> String {
    let out = run_ok(
        env.cmd()
            .args(["key", "create", "--json", "--alias", alias]),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["key_id"].as_str().expect("key id").to_string()
}

fn slot_key(env: &Env, vol: &Path, slot: usize) -> String {
    info_json(env, vol)["keyslots"][slot]["key_id"]
        .as_str()
        .expect("key id")
        .to_string()
}

/// Audit records of a log file.
fn audit(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l}: {e}")))
        .collect()
}

fn uuid_of(env: &Env, vol: &Path) -> String {
    info_json(env, vol)["uuid"]
        .as_str()
        .expect("uuid")
        .to_string()
}

#[test]
fn attached_volume_survives_disable_and_reattach_follows_the_key_state() {
    let env = Env::new();
    let id = key_create(&env, "alias/vol");
    let vol = env.create("v.img", "16M", &["--key", "alias/vol"]);
    assert_eq!(
        slot_key(&env, &vol, 0),
        id,
        "the keyslot stores the resolved id"
    );
    let uuid = uuid_of(&env, &vol);

    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("v"), &["write -P 0x5a 0 1M"]);
    run_ok(env.cmd().args(["key", "disable", "alias/vol"]));
    // Already attached: the data key was unwrapped at start; I/O goes on.
    qemu_io(&srv.uri("v"), &["read -P 0x5a 0 1M", "write -P 0x6b 1M 1M"]);
    srv.stop();

    // Re-attaching fails, naming the volume and the key.
    let err = serve_fails(&env, &vol);
    assert!(
        err.contains(s(&vol))
            && err.contains(&uuid)
            && err.contains(&id)
            && err.contains("disabled"),
        "{err}"
    );
    run_ok(env.cmd().args(["key", "enable", &id]));
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("v"), &["read -P 0x5a 0 1M", "read -P 0x6b 1M 1M"]);
    srv.stop();

    // Pending deletion: refused; cancel leaves it disabled: still refused; enable: fine.
    let out = run_ok(
        env.cmd()
            .args(["key", "schedule-deletion", &id, "--days", "7"]),
    );
    assert!(out.contains("pending deletion"), "{out}");
    let err = serve_fails(&env, &vol);
    assert!(
        err.contains(&id) && err.contains("pending deletion"),
        "{err}"
    );
    run_ok(env.cmd().args(["key", "cancel-deletion", &id]));
    let err = serve_fails(&env, &vol);
    assert!(err.contains("disabled"), "{err}");
    let list = run_ok(env.cmd().args(["key", "list"]));
    assert!(list.contains("Disabled"), "{list}");
    run_ok(env.cmd().args(["key", "enable", &id]));
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("v"), &["read -P 0x5a 0 1M"]);
    srv.stop();

    // Refusals of the state machine, with clear messages.
    run_ok(env.cmd().args(["key", "schedule-deletion", &id]));
    let err = fails(env.cmd().args(["key", "enable", &id]));
    assert!(err.contains("cancel-deletion"), "{err}");
    let err = fails(
        env.cmd()
            .args(["key", "schedule-deletion", &id, "--days", "3"]),
    );
    assert!(err.contains("7 to 30"), "{err}");
    let d = run_ok(env.cmd().args(["key", "describe", &id, "--json"]));
    let d: serde_json::Value = serde_json::from_str(&d).expect("json");
    assert_eq!(d["state"], "PendingDeletion");
    assert!(d["deletion_date"].as_str().is_some(), "{d}");

    // Every step was audited with the volume UUID where a volume was involved.
    let log = audit(&env.keystore().join("audit.jsonl"));
    let unwraps: Vec<&serde_json::Value> = log
        .iter()
        .filter(|r| r["operation"] == "unwrap" && r["volume_uuid"] == uuid.as_str())
        .collect();
    let results: Vec<&str> = unwraps
        .iter()
        .map(|r| r["error"].as_str().unwrap_or("ok"))
        .collect();
    assert_eq!(
        results,
        [
            "ok",
            "KeyUnusable",
            "ok",
            "KeyUnusable",
            "KeyUnusable",
            "ok"
        ],
        "{unwraps:?}"
    );
    let admin: Vec<&str> = log
        .iter()
        .filter(|r| r["volume_uuid"].is_null())
        .map(|r| r["operation"].as_str().unwrap_or(""))
        .collect();
    for op in [
        "create-key",
        "disable",
        "enable",
        "schedule-deletion",
        "cancel-deletion",
    ] {
        assert!(admin.contains(&op), "{op} not audited: {admin:?}");
    }
    let text = std::fs::read_to_string(env.keystore().join("audit.jsonl")).expect("log");
    assert!(
        !text.contains("material\""),
        "audit log mentions key material"
    );
}

/// Moves a key's deletion date into the past (the waiting period is days long).
fn expire(env: &Env, id: &str) {
    let path = env.keystore().join(format!("{id}.json"));
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("key file")).expect("json");
    v["deletion_unix"] = 1.into();
    std::fs::write(&path, v.to_string()).expect("write");
}

#[test]
fn due_deletions_happen_at_serve_start_and_by_purge() {
    let env = Env::new();
    let doomed = key_create(&env, "alias/doomed");
    let other = key_create(&env, "alias/other");
    let vol_doomed = env.create("d.img", "8M", &["--key", "alias/doomed"]);
    let vol_other = env.create("o.img", "8M", &["--key", &other]);
    run_ok(
        env.cmd()
            .args(["key", "schedule-deletion", &doomed, "--days", "7"]),
    );
    // Not yet due: purge keeps it.
    let out = run_ok(env.cmd().args(["key", "purge"]));
    assert!(out.contains("no key is due"), "{out}");
    assert!(env.keystore().join(format!("{doomed}.json")).exists());
    expire(&env, &doomed);
    // Starting the daemon destroys it.
    let srv = env.serve(&[s(&vol_other)], &[], false);
    qemu_io(&srv.uri("o"), &["write -P 0x11 0 64k"]);
    let log = srv.stop();
    assert!(
        log.contains("destroyed master key") && log.contains(&doomed),
        "{log}"
    );
    assert!(!env.keystore().join(format!("{doomed}.json")).exists());
    let list = run_ok(env.cmd().args(["key", "list", "--json"]));
    assert!(
        !list.contains(&doomed) && !list.contains("alias/doomed"),
        "{list}"
    );
    // Its volume is now unreadable, with a message naming it and the key.
    let err = serve_fails(&env, &vol_doomed);
    assert!(
        err.contains(s(&vol_doomed)) && err.contains(&doomed) && err.contains("not found"),
        "{err}"
    );
    let records = audit(&env.keystore().join("audit.jsonl"));
    assert!(
        records.iter().any(|r| r["operation"] == "delete"
            && r["key_id"] == doomed.as_str()
            && r["result"] == "ok"),
        "{records:?}"
    );

    // Explicit purge.
    run_ok(
        env.cmd()
            .args(["key", "schedule-deletion", &other, "--days", "30"]),
    );
    expire(&env, &other);
    let out = run_ok(env.cmd().args(["key", "purge"]));
    assert!(out.contains(&format!("destroyed key {other}")), "{out}");
}

#[test]
fn rotation_keeps_existing_volumes_readable() {
    let env = Env::new();
    let id = key_create(&env, "alias/rot");
    let v1 = env.create("r1.img", "8M", &["--key", "alias/rot"]);
    let srv = env.serve(&[s(&v1)], &[], false);
    qemu_io(&srv.uri("r1"), &["write -P 0x21 0 64k"]);
    srv.stop();
    let out = run_ok(env.cmd().args(["key", "rotate", "alias/rot"]));
    assert!(out.contains("version 2"), "{out}");
    let v2 = env.create("r2.img", "8M", &["--key", &id]);
    assert_eq!(slot_key(&env, &v2, 0), id, "rotation keeps the key id");
    let srv = env.serve(&[s(&v1), s(&v2)], &[], false);
    qemu_io(&srv.uri("r1"), &["read -P 0x21 0 64k"]);
    qemu_io(
        &srv.uri("r2"),
        &["write -P 0x22 0 64k", "read -P 0x22 0 64k"],
    );
    srv.stop();
    let d: serde_json::Value =
        serde_json::from_str(&run_ok(env.cmd().args(["key", "describe", &id, "--json"])))
            .expect("json");
    assert_eq!(d["current_material_version"], 2);
    // The unwrap records say which material version each volume used.
    let records = audit(&env.keystore().join("audit.jsonl"));
    let versions: Vec<&str> = records
        .iter()
        .filter(|r| r["operation"] == "unwrap")
        .filter_map(|r| r["detail"].as_str())
        .collect();
    assert!(versions.contains(&"material_version=1"), "{versions:?}");
    assert!(versions.contains(&"material_version=2"), "{versions:?}");
}

#[test]
fn the_configured_default_key() {
    let env = Env::new();
    let local_default = {
        let v = env.create("a.img", "4M", &[]);
        slot_key(&env, &v, 0)
    };
    let id = key_create(&env, "alias/fleet");
    run_ok(env.cmd().args(["key", "set-default", "alias/fleet"]));
    let out = run_ok(env.cmd().args(["key", "get-default"]));
    assert_eq!(out.trim(), "alias/fleet");
    let v = env.create("b.img", "4M", &[]);
    assert_eq!(slot_key(&env, &v, 0), id);
    // An explicit --key still wins.
    let v = env.create("c.img", "4M", &["--kms-key-id", &local_default]);
    assert_eq!(slot_key(&env, &v, 0), local_default);
    // An AWS KMS default is accepted without contacting AWS (checked at the next create).
    run_ok(env.cmd().args(["key", "set-default", "aws-kms:alias/ebs"]));
    let out = run_ok(env.cmd().args(["key", "get-default"]));
    assert_eq!(out.trim(), "aws-kms:alias/ebs");
    // Not settable to an unusable backend.
    let err = fails(env.cmd().args(["key", "set-default", "exec:nope"]));
    assert!(err.contains("nope") && err.contains("exec add"), "{err}");
    let err = fails(env.cmd().args(["key", "set-default", "alias/none"]));
    assert!(err.contains("alias/none"), "{err}");
    run_ok(env.cmd().args(["key", "set-default", "--reset"]));
    let v = env.create("d.img", "4M", &[]);
    assert_eq!(slot_key(&env, &v, 0), local_default);
    let log = audit(&env.keystore().join("audit.jsonl"));
    assert_eq!(
        log.iter()
            .filter(|r| r["operation"] == "set-default")
            .count(),
        5
    );
}

/// A command that sees no AWS configuration at all (and no instance metadata service).
fn no_aws(cmd: &mut Command) -> &mut Command {
    for v in [
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KMS",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

#[test]
fn key_references_of_other_backends() {
    let env = Env::new();
    let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    for key in [
        arn,
        "aws-kms:alias/ebs",
        "aws-kms:1234abcd-12ab-34cd-56ef-1234567890ab",
    ] {
        // No region configured anywhere: a clear refusal, no volume.
        let target = env.path("aws.img");
        let err = fails(
            no_aws(&mut env.cmd())
                .args(["create", "--size", "4M", "--kms-key-id", key])
                .arg(&target),
        );
        assert!(err.contains("no AWS region is configured"), "{key}: {err}");
        assert!(!target.exists(), "a volume was created for {key}");
        // KMS unreachable: a transient failure naming the key, no volume.
        let err = fails(
            no_aws(&mut env.cmd())
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
                .args(["create", "--size", "4M", "--kms-key-id", key])
                .arg(&target),
        );
        let shown = key.strip_prefix("aws-kms:").unwrap_or(key);
        assert!(
            err.contains("transient") && err.contains(shown) && err.contains("AWS_ENDPOINT_URL"),
            "{key}: {err}"
        );
        assert!(!target.exists(), "a volume was created for {key}");
    }
    let err = fails(
        env.cmd()
            .args([
                "create",
                "--size",
                "4M",
                "--key",
                "1234abcd-12ab-34cd-56ef-1234567890ab",
            ])
            .arg(env.path("x.img")),
    );
    assert!(err.contains("aws-kms:ID"), "{err}");
    let err = fails(
        env.cmd()
            .args(["create", "--size", "4M", "--key", "exec:vault:k1"])
            .arg(env.path("x.img")),
    );
    assert!(
        err.contains("vault") && err.contains("cryptvol key exec add"),
        "{err}"
    );
    let err = fails(
        env.cmd()
            .args(["create", "--size", "4M", "--key", "mk-0000"])
            .arg(env.path("x.img")),
    );
    assert!(
        err.contains("mk-0000") && err.contains("not found"),
        "{err}"
    );
    let err = fails(env.cmd().args(["key", "disable", arn]));
    assert!(err.contains("manages local keys"), "{err}");
}

#[test]
fn audit_log_can_be_moved_and_fails_closed() {
    let env = Env::new();
    let log = env.path("elsewhere/audit.jsonl");
    std::fs::create_dir(env.path("elsewhere")).expect("mkdir");
    let out = run_ok(
        env.cmd()
            .args(["key", "create", "--json", "--audit-log", s(&log)]),
    );
    let id: serde_json::Value = serde_json::from_str(&out).expect("json");
    let id = id["key_id"].as_str().expect("id").to_string();
    let vol = env.path("m.img");
    run_ok(
        env.cmd()
            .args([
                "create",
                "--size",
                "4M",
                "--key",
                &id,
                "--audit-log",
                s(&log),
            ])
            .arg(&vol),
    );
    assert!(
        !env.keystore().join("audit.jsonl").exists(),
        "default log written too"
    );
    let srv = env.serve(&[s(&vol)], &["--audit-log", s(&log)], false);
    srv.stop();
    // A log that cannot be written stops key operations (fail closed).
    let err = fails(env.cmd().args([
        "key",
        "rotate",
        &id,
        "--audit-log",
        "/nonexistent/dir/audit.jsonl",
    ]));
    assert!(
        err.contains("audit log") && err.contains("--audit-log"),
        "{err}"
    );
    let records = audit(&log);
    let ops: Vec<&str> = records
        .iter()
        .map(|r| r["operation"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ops, ["create-key", "generate", "unwrap"], "{records:?}");
    let uid = nix_uid();
    for r in &records {
        for field in [
            "time",
            "principal",
            "operation",
            "backend",
            "key_id",
            "result",
        ] {
            assert!(r.get(field).is_some(), "{field} missing in {r}");
        }
        assert_eq!(r["uid"], uid);
        assert_eq!(r["key_id"], id.as_str());
    }
    assert_eq!(records[2]["volume_uuid"], uuid_of(&env, &vol).as_str());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).expect("log").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

fn nix_uid() -> u32 {
    let out = run_ok(Command::new("id").arg("-u"));
    out.trim().parse().expect("uid")
}
