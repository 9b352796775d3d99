//! AWS IAM and key-policy denials of the aws-kms backend, exercised against moto_server
//! with its IAM enforcement switched on, not assumed.
//!
//! moto_server is started with `INITIAL_NO_AUTH_ACTION_COUNT=N`: its first N calls are
//! not checked; tests/aws_iam_setup.py makes exactly those N calls with root credentials
//! (IAM users, their access keys and inline policies, two KMS keys) and proves that
//! enforcement is on afterwards. Then cryptvol runs with one IAM user's access key.
//!
//! What moto's enforcement covers (moto 5, `moto/iam/access_control.py`,
//! `moto/kms/policy_validator.py`), so what these tests prove:
//! - SigV4 signatures are checked against the IAM user's secret key, and the user's
//!   identity policies (inline and attached, user and groups) are evaluated: Allow/Deny on
//!   the Action (wildcards included). A user whose policy lacks `kms:GenerateDataKey` or
//!   `kms:Decrypt` is refused that call with "User: ARN is not authorized to perform:
//!   ACTION" (HTTP 403, an XML body, which cryptvol reads).
//! - NOT covered: the Resource element (KMS calls are authorized against resource "*",
//!   so the policies here use `"Resource": "*"`), Conditions (e.g. on the encryption
//!   context), grants.
//! - Key policies: moto enforces only an explicit Deny of `kms:DescribeKey` (or `kms:*`,
//!   `kms:Describe*`) with `"Resource": "*"`, for every principal (the Principal element is
//!   not evaluated), and its message does not name the principal. cryptvol calls
//!   DescribeKey before every GenerateDataKey and Decrypt, so a key policy denying `kms:*`
//!   is refused there, end to end, and cryptvol asks `sts:GetCallerIdentity` who it is. A
//!   key policy denying only `kms:Decrypt` is not enforced by moto: that denial reaches
//!   cryptvol as the same AccessDeniedException and goes through the same mapping, covered
//!   by the unit test `key_policy_denial_of_decrypt_names_key_action_principal_and_remedy`
//!   in src/keys/aws_kms.rs with AWS's own message.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::{json, Value};

/// The number of calls tests/aws_iam_setup.py makes before enforcement starts.
const SETUP_CALLS: &str = "14";

/// A moto_server enforcing IAM, with the users and keys of tests/aws_iam_setup.py.
struct Iam {
    env: Env,
    moto: Moto,
    fixtures: Value,
}

impl Iam {
    fn start() -> Iam {
        let env = Env::new();
        let moto = Moto::start_with(
            &env.path("moto.log"),
            &["boto3"],
            &[("INITIAL_NO_AUTH_ACTION_COUNT", SETUP_CALLS)],
        );
        let out = env.path("iam.json");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aws_iam_setup.py");
        run_ok(
            Command::new("python3")
                .arg(script)
                .arg(moto.endpoint())
                .arg(SETUP_CALLS)
                .arg(&out),
        );
        let fixtures = serde_json::from_str(&std::fs::read_to_string(&out).expect("iam.json"))
            .expect("iam.json is JSON");
        Iam {
            env,
            moto,
            fixtures,
        }
    }

    fn user_arn(&self, user: &str) -> String {
        self.fixtures["users"][user]["arn"]
            .as_str()
            .expect("user arn")
            .to_string()
    }

    fn key(&self, name: &str) -> String {
        self.fixtures["keys"][name]
            .as_str()
            .expect("key arn")
            .to_string()
    }

    /// The environment of a cryptvol child acting as `user`.
    fn as_user(&self, user: &str) -> Vec<(String, String)> {
        let u = &self.fixtures["users"][user];
        aws_user_env(
            &self.moto.endpoint(),
            self.env.dir.path(),
            u["access_key_id"].as_str().expect("access key"),
            u["secret_access_key"].as_str().expect("secret key"),
        )
    }

    /// `cryptvol ARGS` as `user`.
    fn cryptvol(&self, user: &str, args: &[&str]) -> Output {
        let mut c = self.env.cmd();
        c.envs(self.as_user(user)).args(args);
        run(&mut c)
    }

    /// `cryptvol create` of a 4 MiB volume under `key` as `user`.
    fn create(&self, user: &str, name: &str, key: &str) -> (PathBuf, Output) {
        let vol = self.env.path(name);
        let audit = self.audit_log();
        let out = self.cryptvol(
            user,
            &[
                "create",
                "--size",
                "4M",
                "--kms-key-id",
                key,
                "--audit-log",
                s(&audit),
                s(&vol),
            ],
        );
        (vol, out)
    }

    /// `cryptvol serve VOL` as `user`, expected to fail at startup: its exit code and stderr.
    fn serve_fails(&self, user: &str, vol: &Path) -> (Option<i32>, String) {
        let out = run(Command::new("timeout")
            .arg("60")
            .arg(bin())
            .env("CRYPTVOL_KEYSTORE", self.env.keystore())
            .envs(self.as_user(user))
            .args(["serve", "--unix", s(&self.env.path("fail.sock"))])
            .args(["--audit-log", s(&self.audit_log())])
            .arg(vol));
        assert!(
            !out.status.success() && out.status.code() != Some(124),
            "serve as {user} should fail at startup ({})",
            out.status
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        (out.status.code(), err)
    }

    /// Serves `vol` as `user` and writes and reads it through qemu-io.
    fn serve_works(&self, user: &str, vol: &Path, export: &str) {
        let envs = self.as_user(user);
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sock = self.env.path(&format!("{user}.sock"));
        let audit = self.audit_log();
        let srv = self
            .env
            .serve_env(&sock, &[s(vol)], &["--audit-log", s(&audit)], false, &envs);
        qemu_io(
            &srv.uri(export),
            &["write -P 0x6b 0 1M", "read -P 0x6b 0 1M"],
        );
        srv.stop();
    }

    /// The key audit log every command here writes.
    fn audit_log(&self) -> PathBuf {
        self.env.path("audit.jsonl")
    }

    /// The aws-kms audit records with an AccessDenied outcome.
    fn denials(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("audit line is JSON"))
            .filter(|v| v["backend"] == "aws-kms" && v["error"] == "AccessDenied")
            .collect()
    }
}

/// A failed command's exit code and stderr.
fn failed(out: &Output) -> (Option<i32>, String) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "unexpectedly succeeded: {err}");
    assert!(!err.contains("panicked"), "{err}");
    (out.status.code(), err)
}

/// The refusal says access denied, names the key, the KMS action and the principal, and
/// says what to grant to whom.
fn assert_names_denial(err: &str, key: &str, action: &str, principal: &str) {
    for part in [
        "access denied",
        key,
        action,
        principal,
        &format!("grant {action} on {key} to {principal}"),
    ] {
        assert!(err.contains(part), "{part:?} missing from:\n{err}");
    }
}

/// An audit record of the denial, with who was refused what on which key.
fn assert_audited(iam: &Iam, operation: &str, key: &str, action: &str, principal: &str) {
    let expected = json!({
        "principal": principal, "key": key, "operation": operation, "action": action,
    });
    let denials = iam.denials();
    let found = denials
        .iter()
        .find(|v| v["operation"] == operation && v["denied"] == expected);
    let record = found.unwrap_or_else(|| panic!("no audit record {expected} in {denials:?}"));
    assert_eq!(record["result"], "error");
    assert_eq!(record["key_id"], key);
    assert!(
        record["volume_uuid"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "{record}"
    );
}

#[test]
fn create_without_kms_generate_data_key_is_denied_naming_key_action_and_principal() {
    let iam = Iam::start();
    let key = iam.key("open");
    let user = iam.user_arn("no-gen");

    let (_, out) = iam.create("no-gen", "denied.img", &key);
    let (code, err) = failed(&out);
    assert_eq!(code, Some(1), "{err}");
    assert_names_denial(&err, &key, "kms:GenerateDataKey", &user);
    assert_audited(&iam, "generate", &key, "kms:GenerateDataKey", &user);

    // The policy is what refuses: a user allowed GenerateDataKey creates on the same key,
    // and the refused user (allowed Decrypt) serves that volume.
    let (vol, out) = iam.create("full", "ok.img", &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    iam.serve_works("no-gen", &vol, "ok");
}

#[test]
fn serve_without_kms_decrypt_is_denied_naming_key_action_and_principal() {
    let iam = Iam::start();
    let key = iam.key("open");
    let user = iam.user_arn("no-decrypt");

    // Allowed GenerateDataKey: creates; not allowed Decrypt: cannot unlock it.
    let (vol, out) = iam.create("no-decrypt", "v.img", &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, err) = iam.serve_fails("no-decrypt", &vol);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(s(&vol)), "{err}");
    assert_names_denial(&err, &key, "kms:Decrypt", &user);
    assert_audited(&iam, "unwrap", &key, "kms:Decrypt", &user);

    // The policy is what refuses: a user allowed Decrypt serves it.
    iam.serve_works("full", &vol, "v");
}

#[tokio::test]
async fn key_policy_deny_is_reported_as_access_denied_with_the_caller_arn() {
    let iam = Iam::start();
    let key = iam.key("policed");
    let user = iam.user_arn("full");
    let (vol, out) = iam.create("full", "p.img", &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The key administrator denies the user everything on the key in its key policy.
    let admin = &iam.fixtures["users"]["admin"];
    let creds = aws_sdk_kms::config::Credentials::new(
        admin["access_key_id"].as_str().expect("admin key"),
        admin["secret_access_key"].as_str().expect("admin secret"),
        None,
        None,
        "test-admin",
    );
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .credentials_provider(creds)
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(iam.moto.endpoint())
        .load()
        .await;
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "admin", "Effect": "Allow",
             "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
             "Action": "kms:*", "Resource": "*"},
            {"Sid": "not-this-user", "Effect": "Deny",
             "Principal": {"AWS": user},
             "Action": "kms:*", "Resource": "*"}
        ]
    });
    aws_sdk_kms::Client::new(&conf)
        .put_key_policy()
        .key_id(&key)
        .policy_name("default")
        .policy(policy.to_string())
        .send()
        .await
        .expect("PutKeyPolicy as the admin user");

    // The user's IAM policy allows it all; the key policy refuses, at the DescribeKey
    // cryptvol makes before Decrypt (see the top of this file). moto's message does not
    // name the principal: cryptvol's sts:GetCallerIdentity does.
    let (code, err) = iam.serve_fails("full", &vol);
    assert_eq!(code, Some(1), "{err}");
    assert_names_denial(&err, &key, "kms:DescribeKey", &user);
    // moto's key-policy refusal carries no message; the remedy names the key policy.
    assert!(err.contains("key policy"), "{err}");
    assert_audited(&iam, "unwrap", &key, "kms:DescribeKey", &user);

    let (_, out) = iam.create("full", "p2.img", &key);
    let (code, err) = failed(&out);
    assert_eq!(code, Some(1), "{err}");
    assert_names_denial(&err, &key, "kms:DescribeKey", &user);
    assert_audited(&iam, "generate", &key, "kms:DescribeKey", &user);
}
