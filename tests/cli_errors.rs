//! The command line on good and bad input: every refusal is clear and changes nothing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{fails, info_json, run_ok, Env};
use cryptvol::keys::{EncryptionContext, KeyBackend, KeyError, LocalKeystore};

fn sha(p: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(p).expect("read")).to_vec()
}

fn corrupt(p: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open");
    f.write_all_at(b"garbage!garbage!", offset).expect("write");
}

#[test]
fn create_then_info_json_on_a_fresh_keystore() {
    let env = Env::new();
    assert!(!env.keystore().exists());
    let v = env.create("v.img", "64M", &[]);
    let json = run_ok(env.cmd().args(["info", "--json"]).arg(&v));
    let info: serde_json::Value = serde_json::from_str(&json).expect("info --json is JSON");
    assert_eq!(info["size"], 64 << 20);
    assert_eq!(info["sector_size"], 4096);
    assert_eq!(info["cipher"], "aes-xts-plain64");
    assert_eq!(info["header"]["healthy"], true);
    assert_eq!(info["keyslots"][0]["backend"], "local");
    let key_id = info["keyslots"][0]["key_id"]
        .as_str()
        .expect("key id")
        .to_string();
    assert!(key_id.starts_with("mk-"), "{key_id}");
    // The default key was created on first use, with its alias.
    let list = run_ok(env.cmd().args(["key", "list", "--json"]));
    assert!(
        list.contains(&key_id) && list.contains("alias/cryptvol/default"),
        "{list}"
    );
    // Keystore permissions.
    let mode = std::fs::metadata(env.keystore())
        .expect("keystore")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    // info never prints key material: no base64 blob of the wrapped key either.
    assert!(
        !json.contains("blob") && !json.contains("material"),
        "{json}"
    );
    // File is header area + data area, sparse.
    let len = std::fs::metadata(&v).expect("meta").len();
    assert_eq!(len, (1 << 20) + (64 << 20));
}

#[test]
fn sector_size_512_and_sizes_with_units() {
    let env = Env::new();
    let v = env.create("v.img", "1.5M", &["--sector-size", "512"]);
    let info: serde_json::Value =
        serde_json::from_str(&run_ok(env.cmd().args(["info", "--json"]).arg(&v))).expect("json");
    assert_eq!(info["size"], 3 << 19);
    assert_eq!(info["sector_size"], 512);
    let err = fails(
        env.cmd()
            .args(["create", "--size", "64M", "--sector-size", "1024"])
            .arg(env.path("x.img")),
    );
    assert!(err.contains("4096 or 512"), "{err}");
}

#[test]
fn size_not_a_multiple_of_the_sector_size_is_refused() {
    let env = Env::new();
    let p = env.path("odd.img");
    let err = fails(env.cmd().args(["create", "--size", "10000"]).arg(&p));
    assert!(err.contains("multiple of the sector size"), "{err}");
    assert!(!p.exists(), "a refused create left a file behind");
    // With a unit there is no GiB hint (the size was clearly meant in bytes).
    let err = fails(env.cmd().args(["create", "--size", "10001K"]).arg(&p));
    assert!(err.contains("multiple of the sector size"), "{err}");
    assert!(!err.contains("GiB"), "{err}");
    assert!(!p.exists(), "a refused create left a file behind");
}

/// The EBS habit: `aws ec2 create-volume --size 100 --encrypted --kms-key-id …` counts
/// the size in GiB and asks for encryption. A bare 100 gets a hint naming 100G, and
/// `--encrypted` is accepted (every volume is encrypted).
#[test]
fn ebs_habits_get_a_size_hint_and_encrypted_is_accepted() {
    let env = Env::new();
    let p = env.path("ebs.img");
    let err = fails(
        env.cmd()
            .args(["create", "--size", "100", "--encrypted"])
            .arg(&p),
    );
    assert!(
        err.contains("size 100 is not a positive multiple of the sector size 4096")
            && err.contains("--size 100G"),
        "{err}"
    );
    assert!(!p.exists(), "a refused create left a file behind");
    run_ok(
        env.cmd()
            .args(["create", "--size", "4M", "--encrypted"])
            .arg(&p),
    );
    assert_eq!(info_json(&env, &p)["size"], 4 << 20);
}

#[test]
fn existing_file_is_not_overwritten() {
    let env = Env::new();
    let p = env.path("precious.img");
    std::fs::write(&p, b"precious data").expect("write");
    let err = fails(env.cmd().args(["create", "--size", "1M"]).arg(&p));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&p).expect("read"), b"precious data");
}

#[test]
fn a_file_that_is_not_a_volume() {
    let env = Env::new();
    let p = env.path("disk.raw");
    std::fs::write(&p, common::pattern(3 << 20, 7)).expect("write");
    let before = sha(&p);
    let err = fails(env.cmd().arg("info").arg(&p));
    assert!(err.contains("not a cryptvol volume"), "{err}");
    let err = fails(
        env.cmd()
            .args(["serve", "--unix"])
            .arg(env.path("s.sock"))
            .arg(&p),
    );
    assert!(err.contains("not a cryptvol volume"), "{err}");
    assert_eq!(sha(&p), before, "a refused open changed the file");
}

#[test]
fn truncated_volume() {
    let env = Env::new();
    let v = env.create("v.img", "4M", &[]);
    // Cut into the data area: header fine, data short.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v)
        .expect("open");
    f.set_len((1 << 20) + 4096).expect("truncate");
    drop(f);
    let before = sha(&v);
    let err = fails(
        env.cmd()
            .args(["serve", "--unix"])
            .arg(env.path("s.sock"))
            .arg(&v),
    );
    assert!(err.contains("truncated"), "{err}");
    // Cut into the header area.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v)
        .expect("open");
    f.set_len(30_000).expect("truncate");
    drop(f);
    let err = fails(env.cmd().arg("info").arg(&v));
    assert!(err.contains("truncated"), "{err}");
    assert_ne!(sha(&v), before);
}

#[test]
fn corrupt_primary_header_opens_from_the_secondary_and_says_so() {
    let env = Env::new();
    let v = env.create("v.img", "4M", &[]);
    corrupt(&v, 100);
    let info: serde_json::Value =
        serde_json::from_str(&run_ok(env.cmd().args(["info", "--json"]).arg(&v))).expect("json");
    assert!(
        info["header"]["primary"]
            .as_str()
            .expect("str")
            .starts_with("damaged"),
        "{info}"
    );
    assert_eq!(info["header"]["secondary"], "ok");
    assert_eq!(info["header"]["healthy"], false);
    let text = run_ok(env.cmd().arg("info").arg(&v));
    assert!(text.contains("primary damaged"), "{text}");
    let s = env.serve(&[v.to_str().expect("utf8")], &[], false);
    let log = s.stop();
    assert!(log.contains("primary header copy is damaged"), "{log}");
}

#[test]
fn both_header_copies_corrupt() {
    let env = Env::new();
    let v = env.create("v.img", "4M", &[]);
    corrupt(&v, 100);
    corrupt(&v, 65536 + 100);
    let before = sha(&v);
    let err = fails(env.cmd().arg("info").arg(&v));
    assert!(err.contains("both header copies are damaged"), "{err}");
    let err = fails(
        env.cmd()
            .args(["serve", "--unix"])
            .arg(env.path("s.sock"))
            .arg(&v),
    );
    assert!(err.contains("both header copies are damaged"), "{err}");
    assert_eq!(sha(&v), before);
}

#[test]
fn passphrase_volume_right_and_wrong_passphrase() {
    let env = Env::new();
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("write");
    let v = env.path("p.img");
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
            .arg(&v),
    );
    let info = run_ok(env.cmd().arg("info").arg(&v));
    assert!(info.contains("0: passphrase"), "{info}");
    // No passphrase given: clear message, naming the option.
    let err = fails(
        env.cmd()
            .args(["serve", "--unix"])
            .arg(env.path("s.sock"))
            .arg(&v),
    );
    assert!(
        err.contains("no passphrase given") && err.contains("--passphrase-file"),
        "{err}"
    );
    // Wrong passphrase.
    let wrong = env.path("wrong");
    std::fs::write(&wrong, "Tr0ub4dor&3\n").expect("write");
    let before = sha(&v);
    let err = fails(
        env.cmd()
            .args(["serve", "--unix"])
            .arg(env.path("s.sock"))
            .arg("--passphrase-file")
            .arg(&wrong)
            .arg(&v),
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    assert_eq!(sha(&v), before);
    // Right passphrase: serves.
    let s = env.serve(
        &[v.to_str().expect("utf8")],
        &["--passphrase-file", pass.to_str().expect("utf8")],
        false,
    );
    let out = run_ok(Command::new("nbdinfo").args(["--size", &s.uri("p")]));
    assert_eq!(out.trim(), (4 << 20).to_string());
    s.stop();
}

#[test]
fn missing_and_unsafe_keystores() {
    let env = Env::new();
    let v = env.create("v.img", "4M", &[]);
    // Missing keystore: serve names the path and how to create one.
    let other = env.path("nokeys");
    let err = fails(
        env.cmd()
            .env("CRYPTVOL_KEYSTORE", &other)
            .args(["serve", "--unix"])
            .arg(env.path("s.sock"))
            .arg(&v),
    );
    assert!(err.contains(other.to_str().expect("utf8")), "{err}");
    // A keystore others can read is refused, with the fix in the message.
    std::fs::set_permissions(env.keystore(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let err = fails(
        env.cmd()
            .args(["serve", "--unix"])
            .arg(env.path("s.sock"))
            .arg(&v),
    );
    assert!(err.contains("chmod"), "{err}");
    let err = fails(env.cmd().args(["key", "list"]));
    assert!(err.contains("chmod"), "{err}");
    std::fs::set_permissions(env.keystore(), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    run_ok(env.cmd().args(["key", "list"]));
}

#[test]
fn unknown_key_id_and_aliases() {
    let env = Env::new();
    let err = fails(
        env.cmd()
            .args([
                "create",
                "--size",
                "4M",
                "--key",
                "mk-00000000000000000000000000000000",
            ])
            .arg(env.path("a.img")),
    );
    assert!(
        err.contains("mk-00000000000000000000000000000000") && err.contains("not found"),
        "{err}"
    );
    let err = fails(
        env.cmd()
            .args(["create", "--size", "4M", "--key", "alias/nope"])
            .arg(env.path("a.img")),
    );
    assert!(err.contains("alias/nope"), "{err}");
    assert!(!env.path("a.img").exists());
    // A named key through its alias, and --kms-key-id as a synonym of --key.
    let created = run_ok(
        env.cmd()
            .args(["key", "create", "--alias", "alias/db", "--json"]),
    );
    let k: serde_json::Value = serde_json::from_str(&created).expect("json");
    let id = k["key_id"].as_str().expect("id").to_string();
    let v = env.path("db.img");
    run_ok(
        env.cmd()
            .args(["create", "--size", "4M", "--kms-key-id", "alias/db"])
            .arg(&v),
    );
    let info: serde_json::Value =
        serde_json::from_str(&run_ok(env.cmd().args(["info", "--json"]).arg(&v))).expect("json");
    assert_eq!(
        info["keyslots"][0]["key_id"],
        id.as_str(),
        "the keyslot stores the resolved id, never the alias"
    );
    let err = fails(env.cmd().args(["key", "create", "--alias", "alias/db"]));
    assert!(err.contains("alias/db"), "{err}");
}

#[tokio::test]
async fn two_volumes_same_key_have_different_deks_and_keyslots_do_not_move() {
    let env = Env::new();
    let a = env.create("a.img", "4M", &[]);
    let b = env.create("b.img", "4M", &[]);
    let (ha, _) = cryptvol::volume::read_header(&a).expect("header a");
    let (hb, _) = cryptvol::volume::read_header(&b).expect("header b");
    assert_eq!(
        ha.keyslots[0].key_id, hb.keyslots[0].key_id,
        "same default key"
    );
    let ks = LocalKeystore::open(&env.keystore(), false).expect("keystore");
    let ctx_a = EncryptionContext::for_volume(&ha.uuid);
    let ctx_b = EncryptionContext::for_volume(&hb.uuid);
    let dek_a = ks.unwrap(&ha.keyslots[0], &ctx_a).await.expect("unwrap a");
    let dek_b = ks.unwrap(&hb.keyslots[0], &ctx_b).await.expect("unwrap b");
    assert_ne!(dek_a.expose(), dek_b.expose(), "two volumes share a DEK");
    // A's keyslot moved into B's header is refused at unwrap.
    match ks.unwrap(&ha.keyslots[0], &ctx_b).await {
        Err(KeyError::ContextMismatch { .. }) => {}
        Err(e) => panic!("expected a context mismatch, got {e}"),
        Ok(_) => panic!("a keyslot from another volume unwrapped"),
    }
    // Even with the stored context edited to match B, the AEAD refuses it.
    let mut forged = ha.keyslots[0].clone();
    forged.context = ctx_b.clone();
    assert!(matches!(
        ks.unwrap(&forged, &ctx_b).await,
        Err(KeyError::WrongKey { .. })
    ));
}
