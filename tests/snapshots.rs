//! Snapshots end to end: offline snapshots of volumes written through a real
//! `cryptvol serve` (qemu-io, nbdsh), restore (same key and another key), incremental
//! uploads, tampering, plaintext never in the store, delete with shared chunks, copy
//! between stores, Ctrl-C and resume, and the S3 store against a local `moto_server`.

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

const MIB: u64 = 1 << 20;
const MARKER: &[u8] = b"CRYPTVOL-SNAPSHOT-PLAINTEXT-MARKER-7f3a";

/// `cryptvol snapshot ...` (and other commands) without a progress bar.
fn cv(env: &Env) -> Command {
    let mut c = env.cmd();
    c.env("CRYPTVOL_NO_PROGRESS", "1")
        .env_remove("CRYPTVOL_SNAPSHOT_STORE");
    c
}

fn key_create(env: &Env, alias: &str) {
    run_ok(cv(env).args(["key", "create", "--alias", alias]));
}

/// Serves `file`, runs qemu-io commands on it, stops the server.
fn write_through_nbd(env: &Env, file: &Path, cmds: &[&str]) {
    let srv = env.serve(&[s(file)], &[], false);
    let stem = file.file_stem().unwrap().to_str().unwrap();
    qemu_io(&srv.uri(stem), cmds);
    srv.stop();
}

/// Writes MARKER repeated over `len` bytes at `offset` through NBD (nbdsh).
fn write_marker(env: &Env, file: &Path, offset: u64, len: usize) {
    require_python_nbd();
    let srv = env.serve(&[s(file)], &[], false);
    let stem = file.file_stem().unwrap().to_str().unwrap();
    let script = format!(
        "m = {marker:?}.encode()\nbuf = (m * ({len} // len(m) + 1))[:{len}]\nh.pwrite(buf, {offset})\nh.flush()",
        marker = std::str::from_utf8(MARKER).unwrap()
    );
    let out = nbdsh(&srv.uri(stem), &script);
    assert!(
        out.status.success(),
        "nbdsh write failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.stop();
}

/// SHA-256 of the whole plaintext of a volume, read through NBD.
fn plaintext_sha(env: &Env, file: &Path) -> String {
    require_python_nbd();
    let srv = env.serve(&[s(file)], &["--read-only"], false);
    let stem = file.file_stem().unwrap().to_str().unwrap();
    let script = "import hashlib\nd = hashlib.sha256()\nsize = h.get_size()\noff = 0\nwhile off < size:\n    n = min(4 << 20, size - off)\n    d.update(h.pread(n, off))\n    off += n\nprint('SHA', d.hexdigest())";
    let out = nbdsh(&srv.uri(stem), script);
    srv.stop();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nbdsh read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("SHA "))
        .unwrap_or_else(|| panic!("no digest in {text}"))
        .to_string()
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// `snapshot create FILE --store STORE --json`, parsed.
fn snapshot(env: &Env, file: &Path, store: &str, extra: &[&str]) -> serde_json::Value {
    json(&run_ok(
        cv(env)
            .args(["snapshot", "create", s(file), "--store", store, "--json"])
            .args(extra),
    ))
}

/// Objects under `chunks/` of a local store.
fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(store.join("chunks")) else {
        return out;
    };
    for d in dirs.flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            // Only finished objects (64 hex digits), not a store's temporary files.
            if f.file_name().len() == 64 {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

/// Every file of a directory tree.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn restore(env: &Env, id: &str, store: &str, file: &Path, extra: &[&str]) -> String {
    run_ok(
        cv(env)
            .args(["create", "--from-snapshot", id, "--store", store])
            .args(extra)
            .arg(file),
    )
}

fn restore_fails(env: &Env, id: &str, store: &str, file: &Path) -> String {
    let out = run(cv(env)
        .args(["create", "--from-snapshot", id, "--store", store])
        .arg(file));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "restore should fail:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!file.exists(), "a failed restore left {}", file.display());
    let partial = file.with_file_name(format!(
        ".{}.partial",
        file.file_name().unwrap().to_str().unwrap()
    ));
    assert!(
        !partial.exists(),
        "a failed restore left {}",
        partial.display()
    );
    err
}

fn data_offset(env: &Env, file: &Path) -> u64 {
    info_json(env, file)["data_offset"].as_u64().unwrap()
}

/// Issue 14 B7: a restore under the snapshot's own master key used to keep the source
/// volume's DEK, so the two volume files held the same ciphertext for the same data at
/// the same sector (comparable sector by sector).
#[test]
fn a_volume_restored_under_the_same_key_gets_its_own_data_key() {
    require("qemu-io");
    let env = Env::new();
    let vol = env.create("src.img", "4M", &[]);
    write_through_nbd(&env, &vol, &["write -P 0x3c 0 1M"]);
    let store = env.path("store");
    let id = snapshot(&env, &vol, s(&store), &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let restored = env.path("restored.img");
    let out = restore(&env, &id, s(&store), &restored, &[]);
    // Both under the same master key.
    let (ia, ib) = (info_json(&env, &vol), info_json(&env, &restored));
    assert_eq!(ia["keyslots"][0]["key_id"], ib["keyslots"][0]["key_id"]);
    // The same plaintext sectors...
    let srv = env.serve(&[s(&vol), s(&restored)], &[], false);
    qemu_io(&srv.uri("src"), &["read -P 0x3c 0 1M"]);
    qemu_io(&srv.uri("restored"), &["read -P 0x3c 0 1M"]);
    srv.stop();
    // ...are different ciphertext at the same place of each data area.
    let (oa, ob) = (data_offset(&env, &vol), data_offset(&env, &restored));
    for sector in [0u64, 1, 255] {
        let (a, b) = (
            read_at(&vol, oa + sector * 4096, 4096),
            read_at(&restored, ob + sector * 4096, 4096),
        );
        assert!(a != vec![0x3c; 4096], "sector {sector} is plaintext");
        assert!(a != b, "sector {sector}: same ciphertext in both volumes");
    }
    assert!(out.contains("re-encrypted under a new data key"), "{out}");
}

#[test]
fn snapshot_restore_same_and_other_key_never_plaintext() {
    require("qemu-io");
    let env = Env::new();
    let vol = env.create("vol.img", "16M", &[]);
    write_through_nbd(
        &env,
        &vol,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 3M 512k",
            "write -P 0x11 15M 4k",
        ],
    );
    write_marker(&env, &vol, 6 * MIB, 256 * 1024);
    let original = plaintext_sha(&env, &vol);

    // A served volume is refused, pointing at the daemon.
    let store = env.path("store");
    let srv = env.serve(&[s(&vol)], &[], false);
    let out = run(cv(&env).args(["snapshot", "create", s(&vol), "--store", s(&store)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "snapshot of a served volume must fail"
    );
    assert!(
        err.contains("being served") && err.contains("daemon"),
        "{err}"
    );
    srv.stop();

    let st = snapshot(&env, &vol, s(&store), &["--description", "before upgrade"]);
    let id = st["id"].as_str().unwrap().to_string();
    assert_eq!(st["chunks"], 32);
    assert!(st["parent"].is_null());

    // The store never holds plaintext.
    for f in all_files(&store) {
        assert!(
            !contains(&read(&f), MARKER),
            "plaintext marker found in {}",
            f.display()
        );
    }
    // ... while the volume really holds the marker as plaintext (sanity of the check).
    let srv = env.serve(&[s(&vol)], &["--read-only"], false);
    let out = nbdsh(
        &srv.uri("vol"),
        &format!("print(h.pread(4096, {}))", 6 * MIB),
    );
    srv.stop();
    assert!(String::from_utf8_lossy(&out.stdout).contains("CRYPTVOL-SNAPSHOT-PLAINTEXT-MARKER"));

    // list / describe.
    let list = json(&run_ok(cv(&env).args([
        "snapshot",
        "list",
        "--store",
        s(&store),
        "--volume",
        s(&vol),
        "--json",
    ])));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["description"], "before upgrade");
    let text = run_ok(cv(&env).args(["snapshot", "list", "--store", s(&store)]));
    assert!(
        text.contains(&id) && text.contains("before upgrade"),
        "{text}"
    );
    let d = json(&run_ok(cv(&env).args([
        "snapshot",
        "describe",
        &id,
        "--store",
        s(&store),
        "--json",
    ])));
    assert_eq!(d["volume_uuid"], info_json(&env, &vol)["uuid"]);
    assert_eq!(d["volume_size"], 16 * MIB);
    assert_eq!(d["keyslots"][0]["backend"], "local");
    let other_volume = json(&run_ok(cv(&env).args([
        "snapshot",
        "list",
        "--store",
        s(&store),
        "--volume",
        "00000000-0000-4000-8000-000000000000",
        "--json",
    ])));
    assert!(other_volume.as_array().unwrap().is_empty());

    // Restore under the same key: byte-identical plaintext, its own DEK (different
    // ciphertext at the same place, see
    // a_volume_restored_under_the_same_key_gets_its_own_data_key), a new UUID and the
    // keyslot bound to it.
    let same = env.path("same.img");
    let out = restore(&env, &id, s(&store), &same, &[]);
    assert!(out.contains("re-encrypted under a new data key"), "{out}");
    assert_eq!(plaintext_sha(&env, &same), original);
    let (ia, ib) = (info_json(&env, &vol), info_json(&env, &same));
    assert_ne!(ia["uuid"], ib["uuid"]);
    assert_eq!(
        ib["keyslots"][0]["encryption_context"]["cryptvol:volume-uuid"],
        ib["uuid"]
    );
    let (oa, ob) = (data_offset(&env, &vol), data_offset(&env, &same));
    assert_ne!(read_at(&vol, oa, 65536), read_at(&same, ob, 65536));

    // Restore under another key: identical plaintext, a different DEK (the ciphertext of
    // the same plaintext at the same sectors differs), wrapped by the other key.
    key_create(&env, "alias/other");
    let other = env.path("other.img");
    let out = restore(&env, &id, s(&store), &other, &["--key", "alias/other"]);
    assert!(out.contains("re-encrypted under a new data key"), "{out}");
    assert_eq!(plaintext_sha(&env, &other), original);
    let oc = data_offset(&env, &other);
    assert_ne!(read_at(&vol, oa, 65536), read_at(&other, oc, 65536));
    assert_ne!(
        info_json(&env, &other)["keyslots"][0]["key_id"],
        ia["keyslots"][0]["key_id"]
    );

    // Restoring over an existing file is refused and leaves it alone.
    let before = read(&same);
    let out = run(cv(&env)
        .args(["create", "--from-snapshot", &id, "--store", s(&store)])
        .arg(&same));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(read(&same), before);
}

#[test]
fn incremental_delete_and_tampering() {
    require("qemu-io");
    let env = Env::new();
    // 64 MiB = 128 chunks of 512 KiB, all written.
    let vol = env.create("inc.img", "64M", &[]);
    write_through_nbd(&env, &vol, &["write -P 0x33 0 64M"]);
    let store = env.path("store");
    let s1 = snapshot(&env, &vol, s(&store), &[]);
    assert_eq!(s1["data_chunks"], 128);
    assert_eq!(chunk_files(&store).len(), 128);

    // Change 1 chunk of 128 (~1%): the next snapshot uploads exactly that chunk.
    write_through_nbd(&env, &vol, &["write -P 0xcd 5M 4k"]);
    let s2 = snapshot(&env, &vol, s(&store), &["--description", "second"]);
    assert_eq!(s2["parent"], s1["id"]);
    assert_eq!(s2["uploaded"], 1, "{s2}");
    assert_eq!(chunk_files(&store).len(), 129);
    let id1 = s1["id"].as_str().unwrap().to_string();
    let id2 = s2["id"].as_str().unwrap().to_string();

    // An explicit parent "none" still uploads nothing new (content addressing).
    let s3 = snapshot(&env, &vol, s(&store), &["--parent", "none"]);
    assert!(s3["parent"].is_null());
    assert_eq!(s3["uploaded"], 0);
    run_ok(cv(&env).args([
        "snapshot",
        "delete",
        s3["id"].as_str().unwrap(),
        "--store",
        s(&store),
    ]));
    assert_eq!(chunk_files(&store).len(), 129);

    // Deleting the first snapshot removes only the chunk no other snapshot uses.
    let out = run_ok(cv(&env).args(["snapshot", "delete", &id1, "--store", s(&store)]));
    assert!(out.contains("1 chunks removed, 127 kept"), "{out}");
    assert_eq!(chunk_files(&store).len(), 128);
    let err = restore_fails(&env, &id1, s(&store), &env.path("gone.img"));
    assert!(err.contains("not found"), "{err}");

    // The second snapshot still restores, with the new data.
    let r = env.path("r.img");
    restore(&env, &id2, s(&store), &r, &[]);
    assert_eq!(plaintext_sha(&env, &r), plaintext_sha(&env, &vol));
    let srv = env.serve(&[s(&r)], &[], false);
    qemu_io(&srv.uri("r"), &["read -P 0xcd 5M 4k", "read -P 0x33 6M 4k"]);
    srv.stop();

    // Tampering with the manifest: a clear authentication error, nothing left behind.
    let manifest = store.join(format!("snapshots/{id2}.json"));
    let good = read(&manifest);
    let text = String::from_utf8(good.clone()).unwrap();
    std::fs::write(&manifest, text.replace("second", "secxnd")).unwrap();
    let err = restore_fails(&env, &id2, s(&store), &env.path("t1.img"));
    assert!(
        err.contains("manifest authentication failed") && err.contains(&id2),
        "{err}"
    );
    // A flipped byte that breaks the structure is also refused clearly.
    let mut bad = good.clone();
    let pos = text.find("\"volume_size\":").unwrap() + 14;
    bad[pos] = b'9';
    std::fs::write(&manifest, &bad).unwrap();
    let err = restore_fails(&env, &id2, s(&store), &env.path("t2.img"));
    assert!(err.contains(&id2), "{err}");
    std::fs::write(&manifest, &good).unwrap();

    // Tampering with a chunk: the error names the snapshot and the chunk.
    let d = json(&run_ok(cv(&env).args([
        "snapshot",
        "describe",
        &id2,
        "--store",
        s(&store),
        "--json",
    ])));
    assert_eq!(d["data_chunks"], 128);
    let chunk = &chunk_files(&store)[17];
    let mut bytes = read(chunk);
    bytes[1000] ^= 1;
    std::fs::write(chunk, &bytes).unwrap();
    let err = restore_fails(&env, &id2, s(&store), &env.path("t3.img"));
    assert!(
        err.contains("does not match its SHA-256") && err.contains(&id2) && err.contains("chunk "),
        "{err}"
    );
    // A missing chunk too.
    std::fs::remove_file(chunk).unwrap();
    let err = restore_fails(&env, &id2, s(&store), &env.path("t4.img"));
    assert!(err.contains("missing") && err.contains(&id2), "{err}");

    // Without the master key: a clear key error, not an authentication error.
    let other = Env::new();
    let out = run(cv(&other)
        .args(["create", "--from-snapshot", &id2, "--store", s(&store)])
        .arg(other.path("x.img")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no keyslot could be unlocked") && !err.contains("authentication"),
        "{err}"
    );
}

#[test]
fn copy_between_stores_as_is_and_reencrypted() {
    require("qemu-io");
    let env = Env::new();
    let vol = env.create("c.img", "8M", &[]);
    write_through_nbd(&env, &vol, &["write -P 0x77 0 8M"]);
    let original = plaintext_sha(&env, &vol);
    let a = env.path("a");
    let id = snapshot(&env, &vol, s(&a), &[])["id"]
        .as_str()
        .unwrap()
        .to_string();

    // As is: same id, same chunk objects, no key needed (another keystore).
    let b = env.path("b");
    let nokeys = Env::new();
    let st = json(&run_ok(cv(&nokeys).args([
        "snapshot",
        "copy",
        &id,
        "--store",
        s(&a),
        "--to-store",
        s(&b),
        "--json",
    ])));
    assert_eq!(st["id"], id.as_str());
    assert_eq!(st["reencrypted"], false);
    let names = |p: &Path| -> Vec<String> {
        chunk_files(p)
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&a), names(&b));
    assert_eq!(
        read(&a.join(format!("snapshots/{id}.json"))),
        read(&b.join(format!("snapshots/{id}.json")))
    );
    // gc removes chunks no manifest references (an interrupted snapshot's leftovers).
    std::fs::create_dir_all(b.join("chunks/ee")).unwrap();
    std::fs::write(b.join(format!("chunks/ee/{}", "e".repeat(64))), b"orphan").unwrap();
    let out = run_ok(cv(&nokeys).args(["snapshot", "gc", "--store", s(&b)]));
    assert!(out.contains("1 unreferenced chunks removed"), "{out}");
    assert_eq!(names(&a), names(&b));
    // Again: nothing to transfer.
    let st = json(&run_ok(cv(&nokeys).args([
        "snapshot",
        "copy",
        &id,
        "--store",
        s(&a),
        "--to-store",
        s(&b),
        "--json",
    ])));
    assert_eq!(st["chunks_copied"], 0);

    // Under another key: a new snapshot, new DEK (no chunk in common), bound to its own id.
    key_create(&env, "alias/dr");
    let c = env.path("c");
    let st = json(&run_ok(cv(&env).args([
        "snapshot",
        "copy",
        &id,
        "--store",
        s(&a),
        "--to-store",
        s(&c),
        "--key",
        "alias/dr",
        "--json",
    ])));
    assert_eq!(st["reencrypted"], true);
    let id2 = st["id"].as_str().unwrap().to_string();
    assert_ne!(id2, id);
    assert_eq!(names(&c).len(), names(&a).len());
    assert!(names(&c).iter().all(|n| !names(&a).contains(n)));
    let d = json(&run_ok(cv(&env).args([
        "snapshot",
        "describe",
        &id2,
        "--store",
        s(&c),
        "--json",
    ])));
    assert_eq!(
        d["encryption_context"]["cryptvol:snapshot-id"],
        id2.as_str()
    );
    assert_eq!(
        d["keyslots"][0]["encryption_context"]["cryptvol:snapshot-id"],
        id2.as_str()
    );
    assert!(d["parent"].is_null());
    // Restores from both copies give the same plaintext.
    let rb = env.path("rb.img");
    restore(&env, &id, s(&b), &rb, &[]);
    assert_eq!(plaintext_sha(&env, &rb), original);
    let rc = env.path("rc.img");
    let out = restore(&env, &id2, s(&c), &rc, &["--key", "alias/dr"]);
    assert!(out.contains("re-encrypted under a new data key"), "{out}");
    assert_eq!(plaintext_sha(&env, &rc), original);
}

/// Sends SIGINT to a running child once `under_way` holds (progress the test can see),
/// returns its stderr; asserts it failed.
fn interrupt(mut child: Child, what: &str, mut under_way: impl FnMut() -> bool) -> String {
    wait_until(PATIENCE, what, || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the operation finished before it could be interrupted"
        );
        under_way()
    });
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "interrupted run succeeded:\n{err}");
    err
}

#[test]
fn ctrl_c_leaves_nothing_half_made_and_the_next_run_resumes() {
    require("qemu-io");
    let env = Env::new();
    let vol = env.create("big.img", "128M", &[]);
    write_through_nbd(&env, &vol, &["write -P 0x42 0 128M"]);
    let store = env.path("store");

    // Slowed down (test-only) so the interruption lands mid-way in any build.
    let slow = [
        ("CRYPTVOL_FAULT_INJECTION", "1"),
        ("CRYPTVOL_TEST_SNAPSHOT_DELAY_MS", "60"),
    ];
    let child = cv(&env)
        .args(["snapshot", "create", s(&vol), "--store", s(&store)])
        .envs(slow)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = interrupt(child, "8 chunks stored", || chunk_files(&store).len() >= 8);
    assert!(err.contains("interrupted"), "{err}");
    let partial_chunks = chunk_files(&store).len();
    assert!(
        partial_chunks > 0 && partial_chunks < 256,
        "{partial_chunks}"
    );
    let list = json(&run_ok(cv(&env).args([
        "snapshot",
        "list",
        "--store",
        s(&store),
        "--json",
    ])));
    assert!(
        list.as_array().unwrap().is_empty(),
        "an interrupted snapshot is visible: {list}"
    );

    // gc would remove the leftovers; the next run instead skips the chunks already stored.
    let st = snapshot(&env, &vol, s(&store), &[]);
    assert_eq!(st["data_chunks"], 256);
    assert_eq!(
        st["uploaded"].as_u64().unwrap() as usize,
        256 - partial_chunks,
        "{st}"
    );
    let id = st["id"].as_str().unwrap().to_string();
    // gc keeps every chunk a manifest references.
    let out = run_ok(cv(&env).args(["snapshot", "gc", "--store", s(&store)]));
    assert!(
        out.contains("0 unreferenced chunks removed, 256 in use"),
        "{out}"
    );

    // An interrupted restore leaves neither the volume nor its partial file.
    let r = env.path("r.img");
    let child = cv(&env)
        .args(["create", "--from-snapshot", &id, "--store", s(&store)])
        .arg(&r)
        .envs(slow)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let partial = env.path(".r.img.partial");
    let err = interrupt(child, "8 MiB restored", || {
        std::fs::metadata(&partial).is_ok_and(|m| m.blocks() * 512 >= 8 << 20)
    });
    assert!(err.contains("interrupted"), "{err}");
    assert!(!r.exists());
    assert!(!env.path(".r.img.partial").exists());
    // A partial file left by a killed restore is removed by the next run.
    std::fs::write(env.path(".r.img.partial"), b"junk").unwrap();
    restore(&env, &id, s(&store), &r, &[]);
    assert!(!env.path(".r.img.partial").exists());
    let srv = env.serve(&[s(&r)], &[], false);
    qemu_io(
        &srv.uri("r"),
        &["read -P 0x42 0 1M", "read -P 0x42 127M 1M"],
    );
    srv.stop();
}

/// Points a command at moto with throwaway credentials.
fn aws(c: &mut Command, endpoint: &str, home: &Path) {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_SESSION_TOKEN", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        c.env(k, v);
    }
    c.env("AWS_CONFIG_FILE", home.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"))
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL_S3");
}

/// Object keys under `prefix` in a moto bucket (boto3).
fn s3_keys(endpoint: &str, home: &Path, bucket: &str, prefix: &str) -> Vec<String> {
    let script = format!(
        "import boto3\nc = boto3.client('s3', endpoint_url={endpoint:?}, region_name='us-east-1')\n\
         p = c.get_paginator('list_objects_v2')\n\
         for page in p.paginate(Bucket={bucket:?}, Prefix={prefix:?}):\n    \
         for o in page.get('Contents', []):\n        print(o['Key'])"
    );
    let mut c = Command::new("python3");
    c.args(["-c", &script]);
    aws(&mut c, endpoint, home);
    run_ok(&mut c).lines().map(str::to_string).collect()
}

#[test]
fn s3_store_against_moto() {
    require("qemu-io");
    let env = Env::new();
    let moto = Moto::start(&env.path("moto.log"), &["boto3"]);
    let ep = moto.endpoint();
    let home = env.dir.path().to_path_buf();
    let mut c = Command::new("python3");
    c.args([
        "-c",
        &format!(
            "import boto3\nboto3.client('s3', endpoint_url={ep:?}, region_name='us-east-1').create_bucket(Bucket='snaps')"
        ),
    ]);
    aws(&mut c, &ep, &home);
    run_ok(&mut c);
    let cmd = || {
        let mut c = cv(&env);
        aws(&mut c, &ep, &home);
        c
    };

    let vol = env.create("s3vol.img", "8M", &[]);
    write_through_nbd(&env, &vol, &["write -P 0x61 0 3M"]);
    write_marker(&env, &vol, 4 * MIB, 128 * 1024);
    let original = plaintext_sha(&env, &vol);
    let store = "s3://snaps/cluster-1/vols";
    let st = json(&run_ok(cmd().args([
        "snapshot",
        "create",
        s(&vol),
        "--store",
        store,
        "--json",
    ])));
    let id = st["id"].as_str().unwrap().to_string();
    let keys = s3_keys(&ep, &home, "snaps", "cluster-1/vols/");
    assert!(
        keys.contains(&format!("cluster-1/vols/snapshots/{id}.json")),
        "{keys:?}"
    );
    let chunk_keys: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("cluster-1/vols/chunks/"))
        .collect();
    assert!(!chunk_keys.is_empty(), "{keys:?}");
    // No plaintext in the bucket.
    let script = format!(
        "import boto3\nc = boto3.client('s3', endpoint_url={ep:?}, region_name='us-east-1')\n\
         for o in c.list_objects_v2(Bucket='snaps')['Contents']:\n    \
         b = c.get_object(Bucket='snaps', Key=o['Key'])['Body'].read()\n    \
         assert {marker:?}.encode() not in b, o['Key']\nprint('CLEAN')",
        marker = std::str::from_utf8(MARKER).unwrap()
    );
    let mut c = Command::new("python3");
    c.args(["-c", &script]);
    aws(&mut c, &ep, &home);
    assert!(run_ok(&mut c).contains("CLEAN"));

    // Incremental in S3: nothing changed, nothing uploaded; listed.
    let st2 = json(&run_ok(cmd().args([
        "snapshot",
        "create",
        s(&vol),
        "--store",
        store,
        "--json",
    ])));
    assert_eq!(st2["uploaded"], 0);
    assert_eq!(st2["parent"], id.as_str());
    let list = json(&run_ok(
        cmd().args(["snapshot", "list", "--store", store, "--json"]),
    ));
    assert_eq!(list.as_array().unwrap().len(), 2);

    // Restore from S3.
    let r = env.path("from-s3.img");
    let out = run_ok(
        cmd()
            .args(["create", "--from-snapshot", &id, "--store", store])
            .arg(&r),
    );
    assert!(out.contains("created"), "{out}");
    assert_eq!(plaintext_sha(&env, &r), original);

    // Copy S3 -> local under another key, and local -> S3 as is.
    key_create(&env, "alias/s3copy");
    let local = env.path("local");
    let cp = json(&run_ok(cmd().args([
        "snapshot",
        "copy",
        &id,
        "--store",
        store,
        "--to-store",
        s(&local),
        "--key",
        "alias/s3copy",
        "--json",
    ])));
    let cid = cp["id"].as_str().unwrap().to_string();
    let back = "s3://snaps/copies";
    run_ok(cmd().args([
        "snapshot",
        "copy",
        &cid,
        "--store",
        s(&local),
        "--to-store",
        back,
    ]));
    let rc = env.path("copy.img");
    run_ok(
        cmd()
            .args(["create", "--from-snapshot", &cid, "--store", back])
            .arg(&rc),
    );
    assert_eq!(plaintext_sha(&env, &rc), original);

    // Delete in S3 keeps the chunks the other snapshot uses.
    let before = s3_keys(&ep, &home, "snaps", "cluster-1/vols/chunks/").len();
    run_ok(cmd().args(["snapshot", "delete", &id, "--store", store]));
    assert_eq!(
        s3_keys(&ep, &home, "snaps", "cluster-1/vols/chunks/").len(),
        before
    );
    let list = json(&run_ok(
        cmd().args(["snapshot", "list", "--store", store, "--json"]),
    ));
    assert_eq!(list.as_array().unwrap().len(), 1);
    run_ok(cmd().args([
        "snapshot",
        "delete",
        st2["id"].as_str().unwrap(),
        "--store",
        store,
    ]));
    assert!(s3_keys(&ep, &home, "snaps", "cluster-1/vols/").is_empty());
}
