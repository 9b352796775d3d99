//! Rewrapping the data key (rekey) and keyslot changes without touching data, and their
//! crash safety: the process is killed at every step (fault injection, see
//! `volume::crash_point`) and at random instants, and the volume must then open with the
//! old or the new key and hold the same data.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use cryptvol::keys::{Argon2Params, PassphraseSource};
use cryptvol::ops::{self, KeyOptions};
use cryptvol::volume::OpenOptions;

const FAST_KDF: [&str; 4] = ["--pbkdf-memory", "8192", "--pbkdf-time", "1"];

fn key_create(env: &Env, alias: &str) -> String {
    let out = run_ok(
        env.cmd()
            .args(["key", "create", "--json", "--alias", alias]),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["key_id"].as_str().expect("key id").to_string()
}

/// (backend, key id) of every keyslot.
fn slots(env: &Env, vol: &Path) -> Vec<(String, String)> {
    let info = info_json(env, vol);
    info["keyslots"]
        .as_array()
        .expect("keyslots")
        .iter()
        .map(|k| {
            (
                k["backend"].as_str().unwrap_or("").to_string(),
                k["key_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn local(id: &str) -> (String, String) {
    ("local".to_string(), id.to_string())
}

fn pass() -> (String, String) {
    ("passphrase".to_string(), String::new())
}

fn key_options(env: &Env, passphrase: Option<&Path>) -> KeyOptions {
    KeyOptions {
        keystore: Some(env.keystore()),
        passphrase: passphrase.map(|p| PassphraseSource::File(p.to_path_buf())),
        argon2: Argon2Params::default(),
        audit_log: None,
    }
}

/// Writes a recognisable block through the library (faster than a server per volume).
async fn write_marker(env: &Env, vol: &Path, pass: Option<&Path>, seed: u64) {
    let (v, _, _) = ops::unlock(vol, &key_options(env, pass), OpenOptions::default())
        .await
        .expect("unlock to write");
    v.write_at(&pattern(8192, seed), 4096, true).expect("write");
}

/// Opens the volume with the given credentials and checks the marker.
async fn check_marker(env: &Env, vol: &Path, pass: Option<&Path>, seed: u64) {
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let (v, _, _) = ops::unlock(vol, &key_options(env, pass), opts)
        .await
        .unwrap_or_else(|e| panic!("{} does not open: {e}", vol.display()));
    let mut buf = vec![0u8; 8192];
    v.read_at(&mut buf, 4096).expect("read");
    assert!(
        buf == pattern(8192, seed),
        "data changed in {}",
        vol.display()
    );
}

#[tokio::test]
async fn rekey_both_ways_keeps_data() {
    let env = Env::new();
    let a = key_create(&env, "alias/a");
    let b = key_create(&env, "alias/b");
    let passfile = env.path("pass");
    std::fs::write(&passfile, "recovery words here\n").expect("write");
    let vol = env.create("r.img", "16M", &["--key", "alias/a"]);
    let uuid = info_json(&env, &vol)["uuid"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("r"), &["write -P 0x3d 0 2M"]);
    srv.stop();

    // local -> local
    let out = run_ok(env.cmd().args(["rekey", s(&vol), "--to-key", "alias/b"]));
    assert!(out.contains(&b) && out.contains(&a), "{out}");
    assert_eq!(slots(&env, &vol), [local(&b)]);
    run_ok(env.cmd().args(["key", "disable", &a]));
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("r"), &["read -P 0x3d 0 2M"]);
    srv.stop();

    // local -> passphrase
    run_ok(
        env.cmd()
            .args(["rekey", s(&vol), "--to-passphrase-file", s(&passfile)])
            .args(FAST_KDF),
    );
    assert_eq!(slots(&env, &vol), [pass()]);
    run_ok(env.cmd().args(["key", "disable", &b]));
    let srv = env.serve(&[s(&vol)], &["--passphrase-file", s(&passfile)], false);
    qemu_io(&srv.uri("r"), &["read -P 0x3d 0 2M", "write -P 0x4e 2M 1M"]);
    srv.stop();

    // passphrase -> local (a disabled key is refused as the target, nothing changes)
    let err = fails(env.cmd().args([
        "rekey",
        s(&vol),
        "--to-key",
        &a,
        "--unlock-passphrase-file",
        s(&passfile),
    ]));
    assert!(err.contains(&a) && err.contains("disabled"), "{err}");
    assert_eq!(slots(&env, &vol), [pass()]);
    run_ok(env.cmd().args(["key", "enable", &a]));
    // Without the passphrase it cannot be unlocked.
    let err = fails(env.cmd().args(["rekey", s(&vol), "--to-key", &a]));
    assert!(err.contains("no passphrase given"), "{err}");
    run_ok(env.cmd().args([
        "rekey",
        s(&vol),
        "--to-key",
        &a,
        "--unlock-passphrase-file",
        s(&passfile),
    ]));
    assert_eq!(slots(&env, &vol), [local(&a)]);
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("r"), &["read -P 0x3d 0 2M", "read -P 0x4e 2M 1M"]);
    srv.stop();
    assert!(info_json(&env, &vol)["header"]["healthy"] == true);

    // The audit log shows each rewrap as rewrap-from / rewrap-to pairs for this volume.
    let log = std::fs::read_to_string(env.keystore().join("audit.jsonl")).expect("log");
    let rewraps: Vec<(String, String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["volume_uuid"] == uuid.as_str() && r["result"] == "ok")
        .filter(|r| {
            r["operation"]
                .as_str()
                .is_some_and(|o| o.starts_with("rewrap"))
        })
        .map(|r| {
            (
                r["operation"].as_str().unwrap_or("").to_string(),
                r["backend"].as_str().unwrap_or("").to_string(),
                r["key_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let t = |o: &str, b: &str, k: &str| (o.to_string(), b.to_string(), k.to_string());
    assert_eq!(
        rewraps,
        [
            t("rewrap-from", "local", &a),
            t("rewrap-to", "local", &b),
            t("rewrap-from", "local", &b),
            t("rewrap-to", "passphrase", ""),
            // The attempt towards the disabled key: unwrapped, then refused.
            t("rewrap-from", "passphrase", ""),
            t("rewrap-from", "passphrase", ""),
            t("rewrap-to", "local", &a),
        ]
    );
}

#[tokio::test]
async fn keyslots_add_and_remove() {
    let env = Env::new();
    let a = key_create(&env, "alias/a");
    let b = key_create(&env, "alias/b");
    let passfile = env.path("pass");
    std::fs::write(&passfile, "second factor\n").expect("write");
    let vol = env.create("k.img", "8M", &["--key", &a]);
    write_marker(&env, &vol, None, 7).await;
    run_ok(
        env.cmd()
            .args(["keyslot", "add", s(&vol), "--passphrase-file", s(&passfile)])
            .args(FAST_KDF),
    );
    run_ok(
        env.cmd()
            .args(["keyslot", "add", s(&vol), "--kms-key-id", "alias/b"]),
    );
    assert_eq!(slots(&env, &vol), [local(&a), pass(), local(&b)]);
    // With several keyslots, rekey needs --slot; a bad slot is refused.
    let err = fails(env.cmd().args(["rekey", s(&vol), "--to-key", &a]));
    assert!(
        err.contains("--slot") && err.contains("3 keyslots"),
        "{err}"
    );
    let err = fails(
        env.cmd()
            .args(["rekey", s(&vol), "--to-key", &a, "--slot", "5"]),
    );
    assert!(err.contains("no keyslot 5"), "{err}");
    let err = fails(env.cmd().args(["keyslot", "remove", s(&vol), "9"]));
    assert!(err.contains("no keyslot 9"), "{err}");
    // Each keyslot alone opens the volume.
    run_ok(env.cmd().args(["key", "disable", &a]));
    run_ok(env.cmd().args(["key", "disable", &b]));
    check_marker(&env, &vol, Some(&passfile), 7).await;
    run_ok(env.cmd().args(["key", "enable", &b]));
    check_marker(&env, &vol, None, 7).await;
    run_ok(env.cmd().args(["key", "enable", &a]));
    // Removing slot 0 unlocks through a remaining slot (b here).
    run_ok(env.cmd().args(["keyslot", "remove", s(&vol), "0"]));
    assert_eq!(slots(&env, &vol), [pass(), local(&b)]);
    // Removing a slot needs a remaining one that opens: without the passphrase and with
    // b disabled, removing slot 1 (b) is refused.
    run_ok(env.cmd().args(["key", "disable", &b]));
    let err = fails(env.cmd().args(["keyslot", "remove", s(&vol), "1"]));
    assert!(err.contains("no keyslot could be unlocked"), "{err}");
    run_ok(env.cmd().args([
        "keyslot",
        "remove",
        s(&vol),
        "1",
        "--unlock-passphrase-file",
        s(&passfile),
    ]));
    assert_eq!(slots(&env, &vol), [pass()]);
    let err = fails(env.cmd().args([
        "keyslot",
        "remove",
        s(&vol),
        "0",
        "--unlock-passphrase-file",
        s(&passfile),
    ]));
    assert!(err.contains("last keyslot"), "{err}");
    check_marker(&env, &vol, Some(&passfile), 7).await;
}

#[tokio::test]
async fn rekey_of_a_served_volume_changes_only_the_header() {
    let env = Env::new();
    let a = key_create(&env, "alias/a");
    let b = key_create(&env, "alias/b");
    let vol = env.create("live.img", "8M", &["--key", &a]);
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("live"), &["write -P 0x71 0 1M"]);
    run_ok(env.cmd().args(["rekey", s(&vol), "--to-key", &b]));
    qemu_io(
        &srv.uri("live"),
        &["read -P 0x71 0 1M", "write -P 0x72 1M 1M"],
    );
    srv.stop();
    // a can now be disabled: the volume opens with b.
    run_ok(env.cmd().args(["key", "disable", &a]));
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(
        &srv.uri("live"),
        &["read -P 0x71 0 1M", "read -P 0x72 1M 1M"],
    );
    srv.stop();
}

/// One header-changing operation under test.
#[derive(Clone, Copy, Debug)]
enum Op {
    RekeyLocal,
    RekeyToPassphrase,
    KeyslotAdd,
    KeyslotRemove,
}

const STEPS: [&str; 6] = [
    "after-unwrap",
    "after-wrap",
    "header-copy-1-torn",
    "header-copy-1",
    "header-copy-2-torn",
    "header-copy-2",
];

/// Whether killing at `step` must leave the new header (else the old one).
fn expect_new(step: &str) -> bool {
    matches!(
        step,
        "header-copy-1" | "header-copy-2-torn" | "header-copy-2"
    )
}

#[tokio::test]
async fn killed_at_every_step_the_volume_opens_with_the_old_or_the_new_key() {
    let env = Env::new();
    let a = key_create(&env, "alias/a");
    let b = key_create(&env, "alias/b");
    let passfile = env.path("pass");
    std::fs::write(&passfile, "crash test passphrase\n").expect("write");
    let mut n = 0u64;
    for op in [
        Op::RekeyLocal,
        Op::RekeyToPassphrase,
        Op::KeyslotAdd,
        Op::KeyslotRemove,
    ] {
        for step in STEPS {
            if matches!(op, Op::KeyslotRemove) && step == "after-wrap" {
                continue; // remove wraps nothing
            }
            n += 1;
            let vol = env.create(&format!("c{n}.img"), "4M", &["--key", &a]);
            if matches!(op, Op::KeyslotRemove) {
                run_ok(
                    env.cmd()
                        .args(["keyslot", "add", s(&vol), "--passphrase-file", s(&passfile)])
                        .args(FAST_KDF),
                );
            }
            write_marker(&env, &vol, None, n).await;
            let (old, new) = match op {
                Op::RekeyLocal => (vec![local(&a)], vec![local(&b)]),
                Op::RekeyToPassphrase => (vec![local(&a)], vec![pass()]),
                Op::KeyslotAdd => (vec![local(&a)], vec![local(&a), pass()]),
                Op::KeyslotRemove => (vec![local(&a), pass()], vec![pass()]),
            };
            let mut cmd = env.cmd();
            match op {
                Op::RekeyLocal => cmd.args(["rekey", s(&vol), "--to-key", &b]),
                Op::RekeyToPassphrase => cmd
                    .args(["rekey", s(&vol), "--to-passphrase-file", s(&passfile)])
                    .args(FAST_KDF),
                Op::KeyslotAdd => cmd
                    .args(["keyslot", "add", s(&vol), "--passphrase-file", s(&passfile)])
                    .args(FAST_KDF),
                Op::KeyslotRemove => cmd.args([
                    "keyslot",
                    "remove",
                    s(&vol),
                    "0",
                    "--unlock-passphrase-file",
                    s(&passfile),
                ]),
            };
            cmd.env("CRYPTVOL_FAULT_INJECTION", "1")
                .env("CRYPTVOL_TEST_CRASH_AT", step);
            let out = run(&mut cmd);
            assert_eq!(
                out.status.signal(),
                Some(9),
                "{op:?} at {step}: expected a kill ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let got = slots(&env, &vol);
            let want = if expect_new(step) { &new } else { &old };
            assert_eq!(&got, want, "{op:?} killed at {step}");
            // It opens with what the header says, and only needs that: disable the key
            // that is not in it.
            let needs_a = got.contains(&local(&a));
            let needs_b = got.contains(&local(&b));
            let has_pass = got.contains(&pass());
            if !needs_a {
                run_ok(env.cmd().args(["key", "disable", &a]));
            }
            if !needs_b {
                run_ok(env.cmd().args(["key", "disable", &b]));
            }
            let p = has_pass.then_some(passfile.as_path());
            check_marker(&env, &vol, p, n).await;
            run_ok(env.cmd().args(["key", "enable", &a]));
            run_ok(env.cmd().args(["key", "enable", &b]));
            // A torn copy is reported, and repaired by the next header update.
            let healthy = info_json(&env, &vol)["header"]["healthy"] == true;
            if step.ends_with("-torn") || step == "header-copy-1" {
                assert!(
                    !healthy,
                    "{op:?} at {step}: damage or staleness not reported"
                );
                run_ok(
                    env.cmd()
                        .args(["keyslot", "add", s(&vol), "--key", &b])
                        .args(["--unlock-passphrase-file", s(&passfile)]),
                );
                assert!(info_json(&env, &vol)["header"]["healthy"] == true);
                check_marker(&env, &vol, p, n).await;
            } else {
                assert!(healthy, "{op:?} at {step}");
            }
        }
    }
    // Fault injection needs both variables: one alone does nothing.
    let vol = env.create("safe.img", "4M", &["--key", &a]);
    run_ok(
        env.cmd()
            .args(["rekey", s(&vol), "--to-key", &b])
            .env("CRYPTVOL_TEST_CRASH_AT", "after-unwrap"),
    );
    assert_eq!(slots(&env, &vol), [local(&b)]);
}

#[tokio::test]
async fn killed_at_random_instants_the_volume_still_opens() {
    let env = Env::new();
    let a = key_create(&env, "alias/a");
    let b = key_create(&env, "alias/b");
    let vol = env.create("rand.img", "4M", &["--key", &a]);
    write_marker(&env, &vol, None, 99).await;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut killed = 0;
    for i in 0..40 {
        let to = if i % 2 == 0 { &b } else { &a };
        let mut child = env
            .cmd()
            .args(["rekey", s(&vol), "--to-key", to])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(seed % 15_000));
        let _ = child.kill();
        let status = child.wait().expect("wait");
        if status.signal() == Some(9) {
            killed += 1;
        }
        let got = slots(&env, &vol);
        assert!(
            got == [local(&a)] || got == [local(&b)],
            "after kill {i}: {got:?}"
        );
        check_marker(&env, &vol, None, 99).await;
    }
    assert!(killed > 0, "no rekey was ever interrupted");
}
