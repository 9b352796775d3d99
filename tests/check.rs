//! `cryptvol check`: a fleet of volumes and disk images in a temporary directory, each
//! non-compliant case flagged with its code, a clean fleet passing with exit status 0,
//! the exit statuses, a volume being served checked in place, and nothing modified.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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

/// Runs `cryptvol check --json ARGS`; returns the exit status and the reports by file
/// name.
fn check(env: &Env, args: &[&str]) -> (i32, BTreeMap<String, serde_json::Value>, String) {
    let out = run(env.cmd().arg("check").arg("--json").args(args));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut reports = BTreeMap::new();
    for line in stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON line {line}: {e}"));
        let name = Path::new(v["path"].as_str().expect("path"))
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        assert!(
            reports.insert(name.clone(), v).is_none(),
            "{name} reported twice"
        );
    }
    (out.status.code().expect("exit code"), reports, stderr)
}

fn codes(r: &serde_json::Value) -> Vec<String> {
    r["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|f| f["code"].as_str().expect("code").to_string())
        .collect()
}

fn verdict(r: &serde_json::Value) -> &str {
    r["verdict"].as_str().expect("verdict")
}

fn sha(p: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(p).expect("read")).to_vec()
}

/// SHA-256 and modification time of every regular file under `dir`.
fn fingerprints(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        let md = std::fs::symlink_metadata(&p).expect("metadata");
        if md.is_file() {
            out.insert(p.clone(), (sha(&p), md.modified().expect("mtime")));
        }
    }
    out
}

/// Moves a key's deletion date into the past, as tests/keys_states.rs does.
fn expire(env: &Env, id: &str) {
    let path = env.keystore().join(format!("{id}.json"));
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("key file")).expect("json");
    v["deletion_unix"] = 1.into();
    std::fs::write(&path, v.to_string()).expect("write");
}

/// Makes every material version of a key look created in 2020.
fn age_key(env: &Env, id: &str) {
    let path = env.keystore().join(format!("{id}.json"));
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("key file")).expect("json");
    for m in v["materials"].as_array_mut().expect("materials") {
        m["created_at"] = "2020-01-01T00:00:00Z".into();
    }
    std::fs::write(&path, v.to_string()).expect("write");
}

fn qemu_img(args: &[&str]) {
    run_ok(Command::new("qemu-img").args(args));
}

#[test]
fn a_fleet_is_checked_case_by_case() {
    require("qemu-img");
    require("mkfs.ext4");
    let env = Env::new();
    let fleet = env.path("fleet");
    std::fs::create_dir(&fleet).expect("mkdir");
    let f = |name: &str| format!("fleet/{name}");

    let prod = key_create(&env, "alias/prod");
    key_create(&env, "alias/off");
    let doomed = key_create(&env, "alias/doomed");
    let gone = key_create(&env, "alias/gone");
    env.create(&f("good1.img"), "4M", &["--key", "alias/prod"]);
    env.create(&f("good2.img"), "4M", &["--key", &prod]);
    env.create(&f("default.img"), "4M", &[]);
    env.create(&f("disabled.img"), "4M", &["--key", "alias/off"]);
    env.create(&f("pending.img"), "4M", &["--key", "alias/doomed"]);
    env.create(&f("missing.img"), "4M", &["--key", "alias/gone"]);
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("write");
    let pass_img = env.path(&f("pass.img"));
    run_ok(
        env.cmd()
            .args([
                "create",
                "--size",
                "4M",
                "--pbkdf-memory",
                "8192",
                "--pbkdf-time",
                "1",
                "--passphrase-file",
            ])
            .arg(&pass)
            .arg(&pass_img),
    );
    let damaged = env.create(&f("damaged.img"), "4M", &["--key", "alias/prod"]);
    let both = env.create(&f("both.img"), "4M", &["--key", "alias/prod"]);
    let version = env.create(&f("version.img"), "4M", &["--key", "alias/prod"]);
    let raw = env.path(&f("disk.raw"));
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "32M"]);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", s(&raw)]));
    let qcow = env.path(&f("disk.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", s(&qcow), "64M"]);
    let zeros = env.path(&f("zeros.img"));
    std::fs::File::create(&zeros)
        .expect("create")
        .set_len(8 << 20)
        .expect("truncate");
    std::fs::write(env.path(&f("empty")), b"").expect("write");

    // Key states, through the ordinary key commands.
    run_ok(env.cmd().args(["key", "disable", "alias/off"]));
    run_ok(
        env.cmd()
            .args(["key", "schedule-deletion", &doomed, "--days", "7"]),
    );
    run_ok(
        env.cmd()
            .args(["key", "schedule-deletion", &gone, "--days", "7"]),
    );
    expire(&env, &gone);
    let out = run_ok(env.cmd().args(["key", "purge"]));
    assert!(out.contains(&gone), "{out}");
    // A byte of the primary copy's padding (inside the first 64 KiB): checksum mismatch.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&damaged)
        .expect("open");
    file.write_at(&[0x5a], 1000).expect("write");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&both)
        .expect("open");
    file.write_at(&[0x5a], 1000).expect("write");
    file.write_at(&[0x5a], 65536 + 1000).expect("write");
    // Format version 2 in both copies.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&version)
        .expect("open");
    file.write_at(&2u32.to_le_bytes(), 8).expect("write");
    file.write_at(&2u32.to_le_bytes(), 65536 + 8)
        .expect("write");
    drop(file);

    let before = fingerprints(&fleet);
    let keystore_before = fingerprints(&env.keystore());
    let (status, r, stderr) = check(&env, &[s(&fleet)]);
    // Describe calls only: no key file, alias table or audit record changed.
    assert_eq!(fingerprints(&env.keystore()), keystore_before);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("non-compliant"), "{stderr}");
    let expect: &[(&str, &str, &[&str])] = &[
        ("good1.img", "COMPLIANT", &[]),
        ("good2.img", "COMPLIANT", &[]),
        // The default key is fine until a customer key is required.
        ("default.img", "COMPLIANT", &[]),
        ("disabled.img", "NON_COMPLIANT", &["KEY_DISABLED"]),
        ("pending.img", "NON_COMPLIANT", &["KEY_PENDING_DELETION"]),
        ("missing.img", "NON_COMPLIANT", &["KEY_MISSING"]),
        ("pass.img", "NON_COMPLIANT", &["PASSPHRASE_ONLY"]),
        ("damaged.img", "NON_COMPLIANT", &["HEADER_COPY_DAMAGED"]),
        ("both.img", "NON_COMPLIANT", &["HEADER_BOTH_COPIES_DAMAGED"]),
        ("version.img", "NON_COMPLIANT", &["UNSUPPORTED_VERSION"]),
        ("disk.raw", "NON_COMPLIANT", &["NOT_A_VOLUME"]),
        ("disk.qcow2", "NON_COMPLIANT", &["NOT_A_VOLUME"]),
        ("zeros.img", "NON_COMPLIANT", &["NOT_A_VOLUME"]),
        ("empty", "NON_COMPLIANT", &["NOT_A_VOLUME"]),
    ];
    assert_eq!(r.len(), expect.len(), "{r:#?}");
    for (name, want_verdict, want_codes) in expect {
        let rep = r
            .get(*name)
            .unwrap_or_else(|| panic!("{name} not reported"));
        assert_eq!(verdict(rep), *want_verdict, "{name}: {rep}");
        assert_eq!(codes(rep), *want_codes, "{name}: {rep}");
    }
    // Content detection and the details of the findings.
    assert_eq!(r["disk.raw"]["content"], "ext4");
    assert_eq!(r["disk.qcow2"]["content"], "qcow2");
    assert_eq!(r["zeros.img"]["content"], "zeros");
    assert_eq!(r["empty"]["content"], "empty");
    let msg = |name: &str| {
        r[name]["reasons"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        msg("disk.raw").contains("ext4 filesystem"),
        "{}",
        msg("disk.raw")
    );
    assert!(msg("disk.qcow2").contains("qcow2"), "{}", msg("disk.qcow2"));
    assert!(
        msg("damaged.img").contains("primary"),
        "{}",
        msg("damaged.img")
    );
    assert!(
        msg("pending.img").contains("destroyed after"),
        "{}",
        msg("pending.img")
    );
    assert!(msg("missing.img").contains(&gone), "{}", msg("missing.img"));
    assert_eq!(r["damaged.img"]["header"]["secondary"], "ok");
    assert_eq!(r["good1.img"]["keyslots"][0]["key_id"], prod.as_str());
    assert_eq!(r["good1.img"]["keyslots"][0]["key_state"], "Enabled");
    assert_eq!(r["disabled.img"]["keyslots"][0]["key_state"], "Disabled");
    assert_eq!(r["missing.img"]["keyslots"][0]["key_state"], "Missing");
    assert_eq!(r["pass.img"]["keyslots"][0]["backend"], "passphrase");
    assert!(r["good1.img"]["volume_uuid"]
        .as_str()
        .is_some_and(|u| u.len() == 36));
    assert_eq!(r["disabled.img"]["reasons"][0]["keyslot"], 0);

    // A customer key is required: the default-key volume is flagged, and every other
    // volume too except those under alias/prod.
    let (status, r, _) = check(&env, &["--require-key", "alias/prod", s(&fleet)]);
    assert_eq!(status, 1);
    assert_eq!(
        codes(&r["default.img"]),
        ["DEFAULT_KEY", "KEY_NOT_REQUIRED"]
    );
    assert_eq!(verdict(&r["good1.img"]), "COMPLIANT");
    assert_eq!(verdict(&r["good2.img"]), "COMPLIANT");
    assert_eq!(
        codes(&r["disabled.img"]),
        ["KEY_DISABLED", "KEY_NOT_REQUIRED", "KEY_NOT_REQUIRED"]
    );
    assert_eq!(
        codes(&r["pass.img"]),
        ["PASSPHRASE_ONLY", "KEY_NOT_REQUIRED"]
    );
    // The key id works as well as the alias; an ARN-style or unknown key is a usage error.
    let (status, r, _) = check(&env, &["--require-key", &prod, s(&fleet)]);
    assert_eq!((status, verdict(&r["good2.img"])), (1, "COMPLIANT"));
    let (status, r, stderr) = check(&env, &["--require-key", "alias/nope", s(&fleet)]);
    assert_eq!(status, 2);
    assert!(r.is_empty() && stderr.contains("alias/nope"), "{stderr}");
    // --no-default-key alone.
    let (_, r, _) = check(&env, &["--no-default-key", s(&fleet)]);
    assert_eq!(codes(&r["default.img"]), ["DEFAULT_KEY"]);
    assert_eq!(verdict(&r["good1.img"]), "COMPLIANT");

    // Rotation: --max-key-age 0 makes every key overdue.
    let (_, r, _) = check(&env, &["--max-key-age", "0", s(&fleet)]);
    assert_eq!(codes(&r["good1.img"]), ["KEY_ROTATION_OVERDUE"]);
    // --require-rotation: a key whose only material is from 2020 has rotation off; once
    // rotated it is compliant again.
    let (_, r, _) = check(&env, &["--require-rotation", s(&fleet)]);
    assert_eq!(verdict(&r["good1.img"]), "COMPLIANT");
    age_key(&env, &prod);
    let (_, r, _) = check(&env, &["--require-rotation", s(&fleet)]);
    assert_eq!(codes(&r["good1.img"]), ["KEY_ROTATION_OFF"]);
    assert_eq!(codes(&r["good2.img"]), ["KEY_ROTATION_OFF"]);
    run_ok(env.cmd().args(["key", "rotate", "alias/prod"]));
    let (_, r, _) = check(&env, &["--require-rotation", s(&fleet)]);
    assert_eq!(verdict(&r["good1.img"]), "COMPLIANT");
    let (_, r, _) = check(
        &env,
        &["--require-rotation", "--max-key-age", "0", s(&fleet)],
    );
    assert_eq!(codes(&r["good1.img"]), ["KEY_ROTATION_OVERDUE"]);

    // Nothing was modified by any of the scans.
    assert_eq!(fingerprints(&fleet), before);
}

#[test]
fn a_clean_fleet_passes_also_while_served_and_errors_exit_2() {
    require("qemu-io");
    let env = Env::new();
    let fleet = env.path("fleet");
    std::fs::create_dir_all(fleet.join("sub")).expect("mkdir");
    key_create(&env, "alias/prod");
    let a = env.create("fleet/a.img", "8M", &["--key", "alias/prod"]);
    env.create("fleet/sub/b.img", "8M", &["--key", "alias/prod"]);
    // A recovery passphrase next to the key is fine.
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("write");
    run_ok(
        env.cmd()
            .args(["keyslot", "add"])
            .arg(&a)
            .args(["--pbkdf-memory", "8192", "--pbkdf-time", "1"])
            .arg("--passphrase-file")
            .arg(&pass),
    );
    // A Unix socket in the fleet directory is listed as skipped, not a failure.
    let srv = env.serve_on(&fleet.join("nbd.sock"), &[s(&a)], &[], false);
    qemu_io(&srv.uri("a"), &["write -P 0x42 0 1M"]);

    let before = sha(&a);
    let (status, r, stderr) = check(
        &env,
        &["--require-key", "alias/prod", "--no-default-key", s(&fleet)],
    );
    assert_eq!(status, 0, "{r:#?} {stderr}");
    assert_eq!(verdict(&r["a.img"]), "COMPLIANT");
    assert_eq!(verdict(&r["b.img"]), "COMPLIANT");
    assert_eq!(verdict(&r["nbd.sock"]), "SKIPPED");
    // The served volume's changed-chunk tracking file is recognised and skipped too.
    assert_eq!(verdict(&r["a.img.cbt"]), "SKIPPED");
    assert_eq!(r["a.img.cbt"]["content"], "cbt");
    assert_eq!(r["a.img"]["keyslots"][1]["backend"], "passphrase");
    assert!(
        stderr.contains("4 item(s): 2 compliant, 0 non-compliant, 0 error(s), 2 skipped"),
        "{stderr}"
    );
    // The served volume still works and was not touched by the check.
    qemu_io(&srv.uri("a"), &["read -P 0x42 0 1M"]);
    srv.stop();
    assert_eq!(sha(&a), before);

    // Human output: one line per item.
    let out = run(env.cmd().arg("check").arg(&a));
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("a.img: COMPLIANT"), "{text}");

    // Something that cannot be checked: exit status 2, even next to compliant volumes.
    std::os::unix::fs::symlink(env.path("nowhere"), fleet.join("dangling.img")).expect("ln");
    let (status, r, _) = check(&env, &[s(&fleet)]);
    assert_eq!(status, 2);
    assert_eq!(verdict(&r["dangling.img"]), "ERROR");
    assert_eq!(codes(&r["dangling.img"]), ["SCAN_ERROR"]);
    let (status, r, _) = check(&env, &[s(&env.path("does-not-exist"))]);
    assert_eq!((status, verdict(&r["does-not-exist"])), (2, "ERROR"));
    // Usage errors: 2.
    let out = run(env.cmd().arg("check"));
    assert_eq!(out.status.code(), Some(2));
    let out = run(env.cmd().args(["check", "--max-key-age", "soon", "x"]));
    assert_eq!(out.status.code(), Some(2));
}
