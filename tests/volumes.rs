//! Volumes end to end through the CLI and a real client: passphrase keyslots, the wrong
//! key or keystore, damaged header copies.

mod common;

use std::process::{Command, Output};

use common::*;

/// `cryptvol serve` expected to fail at startup (bounded by `timeout`, so a server that
/// wrongly starts fails the test instead of hanging it).
fn serve_fails(env: &Env, keystore: &std::path::Path, args: &[&str]) -> String {
    let sock = env.path("fail.sock");
    let out: Output = run(Command::new("timeout")
        .arg("20")
        .arg(bin())
        .env("CRYPTVOL_KEYSTORE", keystore)
        .args(["serve", "--unix", s(&sock)])
        .args(args));
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "serve {args:?} should fail at startup ({})",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn passphrase_volume_round_trip() {
    let env = Env::new();
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("write");
    let vol = env.create(
        "p.img",
        "16M",
        &[
            "--passphrase-file",
            s(&pass),
            "--pbkdf-memory",
            "8192",
            "--pbkdf-time",
            "1",
        ],
    );
    let info = info_json(&env, &vol);
    assert_eq!(info["keyslots"][0]["backend"], "passphrase", "{info}");
    let srv = env.serve(&[s(&vol)], &["--passphrase-file", s(&pass)], false);
    qemu_io(&srv.uri("p"), &["write -P 0x2f 4096 1M"]);
    srv.stop();
    // No passphrase, a wrong one: clear refusals.
    let err = serve_fails(&env, &env.keystore(), &[s(&vol)]);
    assert!(err.contains("passphrase"), "{err}");
    let wrong = env.path("wrong");
    std::fs::write(&wrong, "incorrect horse\n").expect("write");
    let err = serve_fails(
        &env,
        &env.keystore(),
        &["--passphrase-file", s(&wrong), s(&vol)],
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    // The right one again: data intact.
    let srv = env.serve(&[s(&vol)], &["--passphrase-file", s(&pass)], false);
    qemu_io(&srv.uri("p"), &["read -P 0x2f 4096 1M"]);
    let disk = read(&vol);
    assert!(
        !contains(&disk, b"correct horse"),
        "passphrase stored in the volume"
    );
}

#[test]
fn another_keystore_cannot_open_the_volume() {
    let env = Env::new();
    let vol = env.create("k.img", "8M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("k"), &["write -P 0x3c 0 64k"]);
    srv.stop();
    let other = Env::new();
    run_ok(other.cmd().args(["key", "create"]));
    let err = serve_fails(&env, &other.keystore(), &[s(&vol)]);
    assert!(
        err.contains("keyslot"),
        "unclear error with the wrong keystore: {err}"
    );
    let err = serve_fails(&env, &env.path("no-such-keystore"), &[s(&vol)]);
    assert!(err.contains("keyslot") || err.contains("keystore"), "{err}");
    // Still fine with the right keystore.
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("k"), &["read -P 0x3c 0 64k"]);
}

fn flip(p: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).expect("write");
}

#[test]
fn damaged_header_copies() {
    let env = Env::new();
    let vol = env.create("h.img", "8M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("h"), &["write -P 0x4d 0 64k"]);
    srv.stop();
    // Damage the primary copy's metadata: served from the secondary, reported by info.
    flip(&vol, 4096 + 10);
    let info = info_json(&env, &vol);
    assert!(
        info["header"]["primary"]
            .as_str()
            .unwrap_or("")
            .starts_with("damaged"),
        "{info}"
    );
    assert_eq!(info["header"]["healthy"], false);
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("h"), &["read -P 0x4d 0 64k"]);
    let log = srv.stop();
    // The read-write open rewrote both copies from the verified header.
    assert!(log.contains("rewrote both header copies"), "{log}");
    let info = info_json(&env, &vol);
    assert_eq!(info["header"]["healthy"], true, "repaired: {info}");
    // Both copies damaged: a clear refusal.
    flip(&vol, 4096 + 10);
    flip(&vol, 65536 + 4096 + 10);
    let err = serve_fails(&env, &env.keystore(), &[s(&vol)]);
    assert!(err.contains("damaged") || err.contains("header"), "{err}");
    let out = run(env.cmd().args(["info"]).arg(&vol));
    assert!(
        !out.status.success(),
        "info on a volume with both headers damaged succeeded"
    );
}

#[test]
fn not_a_volume_is_refused() {
    let env = Env::new();
    let junk = env.path("junk.img");
    std::fs::write(&junk, pattern(4 << 20, 1)).expect("write");
    let err = serve_fails(&env, &env.keystore(), &[s(&junk)]);
    assert!(!err.is_empty());
    let out = run(env.cmd().args(["info"]).arg(&junk));
    assert!(!out.status.success());
    // A truncated volume is refused too.
    let vol = env.create("t.img", "8M", &[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&vol)
        .expect("open");
    f.set_len((1 << 20) + (4 << 20)).expect("truncate");
    let err = serve_fails(&env, &env.keystore(), &[s(&vol)]);
    assert!(err.contains("truncated") || err.contains("short"), "{err}");
}
