//! The configuration file beyond `serve`: every command takes the keystore, audit log,
//! default key and snapshot store from it, flags and environment variables override it,
//! unknown keys are refused by name; and the bare key reference setting, with AWS KMS
//! played by a local `moto_server`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// `cryptvol` with no keystore or store from the environment (the file decides).
fn bare_cmd() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("CRYPTVOL_KEYSTORE")
        .env_remove("CRYPTVOL_SNAPSHOT_STORE")
        .env_remove("CRYPTVOL_CONFIG")
        .env_remove("CRYPTVOL_BARE_KEY_REFS")
        .env("RUST_LOG", "info");
    c
}

fn json_of(cmd: &mut Command) -> Value {
    let out = run_ok(cmd);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// Writes `text` as the config file of `env` and returns its path.
fn config(env: &Env, text: &str) -> PathBuf {
    let p = env.path("cryptvol.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

fn key_file_exists(keystore: &Path, id: &str) -> bool {
    keystore.join(format!("{id}.json")).exists()
}

#[test]
fn commands_take_keystore_default_key_audit_log_and_store_from_the_file() {
    let env = Env::new();
    let cfg = config(
        &env,
        "keystore = \"ks\"\naudit_log = \"audit.jsonl\"\nsnapshot_store = \"snaps\"\n\
         [keys]\ndefault_key = \"alias/cfg\"\n",
    );
    let c = || {
        let mut c = bare_cmd();
        c.arg("--config").arg(&cfg);
        c
    };
    let k = json_of(c().args(["key", "create", "--json", "--alias", "alias/cfg"]));
    let id = k["key_id"].as_str().expect("key_id").to_string();
    assert!(
        key_file_exists(&env.path("ks"), &id),
        "key not in the file's keystore"
    );

    let g = json_of(c().args(["key", "get-default", "--json"]));
    assert_eq!(g["source"], "config", "{g}");
    assert_eq!(g["key"], "alias/cfg", "{g}");

    let vol = env.path("v.img");
    let v = json_of(c().args(["create", "--json", "--size", "1M"]).arg(&vol));
    assert_eq!(
        v["keyslots"][0]["key_id"],
        id.as_str(),
        "default_key not used: {v}"
    );
    let audit = std::fs::read_to_string(env.path("audit.jsonl")).expect("the file's audit log");
    assert!(audit.contains(&id), "audit log lacks the key: {audit}");

    // The same through CRYPTVOL_CONFIG.
    let snap = json_of(
        bare_cmd()
            .env("CRYPTVOL_CONFIG", &cfg)
            .args(["snapshot", "create", "--json"])
            .arg(&vol),
    );
    let snap_id = snap["id"].as_str().expect("snapshot id");
    assert!(
        env.path("snaps").is_dir(),
        "snapshot not in the file's store"
    );
    // A restore finds the snapshot in the file's store too.
    let restored = env.path("restored.img");
    let r = json_of(
        c().args(["create", "--json", "--from-snapshot", snap_id])
            .arg(&restored),
    );
    assert_eq!(r["size"], 1 << 20, "{r}");
}

#[test]
fn flags_and_environment_override_the_file() {
    let env = Env::new();
    let cfg = config(
        &env,
        "keystore = \"ks\"\nsnapshot_store = \"snaps\"\n[keys]\ndefault_key = \"alias/cfg\"\n",
    );
    let c = || {
        let mut c = bare_cmd();
        c.arg("--config").arg(&cfg);
        c
    };
    let flag_ks = env.path("flag-ks");
    let k = json_of(
        c().args(["key", "create", "--json", "--keystore"])
            .arg(&flag_ks),
    );
    let id = k["key_id"].as_str().expect("key_id").to_string();
    assert!(key_file_exists(&flag_ks, &id), "--keystore not used");
    assert!(!env.path("ks").exists(), "the file's keystore was used");

    let env_ks = env.path("env-ks");
    let k = json_of(
        c().env("CRYPTVOL_KEYSTORE", &env_ks)
            .args(["key", "create", "--json", "--alias", "alias/e"]),
    );
    let id = k["key_id"].as_str().expect("key_id").to_string();
    assert!(key_file_exists(&env_ks, &id), "CRYPTVOL_KEYSTORE not used");

    // --key over default_key (alias/cfg does not exist in that keystore).
    let vol = env.path("v.img");
    let v = json_of(
        c().env("CRYPTVOL_KEYSTORE", &env_ks)
            .args(["create", "--json", "--size", "1M", "--key", "alias/e"])
            .arg(&vol),
    );
    assert_eq!(v["keyslots"][0]["key_id"], id.as_str(), "{v}");
    let flag_store = env.path("flag-snaps");
    run_ok(
        c().env("CRYPTVOL_KEYSTORE", &env_ks)
            .args(["snapshot", "create", "--store"])
            .arg(&flag_store)
            .arg(&vol),
    );
    assert!(flag_store.is_dir(), "--store not used");
    assert!(!env.path("snaps").exists(), "the file's store was used");
}

#[test]
fn an_unknown_key_in_the_file_is_an_error_naming_it() {
    let env = Env::new();
    let cfg = config(
        &env,
        "keystore = \"ks\"\n[keys]\ndefualt_key = \"alias/x\"\n",
    );
    let out = run(bare_cmd().arg("--config").arg(&cfg).args(["key", "list"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("defualt_key"), "{err}");
    assert!(err.contains(s(&cfg)), "{err}");
    let cfg = config(&env, "[keys]\nbare_key_refs = \"kms\"\n");
    let out = run(bare_cmd().arg("--config").arg(&cfg).args(["key", "list"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bare_key_refs") && err.contains("aws-kms"),
        "{err}"
    );
}

#[tokio::test]
async fn bare_alias_names_aws_kms_with_the_setting() {
    let env = Env::new();
    let moto = Moto::start(&env.path("moto.log"), &[]);
    aws_env(&moto.endpoint(), env.dir.path());
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let kms = aws_sdk_kms::Client::new(&conf);
    let key = kms.create_key().send().await.expect("CreateKey");
    let key_id = key.key_metadata().expect("metadata").key_id().to_string();
    kms.create_alias()
        .alias_name("alias/both")
        .target_key_id(&key_id)
        .send()
        .await
        .expect("CreateAlias");
    // The same alias exists in the local keystore.
    let ks = env.keystore();
    let local = json_of(bare_cmd().env("CRYPTVOL_KEYSTORE", &ks).args([
        "key",
        "create",
        "--json",
        "--alias",
        "alias/both",
    ]));
    let create = |name: &str, extra: &[&str], envs: &[(&str, &str)]| {
        let vol = env.path(name);
        let mut c = bare_cmd();
        c.env("CRYPTVOL_KEYSTORE", &ks).args(extra);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.args([
            "create",
            "--json",
            "--size",
            "1M",
            "--kms-key-id",
            "alias/both",
        ])
        .arg(&vol);
        let v = json_of(&mut c);
        let slot = &v["keyslots"][0];
        (
            slot["backend"].as_str().unwrap_or("").to_string(),
            slot["key_id"].as_str().unwrap_or("").to_string(),
        )
    };
    // Default: the local keystore.
    let (backend, id) = create("local.img", &[], &[]);
    assert_eq!(backend, "local");
    assert_eq!(id, local["key_id"].as_str().unwrap_or("?"));
    // The setting in the file, the flag and the environment variable: AWS KMS.
    let cfg = config(&env, "[keys]\nbare_key_refs = \"aws-kms\"\n");
    let by_file = create("file.img", &["--config", s(&cfg)], &[]);
    let by_flag = create("flag.img", &["--bare-key-refs", "aws-kms"], &[]);
    let by_env = create("env.img", &[], &[("CRYPTVOL_BARE_KEY_REFS", "aws-kms")]);
    for (backend, id) in [by_file, by_flag, by_env] {
        assert_eq!(backend, "aws-kms");
        assert!(id.contains(&key_id), "{id} is not KMS key {key_id}");
    }
    // Explicit forms keep their meaning; info shows the backend.
    let vol = env.path("explicit-local.img");
    let v = json_of(
        bare_cmd()
            .env("CRYPTVOL_KEYSTORE", &ks)
            .args([
                "--bare-key-refs",
                "aws-kms",
                "create",
                "--json",
                "--size",
                "1M",
            ])
            .args(["--key", "local:alias/both"])
            .arg(&vol),
    );
    assert_eq!(v["keyslots"][0]["backend"], "local", "{v}");
    let info = info_json(&env, &env.path("flag.img"));
    assert_eq!(info["keyslots"][0]["backend"], "aws-kms", "{info}");
}
