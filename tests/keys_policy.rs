//! Key policies with a real second Unix user: a keystore shared read-only with a
//! dedicated group (mode 2750), one key granted to the daemon's user for unwrap only, one
//! not granted. Needs root (it creates the system user `cryptvol-test`); CI runs as root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const USER: &str = TEST_USER;

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// The test as the unprivileged user: `setpriv` execs the command directly (same pid).
fn as_user(bin: &Path, uid: u32, gid: u32) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--init-groups")
        .arg("--")
        .arg(bin)
        .env("RUST_LOG", "info")
        .env_remove("CRYPTVOL_KEYSTORE");
    c
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(d: &mut Daemon, sock: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = d.0.try_wait() {
            panic!(
                "serve exited ({st}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(mut c: Command) -> String {
    let out = run(c.stdout(Stdio::null()));
    assert!(!out.status.success(), "{c:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_daemon_user_may_only_do_what_the_key_policy_grants() {
    let (uid, gid) = ensure_test_user();
    let env = Env::new();
    chmod(env.dir.path(), 0o755);
    // The binary, where the user can run it.
    let bin_copy = env.path("cryptvol");
    std::fs::copy(bin(), &bin_copy).expect("copy the binary");
    chmod(&bin_copy, 0o755);

    // Root sets up a keystore shared read-only with the user's dedicated group.
    let ks = env.keystore();
    std::fs::create_dir(&ks).expect("mkdir");
    chown(&ks, 0, gid);
    chmod(&ks, 0o2750);
    let ksarg = ["--keystore", s(&ks)];
    let granted = {
        let out = run_ok(
            env.cmd()
                .args(["key", "create", "--json", "--alias", "alias/granted"])
                .args(ksarg),
        );
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["key_id"]
            .as_str()
            .expect("id")
            .to_string()
    };
    let other = {
        let out = run_ok(
            env.cmd()
                .args(["key", "create", "--json", "--alias", "alias/other"])
                .args(ksarg),
        );
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["key_id"]
            .as_str()
            .expect("id")
            .to_string()
    };
    let mode = std::fs::metadata(ks.join(format!("{granted}.json")))
        .expect("key file")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(
        mode, 0o640,
        "key files of a group-shared keystore are group-readable"
    );
    run_ok(
        env.cmd()
            .args([
                "key",
                "grant",
                "alias/granted",
                "--principal",
                USER,
                "--operations",
                "unwrap",
            ])
            .args(ksarg),
    );
    let v1 = env.path("v1.img");
    let v2 = env.path("v2.img");
    run_ok(
        env.cmd()
            .args(["create", "--size", "8M", "--key", "alias/granted"])
            .args(ksarg)
            .arg(&v1),
    );
    run_ok(
        env.cmd()
            .args(["create", "--size", "8M", "--key", "alias/other"])
            .args(ksarg)
            .arg(&v2),
    );
    let userdir = env.path("user");
    std::fs::create_dir(&userdir).expect("mkdir");
    for p in [&v1, &v2, &userdir] {
        chown(p, uid, gid);
    }
    let audit_log = userdir.join("audit.jsonl");
    let user_args = |c: &mut Command| {
        c.args(ksarg).args(["--audit-log", s(&audit_log)]);
    };

    // The granted key: the daemon user serves v1.
    let sock = userdir.join("s.sock");
    let log = userdir.join("serve.log");
    let mut c = as_user(&bin_copy, uid, gid);
    // The test (root) is the client: a daemon admits only its own user unless told.
    c.args(["serve", "--unix", s(&sock), "--allow-uid", "root"]);
    user_args(&mut c);
    c.arg(&v1)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut d = Daemon(c.spawn().expect("spawn serve"));
    wait_socket(&mut d, &sock, &log);
    qemu_io(
        &format!("nbd+unix:///v1?socket={}", sock.display()),
        &["write -P 0x55 0 64k", "read -P 0x55 0 64k"],
    );
    drop(d);
    let serve_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        serve_log.contains("cannot destroy keys whose deletion is due"),
        "a daemon that may not write the keystore warns about purging: {serve_log}"
    );

    // The other key: access denied, naming the key, the operation and the principal.
    let mut c = as_user(&bin_copy, uid, gid);
    c.args(["serve", "--unix", s(&userdir.join("t.sock"))]);
    user_args(&mut c);
    c.arg(&v2);
    let err = stderr_of(c);
    let principal = format!("user {USER} (uid {uid})");
    assert!(
        err.contains("access denied")
            && err.contains(&principal)
            && err.contains(&other)
            && err.contains("unwrap")
            && err.contains(s(&v2)),
        "{err}"
    );

    // Unwrap does not let the user administer the key or wrap new volumes with it.
    let mut c = as_user(&bin_copy, uid, gid);
    c.args(["key", "disable", "alias/granted"]);
    user_args(&mut c);
    let err = stderr_of(c);
    assert!(
        err.contains("access denied") && err.contains("administer (disable)"),
        "{err}"
    );
    let mut c = as_user(&bin_copy, uid, gid);
    c.args([
        "key",
        "grant",
        &granted,
        "--principal",
        USER,
        "--operations",
        "all",
    ]);
    user_args(&mut c);
    assert!(stderr_of(c).contains("access denied"));
    let mut c = as_user(&bin_copy, uid, gid);
    let v3 = userdir.join("v3.img");
    c.args(["create", "--size", "4M", "--key", "alias/granted"]);
    user_args(&mut c);
    c.arg(&v3);
    let err = stderr_of(c);
    assert!(
        err.contains("access denied") && err.contains("generate"),
        "{err}"
    );
    assert!(!v3.exists());
    let d: serde_json::Value = serde_json::from_str(&run_ok(
        env.cmd()
            .args(["key", "describe", &granted, "--json"])
            .args(ksarg),
    ))
    .expect("json");
    assert_eq!(d["state"], "Enabled");

    // The user's audit log has the successes and the denials, with principal and volume.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit_log)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let summary: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["operation"].as_str().unwrap_or(""),
                r["key_id"].as_str().unwrap_or(""),
                r["error"].as_str().unwrap_or("ok")
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            format!("unwrap {granted} ok"),
            format!("unwrap {other} AccessDenied"),
            format!("disable {granted} AccessDenied"),
            format!("grant {granted} AccessDenied"),
            format!("generate {granted} AccessDenied"),
        ]
    );
    for r in &records {
        assert_eq!(r["principal"], USER);
        assert_eq!(r["uid"], uid);
    }
    let v2_uuid = info_json(&env, &v2)["uuid"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(records[1]["volume_uuid"], v2_uuid.as_str());

    // Revoked: the user can no longer attach v1.
    run_ok(
        env.cmd()
            .args([
                "key",
                "revoke",
                "alias/granted",
                "--principal",
                USER,
                "--operations",
                "unwrap",
            ])
            .args(ksarg),
    );
    let mut c = as_user(&bin_copy, uid, gid);
    c.args(["serve", "--unix", s(&userdir.join("u.sock"))]);
    user_args(&mut c);
    c.arg(&v1);
    assert!(stderr_of(c).contains("access denied"));

    // The file permissions stay the outer boundary: without the group's read access the
    // user cannot use the keystore at all, whatever the policy says.
    run_ok(
        env.cmd()
            .args([
                "key",
                "grant",
                "alias/granted",
                "--principal",
                USER,
                "--operations",
                "unwrap",
            ])
            .args(ksarg),
    );
    chmod(&ks, 0o700);
    let mut c = as_user(&bin_copy, uid, gid);
    c.args(["serve", "--unix", s(&userdir.join("w.sock"))]);
    user_args(&mut c);
    c.arg(&v1);
    let err = stderr_of(c);
    assert!(
        err.contains("Permission denied") && err.contains(s(&ks)),
        "{err}"
    );
}
