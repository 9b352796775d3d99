//! `cryptvol break-glass`: the data key written to a pipe decrypts the volume file as
//! dm-crypt `aes-xts-plain64` with the printed geometry would (checked here with an
//! independent AES-XTS, OpenSSL's through python3-cryptography, sector by sector with the
//! tweak the printed options give; the kernel VM test maps a volume file with the real
//! dm-crypt and mounts it), the audit record, and the refusals: a disabled key, a caller
//! who neither is root nor owns the file, a terminal, standard descriptors, a readable file.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

const MIB: usize = 1024 * 1024;

/// Runs break-glass on `vol` with the key going into a pipe (read by `cat` into
/// `key_out`); returns the JSON it printed.
fn break_glass_pipe(env: &Env, vol: &Path, key_out: &Path) -> serde_json::Value {
    let json = env.path("bg.json");
    run_ok(
        env.sh()
            .arg("-c")
            .arg(r#"umask 077; "$0" break-glass --json "$1" --dek-fd 3 3>&1 >"$2" | cat > "$3""#)
            .arg(bin())
            .arg(vol)
            .arg(&json)
            .arg(key_out),
    );
    let text = std::fs::read_to_string(&json).expect("break-glass output");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// `sh` with the env's keystore (for pipelines).
trait ShellCmd {
    fn sh(&self) -> Command;
}

impl ShellCmd for Env {
    fn sh(&self) -> Command {
        let mut c = Command::new("sh");
        c.env("CRYPTVOL_KEYSTORE", self.keystore())
            .env("RUST_LOG", "info");
        c
    }
}

/// Decrypts sector `n` (of `sector_size` bytes) of the data area the printed options
/// name (`--offset` in 512-byte sectors), with the tweak dm-crypt plain64 uses: the
/// sector number in `--sector-size` units with `--iv-large-sectors`, else in 512-byte units.
fn decrypt_sector(file: &Path, key: &Path, line: &str, n: u64) -> Vec<u8> {
    let opt = |name: &str| -> u64 {
        let w: Vec<&str> = line.split_whitespace().collect();
        let i = w
            .iter()
            .position(|x| *x == name)
            .unwrap_or_else(|| panic!("{name} missing in {line}"));
        w[i + 1].parse().expect("number")
    };
    let ss = opt("--sector-size");
    let offset = opt("--offset") * 512 + n * ss;
    let iv = if line.contains("--iv-large-sectors") {
        n
    } else {
        n * ss / 512
    };
    let script = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = open(sys.argv[1], 'rb').read()
assert len(key) == 64, len(key)
f = open(sys.argv[2], 'rb'); f.seek(int(sys.argv[3])); ct = f.read(int(sys.argv[4]))
d = Cipher(algorithms.AES(key), modes.XTS(int(sys.argv[5]).to_bytes(16, 'little'))).decryptor()
sys.stdout.buffer.write(d.update(ct) + d.finalize())
"#;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(key)
        .arg(file)
        .arg(offset.to_string())
        .arg(ss.to_string())
        .arg(iv.to_string()));
    assert!(
        out.status.success(),
        "python3 AES-XTS failed (install python3-cryptography): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn audit(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l}: {e}")))
        .collect()
}

/// Imports `len` bytes of pattern into a new volume of `sector` bytes per sector.
fn imported(
    env: &Env,
    name: &str,
    sector: &str,
    len: usize,
    seed: u64,
) -> (std::path::PathBuf, Vec<u8>) {
    let src = env.path(&format!("{name}.raw"));
    let data = pattern(len, seed);
    std::fs::write(&src, &data).expect("write source");
    let vol = env.path(name);
    run_ok(
        env.cmd()
            .args(["import", "--sector-size", sector])
            .arg(&src)
            .arg(&vol),
    );
    (vol, data)
}

#[test]
fn the_key_from_a_pipe_decrypts_the_file_as_the_printed_dm_crypt_options_say() {
    let env = Env::new();
    for (sector, large) in [("4096", true), ("512", false)] {
        let name = format!("v{sector}.img");
        let (vol, data) = imported(&env, &name, sector, 4 * MIB, 11);
        let key = env.path(&format!("{name}.key"));
        let v = break_glass_pipe(&env, &vol, &key);
        assert_eq!(std::fs::metadata(&key).unwrap().len(), 64, "{v}");
        let line = v["cryptsetup"]
            .as_str()
            .expect("cryptsetup line")
            .to_string();
        let ss: u64 = sector.parse().unwrap();
        assert!(
            line.starts_with(
                "cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 "
            ),
            "{line}"
        );
        assert!(line.contains(&format!("--sector-size {sector}")), "{line}");
        assert!(
            line.contains(&format!("--size {}", 4 * MIB / 512)),
            "{line}"
        );
        assert_eq!(line.contains("--iv-large-sectors"), large, "{line}");
        assert!(line.contains("--readonly"), "{line}");
        let table = v["dm_table"].as_str().expect("table");
        assert_eq!(
            table.ends_with(" 2 sector_size:4096 iv_large_sectors"),
            large,
            "{table}"
        );
        let last = (4 * MIB) as u64 / ss - 1;
        for n in [0, 1, 7, 100, last] {
            let plain = decrypt_sector(&vol, &key, &line, n);
            let at = (n * ss) as usize;
            assert!(
                plain == data[at..at + ss as usize],
                "{sector}-byte sector {n} does not decrypt to what was imported ({line})"
            );
        }
        // The audit log names the volume, the user and that the key left cryptvol.
        let uuid = info_json(&env, &vol)["uuid"].as_str().unwrap().to_string();
        let recs = audit(&env.keystore().join("audit.jsonl"));
        let bg: Vec<_> = recs
            .iter()
            .filter(|r| r["operation"] == "break-glass" && r["volume_uuid"] == uuid.as_str())
            .collect();
        assert_eq!(bg.len(), 1, "{recs:?}");
        assert_eq!(bg[0]["result"], "ok");
        assert_eq!(bg[0]["principal"], "root");
        let detail = bg[0]["detail"].as_str().unwrap();
        assert!(
            detail.contains("left cryptvol") && detail.contains("pipe"),
            "{detail}"
        );
        assert!(
            recs.iter().any(|r| r["operation"] == "break-glass-unwrap"
                && r["volume_uuid"] == uuid.as_str()
                && r["result"] == "ok"),
            "{recs:?}"
        );
    }
}

#[test]
fn a_disabled_key_refuses_and_nothing_is_written() {
    let env = Env::new();
    run_ok(env.cmd().args(["key", "create", "--alias", "alias/bg"]));
    let vol = env.create("v.img", "8M", &["--key", "alias/bg"]);
    run_ok(env.cmd().args(["key", "disable", "alias/bg"]));
    let key = env.path("k");
    let out = run(env
        .sh()
        .arg("-c")
        .arg(r#"umask 077; "$0" break-glass "$1" --dek-fd 3 3>"$2""#)
        .arg(bin())
        .arg(&vol)
        .arg(&key));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("disabled"), "{err}");
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 0);
    let recs = audit(&env.keystore().join("audit.jsonl"));
    assert!(
        recs.iter()
            .any(|r| r["operation"] == "break-glass-unwrap" && r["result"] == "error"),
        "{recs:?}"
    );
    assert!(
        !recs.iter().any(|r| r["operation"] == "break-glass"),
        "{recs:?}"
    );
}

#[test]
fn terminals_standard_descriptors_and_readable_files_are_refused() {
    require("script");
    let env = Env::new();
    let vol = env.create("v.img", "8M", &[]);
    // fd 1 without --allow-std-fd.
    let err = fails(
        env.cmd()
            .arg("break-glass")
            .arg(&vol)
            .args(["--dek-fd", "1"]),
    );
    assert!(err.contains("--allow-std-fd"), "{err}");
    // fd 1 on a terminal, even when allowed.
    let cmd = format!(
        "'{}' break-glass '{}' --dek-fd 1 --allow-std-fd; echo status=$?",
        bin().display(),
        vol.display()
    );
    let out = run_ok(env.cmd_script().args(["-qec", &cmd, "/dev/null"]));
    assert!(out.contains("is a terminal"), "{out}");
    assert!(out.contains("status=1"), "{out}");
    // A file others may read.
    let key = env.path("k");
    std::fs::write(&key, b"").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(env
        .sh()
        .arg("-c")
        .arg(r#""$0" break-glass "$1" --dek-fd 3 3>"$2""#)
        .arg(bin())
        .arg(&vol)
        .arg(&key));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("group or others may read"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 0);
}

#[test]
fn a_user_who_does_not_own_the_volume_is_refused() {
    let env = Env::new();
    let vol = env.create("v.img", "8M", &[]);
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (uid, gid) = ensure_test_user();
    let out = run(Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(r#""$0" break-glass "$1" --keystore /nonexistent --dek-fd 3 3>/dev/null"#)
        .arg(bin())
        .arg(&vol));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("only root or the owner of the volume file (uid 0)"),
        "{err}"
    );
}

trait ScriptCmd {
    fn cmd_script(&self) -> Command;
}

impl ScriptCmd for Env {
    /// `script` (a pseudo-terminal) with the env's keystore.
    fn cmd_script(&self) -> Command {
        let mut c = Command::new("script");
        c.env("CRYPTVOL_KEYSTORE", self.keystore());
        c
    }
}

/// `cryptvol key create --json --alias ALIAS` in the keystore `ks`; the key id.
fn key_in(env: &Env, ks: &Path, alias: &str) -> String {
    let out = run_ok(
        env.cmd()
            .args(["key", "create", "--json", "--alias", alias, "--keystore"])
            .arg(ks),
    );
    serde_json::from_str::<serde_json::Value>(&out).expect("json")["key_id"]
        .as_str()
        .expect("id")
        .to_string()
}

#[test]
fn the_owner_needs_the_key_policy_unwrap_grant() {
    let (uid, gid) = ensure_test_user();
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin_copy = env.path("cryptvol");
    std::fs::copy(bin(), &bin_copy).expect("copy the binary");
    std::fs::set_permissions(&bin_copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A keystore shared read-only with the user's group (as in tests/keys_policy.rs).
    let ks = env.keystore();
    std::fs::create_dir(&ks).expect("mkdir");
    std::os::unix::fs::chown(&ks, Some(0), Some(gid)).expect("chown");
    std::fs::set_permissions(&ks, std::fs::Permissions::from_mode(0o2750)).unwrap();
    key_in(&env, &ks, "alias/granted");
    let other = key_in(&env, &ks, "alias/other");
    run_ok(
        env.cmd()
            .args([
                "key",
                "grant",
                "alias/granted",
                "--principal",
                "cryptvol-test",
            ])
            .args(["--operations", "unwrap", "--keystore"])
            .arg(&ks),
    );
    let userdir = env.path("user");
    std::fs::create_dir(&userdir).expect("mkdir");
    std::os::unix::fs::chown(&userdir, Some(uid), Some(gid)).expect("chown");
    let mut vols = Vec::new();
    for (name, key) in [
        ("granted.img", "alias/granted"),
        ("other.img", "alias/other"),
    ] {
        let v = env.path(name);
        run_ok(
            env.cmd()
                .args(["create", "--size", "8M", "--key", key, "--keystore"])
                .arg(&ks)
                .arg(&v),
        );
        std::os::unix::fs::chown(&v, Some(uid), Some(gid)).expect("chown");
        vols.push(v);
    }
    let audit_log = userdir.join("audit.jsonl");
    let as_user = |vol: &Path, key: &Path| {
        run(Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--init-groups")
            .arg("--")
            .arg("sh")
            .arg("-c")
            .arg(r#"umask 077; "$0" break-glass "$1" --keystore "$2" --audit-log "$3" --dek-fd 3 3>"$4""#)
            .arg(&bin_copy)
            .arg(vol)
            .arg(&ks)
            .arg(&audit_log)
            .arg(key)
            .env_remove("CRYPTVOL_KEYSTORE"))
    };
    // The owner, granted unwrap: the key comes out.
    let key = userdir.join("granted.key");
    let out = as_user(&vols[0], &key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 64);
    // The owner of a volume under a key the policy does not grant: refused.
    let key = userdir.join("other.key");
    let out = as_user(&vols[1], &key);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("access denied") && err.contains(&other) && err.contains("unwrap"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&key).unwrap().len(), 0);
    let recs = audit(&audit_log);
    assert!(
        recs.iter().any(|r| r["operation"] == "break-glass-unwrap"
            && r["error"] == "AccessDenied"
            && r["uid"] == uid),
        "{recs:?}"
    );
    let ok: Vec<_> = recs
        .iter()
        .filter(|r| r["operation"] == "break-glass")
        .collect();
    assert_eq!(ok.len(), 1, "one key left cryptvol: {recs:?}");
    assert_eq!(ok[0]["principal"], "cryptvol-test");
}
