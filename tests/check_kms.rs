//! `cryptvol check` on volumes under AWS KMS keys, against a local `moto_server`: key
//! states from DescribeKey, --require-key by alias, ARN and key id, the rotation note,
//! and an unreachable KMS (exit status 2).

mod common;

use common::*;

fn check(env: &Env, args: &[&str]) -> (i32, serde_json::Value) {
    let out = run(env.cmd().arg("check").arg("--json").args(args));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines();
    let first = lines.next().unwrap_or_else(|| {
        panic!(
            "no report; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(lines.next().is_none(), "{stdout}");
    (
        out.status.code().expect("exit code"),
        serde_json::from_str(first).expect("json"),
    )
}

fn codes(r: &serde_json::Value, field: &str) -> Vec<String> {
    r[field]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["code"].as_str().expect("code").to_string())
        .collect()
}

#[tokio::test]
async fn kms_key_states_and_required_keys() {
    let env = Env::new();
    let moto = Moto::start(&env.path("moto.log"), &[]);
    aws_env(&moto.endpoint(), env.dir.path());
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let kms = aws_sdk_kms::Client::new(&conf);
    let key = kms.create_key().send().await.expect("CreateKey");
    let meta = key.key_metadata().expect("metadata");
    let arn = meta.arn().expect("arn").to_string();
    let key_id = meta.key_id().to_string();
    kms.create_alias()
        .alias_name("alias/fleet")
        .target_key_id(&key_id)
        .send()
        .await
        .expect("CreateAlias");
    let other = kms.create_key().send().await.expect("CreateKey 2");
    let other_id = other.key_metadata().expect("metadata").key_id().to_string();

    let vol = env.create("k.img", "8M", &["--key", "aws-kms:alias/fleet"]);
    let (status, r) = check(&env, &[s(&vol)]);
    assert_eq!(
        (status, r["verdict"].as_str()),
        (0, Some("COMPLIANT")),
        "{r}"
    );
    assert_eq!(r["keyslots"][0]["key_id"], arn.as_str());
    assert_eq!(r["keyslots"][0]["key_state"], "Enabled");

    // The required key by alias, by ARN and by bare key id; another key is flagged.
    for required in [
        "aws-kms:alias/fleet".to_string(),
        arn.clone(),
        format!("aws-kms:{key_id}"),
    ] {
        let (status, r) = check(&env, &["--require-key", &required, s(&vol)]);
        assert_eq!(status, 0, "{required}: {r}");
    }
    let (status, r) = check(
        &env,
        &["--require-key", &format!("aws-kms:{other_id}"), s(&vol)],
    );
    assert_eq!(status, 1);
    assert_eq!(
        codes(&r, "reasons"),
        ["KEY_NOT_REQUIRED", "KEY_NOT_REQUIRED"]
    );

    // Rotation of KMS keys is not visible here: a note, not a finding.
    let (status, r) = check(&env, &["--require-rotation", s(&vol)]);
    assert_eq!(status, 0);
    assert_eq!(codes(&r, "notes"), ["KEY_ROTATION_NOT_CHECKED"]);

    // Key states come from DescribeKey.
    kms.disable_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("DisableKey");
    let (status, r) = check(&env, &[s(&vol)]);
    assert_eq!(
        (status, codes(&r, "reasons")),
        (1, vec!["KEY_DISABLED".to_string()])
    );
    kms.schedule_key_deletion()
        .key_id(&key_id)
        .pending_window_in_days(7)
        .send()
        .await
        .expect("ScheduleKeyDeletion");
    let (_, r) = check(&env, &[s(&vol)]);
    assert_eq!(codes(&r, "reasons"), ["KEY_PENDING_DELETION"]);
    assert_eq!(r["keyslots"][0]["key_state"], "PendingDeletion");

    // KMS unreachable: the key cannot be looked up; exit status 2.
    let port = free_port();
    let out = run(env
        .cmd()
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .args(["check", "--json", s(&vol)]));
    assert_eq!(out.status.code(), Some(2));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert_eq!(r["verdict"], "ERROR");
    assert_eq!(codes(&r, "reasons"), ["KEY_LOOKUP_FAILED"]);
}
