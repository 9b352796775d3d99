//! `cryptvol import` and `cryptvol export` against real peers: raw images, qcow2 through
//! qemu-nbd, the result read back through `cryptvol serve` by nbdcopy / qemu-img,
//! interrupted and resumed imports, and the error cases.
//!
//! Assertions that depend on the allocation map (never-written chunks read as zeros) are
//! marked "[map]": without the map, an import that leaves zero regions unwritten reads
//! garbage there and its checksum comparison fails.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;
const MARKER: &[u8] = b"CRYPTVOL-IMPORT-PLAINTEXT-MARKER";

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A disk image of `len` bytes: pseudo-random data, marker runs, explicit zero runs and
/// a hole, so that every path of the copy is taken.
fn disk_image(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    // 1..3 MiB: random data.
    data[MIB..3 * MIB].copy_from_slice(&pattern(2 * MIB, seed));
    // A marker run at 5 MiB + 100 (not aligned to anything).
    for i in 0..200 {
        let at = 5 * MIB + 100 + i * MARKER.len();
        data[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    // A single non-zero byte inside an otherwise zero 64 KiB unit.
    data[7 * MIB + 12345] = 0xa5;
    // Random data again near the end (the last bytes are non-zero).
    let tail = len - 300 * 1024;
    data[tail..].copy_from_slice(&pattern(len - tail, seed + 1));
    // Written as a sparse file: zero 64 KiB units are holes, some are explicit zeros.
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(len as u64).expect("set_len");
    use std::os::unix::fs::FileExt;
    for (i, unit) in data.chunks(64 * 1024).enumerate() {
        let explicit_zero = i % 7 == 3;
        if unit.iter().any(|&b| b != 0) || explicit_zero {
            f.write_all_at(unit, (i * 64 * 1024) as u64)
                .expect("write image");
        }
    }
    f.sync_all().expect("sync image");
    data
}

fn import_json(env: &Env, source: &str, target: &Path, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(
        env.cmd()
            .args(["import", "--json", source])
            .arg(target)
            .args(extra),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("import --json is not JSON ({e}):\n{out}"))
}

/// Allocated bytes of a file.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").blocks() * 512
}

fn no_leftovers(target: &Path) {
    let dir = target.parent().expect("dir");
    let name = target.file_name().expect("name").to_string_lossy();
    for suffix in [".partial", ".import"] {
        let p = dir.join(format!(".{name}{suffix}"));
        assert!(!p.exists(), "{} was left behind", p.display());
    }
}

/// `qemu-nbd` serving one image read-only on a Unix socket; killed on drop.
struct QemuNbd {
    child: Child,
    sock: PathBuf,
}

impl QemuNbd {
    fn start(env: &Env, image: &Path, format: &str, export: &str) -> QemuNbd {
        require("qemu-nbd");
        let sock = env.path(&format!("qemu-{export}.sock"));
        let child = Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "-f",
                format,
                "-x",
                export,
                "-k",
            ])
            .arg(&sock)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-nbd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        QemuNbd { child, sock }
    }
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn raw_image_import_reads_back_identically_through_nbd() {
    require("nbdcopy");
    let env = Env::new();
    let src = env.path("disk.raw");
    let len = 12 * MIB;
    let data = disk_image(&src, len, 7);
    let vol = env.path("vol.img");

    let r = import_json(&env, s(&src), &vol, &[]);
    let want = sha256(&data);
    assert_eq!(r["source_sha256"], want.as_str(), "{r}");
    assert_eq!(r["volume_sha256"], want.as_str(), "[map] {r}");
    assert_eq!(r["checksums_match"], true);
    assert_eq!(r["volume_size"], len as u64);
    assert_eq!(r["padding"], 0);
    assert!(r["resumed_from"].is_null(), "{r}");
    no_leftovers(&vol);
    // The backing file holds ciphertext only.
    assert!(
        !contains(&read(&vol), MARKER),
        "plaintext marker found in the volume file"
    );

    // A real NBD client reads the plaintext back.
    let srv = env.serve(&[s(&vol)], &["--read-only"], true);
    let out = env.path("copy.raw");
    run_ok(Command::new("nbdcopy").args([&srv.uri("vol"), s(&out)]));
    assert_eq!(
        sha256(&read(&out)),
        want,
        "[map] nbdcopy read different data"
    );

    // The volume served over TCP is itself a valid import source (cryptvol as NBD server).
    let vol2 = env.path("vol2.img");
    let r2 = import_json(&env, &srv.tcp_uri("vol"), &vol2, &["--sector-size", "512"]);
    assert_eq!(r2["source_sha256"], want.as_str(), "[map] {r2}");
    assert_eq!(r2["volume_sha256"], want.as_str(), "[map] {r2}");
    assert_eq!(r2["sector_size"], 512);
    drop(srv);

    // Export back to a raw file: identical, sparse, never over an existing file.
    let back = env.path("back.raw");
    let o = run(env.cmd().args(["export", s(&vol), s(&back)]));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "export failed:\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("PLAINTEXT"),
        "no plaintext warning:\n{stderr}"
    );
    assert!(
        stdout.contains(&want),
        "[map] export checksum missing:\n{stdout}"
    );
    assert!(
        read(&back) == data,
        "[map] the exported raw file differs from the original"
    );
    assert!(
        allocated(&back) < len as u64 / 2,
        "export is not sparse: {} bytes allocated",
        allocated(&back)
    );
    assert_eq!(
        std::fs::metadata(&back).expect("stat").mode() & 0o077,
        0,
        "the plaintext export is readable by others"
    );
    let err = fails(env.cmd().args(["export", s(&vol), s(&back)]));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(
        !err.contains("PLAINTEXT"),
        "warned although nothing is exported:\n{err}"
    );
    std::fs::write(&back, b"old content").expect("overwrite");
    let out = run_ok(
        env.cmd()
            .args(["export", "--json", "--force", s(&vol), s(&back)]),
    );
    let j: serde_json::Value = serde_json::from_str(&out).expect("export --json");
    assert_eq!(j["sha256"], want.as_str(), "[map] {j}");
    assert!(read(&back) == data, "[map] --force export differs");

    // Zero regions were not written: most of the 12 MiB stays unallocated, in the report
    // and in the backing file. (Last, as it fails when zero regions are written on purpose:
    // CRYPTVOL_TEST_IMPORT_WRITE_ZEROS=1.)
    let nonzero = data
        .chunks(64 * 1024)
        .filter(|u| u.iter().any(|&b| b != 0))
        .count() as u64
        * 64
        * 1024;
    assert_eq!(r["written"], nonzero, "{r}");
    assert_eq!(r["skipped_zero"], len as u64 - nonzero, "{r}");
    assert!(
        allocated(&vol) < nonzero + (4 << 20),
        "the backing file has {} bytes allocated for {nonzero} bytes of data",
        allocated(&vol)
    );
}

#[test]
fn unaligned_source_is_zero_padded_to_the_sector_size() {
    let env = Env::new();
    let src = env.path("odd.raw");
    let data = pattern(MIB + 1000, 3);
    std::fs::write(&src, &data).expect("write");
    let vol = env.path("odd.img");
    // With a passphrase (given through a descriptor, which can be read only once).
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse\n").expect("write passphrase");
    let mut c = env.cmd();
    c.args([
        "import",
        "--passphrase-fd",
        "3",
        "--pbkdf-memory",
        "8192",
        "--pbkdf-time",
        "1",
    ])
    .args([s(&src), s(&vol)]);
    // The shell opens the passphrase file as descriptor 3 for cryptvol.
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec \"$0\" \"$@\" 3<'{}'", pass.display()))
            .arg(c.get_program())
            .args(c.get_args())
            .envs(c.get_envs().filter_map(|(k, v)| v.map(|v| (k, v)))),
    );
    assert!(out.contains("zero padding"), "{out}");
    assert!(out.contains("wrapped by passphrase"), "{out}");
    let i = info_json(&env, &vol);
    assert_eq!(i["size"], (MIB + 4096) as u64);
    let back = env.path("odd.back");
    run_ok(
        env.cmd()
            .args(["export", "--passphrase-file", s(&pass), s(&vol), s(&back)]),
    );
    let got = read(&back);
    assert_eq!(got.len(), MIB + 4096);
    assert!(got[..data.len()] == data[..], "data differs");
    assert!(
        got[data.len()..].iter().all(|&b| b == 0),
        "[map] padding is not zeros"
    );
}

#[test]
fn qcow2_import_through_qemu_nbd() {
    require("qemu-img");
    require("qemu-io");
    let env = Env::new();
    let qcow = env.path("disk.qcow2");
    run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(&qcow), "24M"]));
    for cmd in [
        "write -P 0x5a 1M 2M",
        "write -P 0x11 9M 64k",
        "write -P 0xee 23M 1M",
        "write -z 1536k 64k",
    ] {
        run_ok(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd, s(&qcow)]));
    }
    let reference = env.path("ref.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&qcow),
        s(&reference),
    ]));
    let want = sha256(&read(&reference));

    let q = QemuNbd::start(&env, &qcow, "qcow2", "disk");
    let vol = env.path("vol.img");
    let r = import_json(&env, &q.uri("disk"), &vol, &[]);
    drop(q);
    assert_eq!(r["source_sha256"], want.as_str(), "{r}");
    assert_eq!(r["volume_sha256"], want.as_str(), "[map] {r}");
    assert_eq!(r["source"]["kind"], "nbd");
    assert_eq!(r["volume_size"], 24 * MIB as u64);

    // qemu-img reads the plaintext back through cryptvol serve.
    let srv = env.serve(&[s(&vol)], &["--read-only"], false);
    let out = env.path("out.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &srv.uri("vol"),
        s(&out),
    ]));
    assert!(
        read(&out) == read(&reference),
        "[map] the imported qcow2 reads back differently"
    );
    assert!(
        !contains(&read(&vol), &[0x5a; 64]),
        "plaintext pattern in the volume file"
    );
}

/// Runs an import with a slow-down, waits until its journal has a checkpoint beyond
/// `after`, then sends `signal`; returns the checkpoint offset seen and the stderr.
fn interrupt_import(
    env: &Env,
    src: &Path,
    vol: &Path,
    after: u64,
    signal: &str,
) -> (u64, std::process::Output) {
    let journal = env.path(".vol.img.import");
    // Only checkpoints written by this run count.
    let skip = std::fs::read_to_string(&journal)
        .unwrap_or_default()
        .lines()
        .count();
    let child = env
        .cmd()
        .args(["import", s(src), s(vol)])
        .env("CRYPTVOL_FAULT_INJECTION", "1")
        .env("CRYPTVOL_TEST_IMPORT_DELAY_MS", "1000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn import");
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        let last = text
            .lines()
            .skip(skip)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "checkpoint")
            .filter_map(|v| v["done"].as_u64())
            .last();
        if let Some(d) = last.filter(|&d| d > after) {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint past {after}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    run_ok(Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]));
    let out = child.wait_with_output().expect("wait for import");
    assert!(!out.status.success(), "the interrupted import succeeded");
    (done, out)
}

#[test]
fn interrupted_import_resumes_where_it_stopped() {
    let env = Env::new();
    let src = env.path("big.raw");
    let total = 48 * MIB;
    let mut data = pattern(total, 11);
    data[20 * MIB..24 * MIB].fill(0);
    std::fs::write(&src, &data).expect("write source");
    let want = sha256(&data);
    let vol = env.path("vol.img");
    let partial = env.path(".vol.img.partial");

    // SIGINT: a clean stop with a final checkpoint.
    let (first, out) = interrupt_import(&env, &src, &vol, 0, "INT");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted after") && err.contains("resume"),
        "{err}"
    );
    assert!(
        !vol.exists(),
        "an unfinished import produced {}",
        vol.display()
    );
    assert!(partial.exists());
    assert!(
        info_json(&env, &partial)["uuid"].is_string(),
        "the partial file is not a volume"
    );

    // kill -9 later on: only the journal's last checkpoint counts.
    let (second, _) = interrupt_import(&env, &src, &vol, first, "KILL");
    assert!(second > first && second < total as u64, "{first} {second}");
    assert!(!vol.exists());

    // A different source refuses to resume.
    let other = env.path("other.raw");
    std::fs::write(&other, &data).expect("write other");
    let err = fails(env.cmd().args(["import", s(&other), s(&vol)]));
    assert!(
        err.contains("cannot resume") && err.contains("--restart"),
        "{err}"
    );
    assert!(
        partial.exists(),
        "a refused resume removed the partial volume"
    );

    // The same command continues from the last checkpoint (the kill came after it, so at
    // most one checkpoint interval is redone) and still checks the whole source.
    let o = run(env.cmd().args(["import", "--json", s(&src), s(&vol)]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "resume failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let from = r["resumed_from"].as_u64().expect("resumed_from");
    assert!(
        from >= second && from < total as u64,
        "resumed at {from}, last seen {second}"
    );
    assert!(
        stderr.contains(&format!("at offset {from} of {total}")),
        "the log does not say where it resumed:\n{stderr}"
    );
    assert_eq!(r["source_sha256"], want.as_str());
    assert_eq!(r["volume_sha256"], want.as_str(), "[map] {r}");
    no_leftovers(&vol);
    assert!(
        !contains(&read(&vol), &data[MIB..MIB + 64]),
        "plaintext in the volume"
    );

    let back = env.path("back.raw");
    run_ok(env.cmd().args(["export", s(&vol), s(&back)]));
    assert!(
        read(&back) == data,
        "[map] resumed import exported differently"
    );
}

#[test]
fn import_and_export_errors() {
    let env = Env::new();
    let src = env.path("s.raw");
    std::fs::write(&src, pattern(MIB, 5)).expect("write");
    let vol = env.path("v.img");

    let err = fails(
        env.cmd()
            .args(["import", s(&env.path("missing.raw")), s(&vol)]),
    );
    assert!(
        err.contains("cannot open") && err.contains("missing.raw"),
        "{err}"
    );
    for (uri, needle) in [
        ("nbd+unix:///x", "socket=PATH"),
        ("nbds://h/x", "TLS"),
        ("nbd://127.0.0.1:0/x", "bad port"),
    ] {
        let err = fails(env.cmd().args(["import", uri, s(&vol)]));
        assert!(
            err.contains("bad NBD URI") && err.contains(needle),
            "{uri}: {err}"
        );
    }
    let port = free_port();
    let err = fails(
        env.cmd()
            .args(["import", &format!("nbd://127.0.0.1:{port}/x"), s(&vol)]),
    );
    assert!(err.contains("cannot connect"), "{err}");
    let err = fails(env.cmd().args(["import", "--resume", s(&src), s(&vol)]));
    assert!(err.contains("no interrupted import"), "{err}");
    let empty = env.path("empty.raw");
    std::fs::write(&empty, b"").expect("write");
    let err = fails(env.cmd().args(["import", s(&empty), s(&vol)]));
    assert!(err.contains("empty"), "{err}");
    for p in [env.path(".v.img.partial"), env.path(".v.img.import")] {
        assert!(!p.exists(), "a failed import left {}", p.display());
    }

    // The server refuses an export it does not have.
    let served = env.create("served.img", "1M", &[]);
    let srv = env.serve(&[s(&served)], &[], false);
    let err = fails(env.cmd().args(["import", &srv.uri("nope"), s(&vol)]));
    assert!(err.contains("no export named \"nope\""), "{err}");
    // A volume open for writing cannot be exported.
    let err = fails(
        env.cmd()
            .args(["export", s(&served), s(&env.path("x.raw"))]),
    );
    assert!(err.contains("already open for writing"), "{err}");
    assert!(
        !env.path("x.raw").exists(),
        "a refused export left its destination"
    );
    drop(srv);

    // The target exists.
    let err = fails(env.cmd().args(["import", s(&src), s(&served)]));
    assert!(err.contains("already exists"), "{err}");
    assert!(
        info_json(&env, &served)["uuid"].is_string(),
        "the existing volume was touched"
    );
}

/// A loop device over a file; detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path, read_only: bool) -> Loop {
        require("losetup");
        let mut c = Command::new("losetup");
        c.args(["-f", "--show"]);
        if read_only {
            c.arg("-r");
        }
        let dev = run_ok(c.arg(file)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop(dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_import_and_export() {
    let env = Env::new();
    let src = env.path("disk.raw");
    let data = disk_image(&src, 8 * MIB, 21);
    let want = sha256(&data);
    let src_dev = Loop::attach(&src, true);
    let vol = env.path("vol.img");
    let r = import_json(&env, &src_dev.0, &vol, &[]);
    drop(src_dev);
    assert_eq!(r["source"]["kind"], "block-device", "{r}");
    assert_eq!(r["source_sha256"], want.as_str(), "{r}");
    assert_eq!(r["volume_sha256"], want.as_str(), "[map] {r}");

    // Export onto a larger device full of 0xff: zeros are written, the rest is untouched.
    let dst = env.path("dst.raw");
    std::fs::write(&dst, vec![0xffu8; 12 * MIB]).expect("write dst");
    let dst_dev = Loop::attach(&dst, false);
    let err = fails(env.cmd().args(["export", s(&vol), &dst_dev.0]));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let out = run_ok(
        env.cmd()
            .args(["export", "--json", "--force", s(&vol), &dst_dev.0]),
    );
    drop(dst_dev);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["dest_kind"], "block-device");
    assert_eq!(j["sha256"], want.as_str(), "[map] {j}");
    let got = read(&dst);
    assert!(
        got[..8 * MIB] == data[..],
        "[map] the device holds other data"
    );
    assert!(
        got[8 * MIB..].iter().all(|&b| b == 0xff),
        "export wrote past the volume's end"
    );
}

/// Issue 14 B6: an import run by root opened its journal `.FILE.import` through a
/// symlink planted there and rewrote the file it pointed to. A symlink or a hard link
/// planted at the journal's name must be refused with a clear error, the victim left
/// unchanged, and nothing created at the target.
#[test]
fn import_journal_never_written_through_a_planted_link() {
    let env = Env::new();
    let src = env.path("s.raw");
    std::fs::write(&src, pattern(MIB, 9)).expect("write");
    let elsewhere = env.path("etc");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    // No trailing newline: the journal reader would cut it off (a torn last line).
    let original = b"root-owned configuration, no final newline".to_vec();
    let victim = elsewhere.join("victim.conf");
    std::fs::write(&victim, &original).expect("victim");
    let vol = env.path("v.img");
    let journal = env.path(".v.img.import");

    std::os::unix::fs::symlink(&victim, &journal).expect("plant symlink");
    let err = fails(env.cmd().args(["import", s(&src), s(&vol)]));
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(read(&victim), original, "the victim was written through");
    assert!(std::fs::symlink_metadata(&vol).is_err(), "target created");
    assert!(!env.path(".v.img.partial").exists(), "partial left behind");

    std::fs::remove_file(&journal).expect("rm");
    std::fs::hard_link(&victim, &journal).expect("plant hard link");
    let err = fails(env.cmd().args(["import", s(&src), s(&vol)]));
    assert!(err.contains("hard links"), "{err}");
    assert_eq!(read(&victim), original, "the victim was written through");
    assert!(std::fs::symlink_metadata(&vol).is_err(), "target created");

    // With the planted link gone, the same import works.
    std::fs::remove_file(&journal).expect("rm");
    run_ok(env.cmd().args(["import", s(&src), s(&vol)]));
    assert_eq!(read(&victim), original);
    no_leftovers(&vol);
}

/// Issue 14 B6 (the partial volume): resuming an import opened `.FILE.partial` by name,
/// so a symlink planted there made root write the source into the volume it pointed to.
/// The resume must refuse it and leave that volume untouched.
#[test]
fn resumed_import_never_writes_through_a_planted_partial_link() {
    let env = Env::new();
    let src = env.path("big.raw");
    let data = pattern(24 * MIB, 21);
    std::fs::write(&src, &data).expect("write source");
    let vol = env.path("vol.img");
    let partial = env.path(".vol.img.partial");
    let _ = interrupt_import(&env, &src, &vol, 0, "INT");
    assert!(partial.exists());
    // The real partial volume moves elsewhere (it stands for any volume root can
    // unlock) and a symlink to it takes its place.
    let elsewhere = env.path("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let victim = elsewhere.join("victim.img");
    std::fs::rename(&partial, &victim).expect("move");
    let before = sha256(&read(&victim));
    std::os::unix::fs::symlink(&victim, &partial).expect("plant");
    let err = fails(env.cmd().args(["import", s(&src), s(&vol)]));
    assert!(
        err.contains("cannot resume") && err.contains("not a regular file"),
        "{err}"
    );
    assert_eq!(sha256(&read(&victim)), before, "written through the link");
    assert!(std::fs::symlink_metadata(&vol).is_err(), "target published");
    // --restart removes the link (not its target) and imports afresh.
    run_ok(env.cmd().args(["import", "--restart", s(&src), s(&vol)]));
    assert_eq!(sha256(&read(&victim)), before);
    no_leftovers(&vol);
}
