//! Bounds before trust (issue 14, A5 and B4/B5/B7/B10): files a hostile user can write
//! (a volume header, a changed-chunk sidecar, a keyslot) must not make `check` call an
//! unencrypted image compliant, nor make `info`/`check`/`serve` abort or stall; and a
//! volume restored from a snapshot gets its own data key.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// Rewrites both header copies of the volume at `path` after `f` changed the metadata
/// JSON, with valid checksums: what anyone who can write the file can do (the header MAC
/// needs the data key, but `info` and `check` cannot verify it without one).
fn forge_header(path: &Path, f: &dyn Fn(&mut serde_json::Value)) {
    use sha2::{Digest, Sha256};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open volume");
    for copy in 0..2u64 {
        let mut c = vec![0u8; 65536];
        file.read_exact_at(&mut c, copy * 65536).expect("read copy");
        let len = u32::from_le_bytes(c[56..60].try_into().expect("4 bytes")) as usize;
        let mut m: serde_json::Value =
            serde_json::from_slice(&c[4096..4096 + len]).expect("metadata JSON");
        f(&mut m);
        let json = serde_json::to_vec(&m).expect("encode");
        c[4096..].fill(0);
        c[4096..4096 + json.len()].copy_from_slice(&json);
        c[56..60].copy_from_slice(&(json.len() as u32).to_le_bytes());
        c[96..128].fill(0);
        let sum = Sha256::digest(&c);
        c[96..128].copy_from_slice(&sum);
        file.write_all_at(&c, copy * 65536).expect("write copy");
    }
}

/// A volume size of 2^60 bytes with an allocation map geometry consistent with it (page
/// count, copy offsets, data offset), so that only its size betrays it.
fn forge_huge_map(m: &mut serde_json::Value) {
    let size: u64 = 1 << 60;
    let chunk = m["allocation_map"]["chunk_size"]
        .as_u64()
        .expect("chunk size");
    let pages = size.div_ceil(chunk).div_ceil(32000);
    let start = m["allocation_map"]["copy_offsets"][0]
        .as_u64()
        .expect("offset");
    m["volume"]["size"] = size.into();
    m["allocation_map"]["pages"] = pages.into();
    m["allocation_map"]["copy_offsets"] = serde_json::json!([start, start + pages * 4096]);
    m["volume"]["data_offset"] = ((start + 2 * pages * 4096).div_ceil(1 << 20) << 20).into();
}

fn status_and_stderr(cmd: &mut Command) -> (Option<i32>, String) {
    let out = run(cmd);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn forged_allocation_map_geometry_is_a_clear_error_not_an_abort() {
    let env = Env::new();
    let vol = env.create("forged.img", "16M", &[]);
    forge_header(&vol, &forge_huge_map);

    let (code, err) = status_and_stderr(env.cmd().arg("info").arg(&vol));
    assert_eq!(code, Some(1), "info: {err}");
    assert!(
        err.contains("allocation map of") && err.contains("the header is damaged or forged"),
        "{err}"
    );
    assert!(!err.contains("memory allocation"), "{err}");

    let (code, err) = status_and_stderr(env.cmd().arg("check").arg(&vol));
    assert_eq!(code, Some(1), "check: {err}");
    assert!(err.contains("1 non-compliant"), "{err}");
    let out = run(env.cmd().arg("check").arg("--json").arg(&vol));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("the header is damaged or forged"),
        "{report}"
    );
    assert!(report.contains("HEADER_INVALID"), "{report}");
    assert!(!report.contains("ALLOCATION_MAP_DAMAGED"), "{report}");
}

/// An ext4 image whose first eight bytes are the changed-chunk sidecar's magic.
fn ext4_with_sidecar_magic(path: &Path) {
    require("mkfs.ext4");
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(8 << 20).expect("size image");
    drop(f);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.write_all_at(b"CVCBT001", 0).expect("write magic");
}

#[test]
fn sidecar_magic_does_not_make_an_unencrypted_image_compliant() {
    let env = Env::new();
    // Under any name, and even named as the sidecar of a real volume beside it.
    env.create("vol.img", "8M", &[]);
    for name in ["disk.img", "vol.img.cbt"] {
        let img = env.path(name);
        ext4_with_sidecar_magic(&img);
        let out = run(env.cmd().arg("check").arg("--json").arg(&img));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stdout} {stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
        assert_eq!(v["verdict"], "NON_COMPLIANT", "{name}: {v:#}");
        assert_eq!(v["content"], "ext4", "{name}: {v:#}");
    }
}

/// `cryptvol serve` of `vol` expected to fail at startup, bounded by `timeout 30` (so a
/// stall fails the test instead of hanging it); returns its stderr and how long it took.
fn serve_fails_timed(
    env: &Env,
    vol: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (String, std::time::Duration) {
    let started = std::time::Instant::now();
    let out = run(Command::new("timeout")
        .arg("30")
        .arg(bin())
        .env("CRYPTVOL_KEYSTORE", env.keystore())
        .envs(envs.iter().copied())
        .arg("serve")
        .arg("--unix")
        .arg(env.path("fail.sock"))
        .args(extra)
        .arg(vol));
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "serve should fail at startup ({}, after {took:?}): {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{err}");
    (err, took)
}

fn passphrase_volume(env: &Env, name: &str, memory_kib: &str) -> (std::path::PathBuf, String) {
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("write");
    let pass = pass.display().to_string();
    let vol = env.create(
        name,
        "8M",
        &[
            "--passphrase-file",
            &pass,
            "--pbkdf-memory",
            memory_kib,
            "--pbkdf-time",
            "1",
            "--pbkdf-parallel",
            "1",
        ],
    );
    (vol, pass)
}

#[test]
fn forged_argon2_costs_in_a_keyslot_are_refused_before_any_work() {
    let env = Env::new();
    let (vol, pass) = passphrase_volume(&env, "p.img", "8192");
    // 4 GiB x 100 passes: within the format's bounds, hours of work for an unlock.
    forge_header(&vol, &|m| {
        m["keyslots"][0]["params"]["memory_kib"] = "4194304".into();
        m["keyslots"][0]["params"]["time"] = "100".into();
    });

    // `info` needs no key and derives nothing.
    let started = std::time::Instant::now();
    let info = run_ok(env.cmd().arg("info").arg(&vol));
    assert!(info.contains("passphrase"), "{info}");
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());

    // Without a passphrase source, passphrase slots are not tried at all.
    let (err, took) = serve_fails_timed(&env, &vol, &[], &[]);
    assert!(err.contains("no passphrase given"), "{err}");
    assert!(took.as_secs() < 20, "{took:?}");

    // With one: refused before Argon2 runs, saying what to raise.
    let (err, took) = serve_fails_timed(&env, &vol, &["--passphrase-file", &pass], &[]);
    assert!(
        err.contains("keyslot 0 (passphrase)")
            && err.contains("asks for Argon2 memory 4194304 KiB x 100 passes")
            && err.contains("--max-argon2-memory"),
        "{err}"
    );
    assert!(took.as_secs() < 20, "took {took:?}: {err}");
    // Raising the memory limit to the format's maximum still does not admit 100 passes.
    let (err, took) = serve_fails_timed(
        &env,
        &vol,
        &["--passphrase-file", &pass, "--max-argon2-memory", "4194304"],
        &[],
    );
    assert!(
        err.contains("x 100 passes, above this host's limit"),
        "{err}"
    );
    assert!(took.as_secs() < 20, "took {took:?}: {err}");
}

#[test]
fn argon2_work_of_one_unlock_is_bounded_across_keyslots() {
    let env = Env::new();
    let (vol, pass) = passphrase_volume(&env, "p.img", "8192");
    // 32 passphrase slots (the format's most), each at this host's limit (64 KiB here,
    // so that the test is fast) and 16 passes: each alone is admitted, all together are
    // not.
    forge_header(&vol, &|m| {
        let mut slot = m["keyslots"][0].clone();
        slot["params"]["memory_kib"] = "64".into();
        slot["params"]["time"] = "16".into();
        m["keyslots"] = serde_json::Value::Array(vec![slot; 32]);
    });
    let (err, _) = serve_fails_timed(
        &env,
        &vol,
        &["--passphrase-file", &pass],
        &[("CRYPTVOL_ARGON2_MAX_MEMORY", "64")],
    );
    let tried = err.matches("wrong passphrase").count();
    let refused = err
        .matches("not tried: the keyslots tried before it already used this unlock's Argon2 budget")
        .count();
    assert_eq!((tried, refused), (2, 30), "{err}");
}

#[test]
fn a_keyslot_above_the_host_argon2_limit_opens_once_the_limit_is_raised() {
    require("qemu-io");
    let env = Env::new();
    let (vol, pass) = passphrase_volume(&env, "p.img", "16384");
    let low = [("CRYPTVOL_ARGON2_MAX_MEMORY", "8192")];
    let (err, _) = serve_fails_timed(&env, &vol, &["--passphrase-file", &pass], &low);
    assert!(
        err.contains(
            "asks for Argon2 memory 16384 KiB x 1 passes, above this host's limit of 8192 KiB"
        ),
        "{err}"
    );
    // The flag wins over the environment.
    let srv = env.serve_env(
        &env.path("ok.sock"),
        &[s(&vol)],
        &["--passphrase-file", &pass, "--max-argon2-memory", "16384"],
        false,
        &low,
    );
    qemu_io(&srv.uri("p"), &["read -P 0 0 64k"]);
    srv.stop();
    // Creating a keyslot this host could not open is refused up front.
    let err = fails(
        env.cmd()
            .env("CRYPTVOL_ARGON2_MAX_MEMORY", "8192")
            .args(["create", "--size", "8M", "--passphrase-file", &pass])
            .args(["--pbkdf-memory", "16384", "--pbkdf-time", "1"])
            .arg(env.path("q.img")),
    );
    assert!(err.contains("above this host's limit"), "{err}");
}
