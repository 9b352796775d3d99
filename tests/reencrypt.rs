//! Re-encryption under a new data key (issue 9 part 2): deterministic crash/resume
//! coverage of offline re-encryption at every crash point, Ctrl-C and resume, the online
//! control requests (status, refusals, SIGTERM and automatic resume), and volumes with
//! both a key keyslot and a passphrase keyslot.
//!
//! Every test starts from a volume with known content: some chunks written, some never
//! written, some zeroed after writing (with and without deallocation), partial and
//! unaligned writes, one across a zone boundary. After the re-encryption every byte is
//! read back through a real NBD client (nbdcopy) and compared with the expected image.
//!
//! The crash points are test-only fault injection (`CRYPTVOL_FAULT_INJECTION=1`,
//! `CRYPTVOL_TEST_CRASH_AT=STEP`, `CRYPTVOL_TEST_CRASH_SKIP=N`: the process SIGKILLs
//! itself at the (N+1)-th time it reaches STEP); the delay between steps is
//! `CRYPTVOL_TEST_REENCRYPT_STEP_DELAY_MS` (also only with fault injection on).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// 32 MiB with 4096-byte sectors: 8 re-encryption zones of 4 MiB, 512 chunks of 64 KiB.
const SIZE: u64 = 32 << 20;
const MIB: u64 = 1 << 20;
const ZONE: u64 = 4 * MIB;
const CHUNK: u64 = 64 * 1024;

enum Op {
    Write(u64, u64),
    /// Write zeroes (the server may deallocate).
    Zero(u64, u64),
    /// Write zeroes, keeping the range allocated (NBD_CMD_FLAG_NO_HOLE).
    ZeroNoHole(u64, u64),
}

/// The writes that make the known content. Per chunk `c` (of 512): `c % 5` = 0: whole
/// chunk written; 1: never written; 2: written, then zeroed; 3: 4 KiB written in the
/// middle; 4: written, then 16 KiB zeroed in the middle without deallocating. Plus an
/// unaligned write inside a sector and a write across the boundary of zones 3 and 4.
fn ops() -> Vec<Op> {
    let mut v = Vec::new();
    for c in 0..SIZE / CHUNK {
        let o = c * CHUNK;
        match c % 5 {
            0 => v.push(Op::Write(o, CHUNK)),
            1 => {}
            2 => {
                v.push(Op::Write(o, CHUNK));
                v.push(Op::Zero(o, CHUNK));
            }
            3 => v.push(Op::Write(o + 8192, 4096)),
            _ => {
                v.push(Op::Write(o, CHUNK));
                v.push(Op::ZeroNoHole(o + 16384, 16384));
            }
        }
    }
    v.push(Op::Write(5 * MIB + 123, 777));
    v.push(Op::Write(4 * ZONE - 10_000, 20_000));
    v
}

/// The source of the written bytes (the same file feeds nbdsh and the expected image).
fn source() -> Vec<u8> {
    pattern(SIZE as usize, 0x5eed_cafe)
}

fn expected_image() -> Vec<u8> {
    let src = source();
    let mut img = vec![0u8; SIZE as usize];
    for op in ops() {
        match op {
            Op::Write(o, n) => {
                let r = o as usize..(o + n) as usize;
                img[r.clone()].copy_from_slice(&src[r]);
            }
            Op::Zero(o, n) | Op::ZeroNoHole(o, n) => img[o as usize..(o + n) as usize].fill(0),
        }
    }
    img
}

/// Creates `name` (32 MiB) and writes the known content through the daemon.
fn known_volume(env: &Env, name: &str) -> PathBuf {
    require_python_nbd();
    let vol = env.create(name, "32M", &[]);
    let src = env.path("source.bin");
    if !src.exists() {
        std::fs::write(&src, source()).expect("write source");
    }
    // The unaligned write is the server's to handle (read-modify-write): libnbd's own
    // alignment check is turned off.
    let mut script = format!(
        "import nbd\nh.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)\n\
         src = open({:?}, 'rb')\n",
        s(&src)
    );
    for op in ops() {
        script.push_str(&match op {
            Op::Write(o, n) => format!("src.seek({o}); h.pwrite(src.read({n}), {o})\n"),
            Op::Zero(o, n) => format!("h.zero({n}, {o})\n"),
            Op::ZeroNoHole(o, n) => format!("h.zero({n}, {o}, nbd.CMD_FLAG_NO_HOLE)\n"),
        });
    }
    script.push_str("h.flush()\n");
    let srv = env.serve(&[s(&vol)], &[], false);
    let export = vol.file_stem().and_then(|x| x.to_str()).expect("stem");
    let out = nbdsh(&srv.uri(export), &script);
    assert!(
        out.status.success(),
        "nbdsh writing the known content failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.stop();
    vol
}

/// Copies a volume file (sparse) to `name` in the env.
fn copy_volume(env: &Env, from: &Path, name: &str) -> PathBuf {
    let to = env.path(name);
    run_ok(Command::new("cp").arg("--sparse=always").arg(from).arg(&to));
    to
}

/// Serves `vol` (with `envs` for the server) and compares every byte read through
/// nbdcopy with `want`.
fn verify_served(env: &Env, vol: &Path, want: &[u8], what: &str) {
    let srv = env.serve(&[s(vol)], &["--read-only"], false);
    let export = vol.file_stem().and_then(|x| x.to_str()).expect("stem");
    verify_uri(env, &srv.uri(export), want, what);
    let log = srv.stop();
    assert!(!log.contains("panicked"), "{what}: {log}");
}

fn verify_uri(env: &Env, uri: &str, want: &[u8], what: &str) {
    require("nbdcopy");
    let out = env.path("readback.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(Command::new("nbdcopy").arg(uri).arg(&out));
    let got = read(&out);
    assert_eq!(got.len(), want.len(), "{what}: size read back");
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let bad = (0..want.len()).filter(|&i| got[i] != want[i]).count();
        panic!(
            "{what}: data differs from the expected image at byte {i} (sector {}, zone {}); \
             {bad} bytes differ",
            i / 4096,
            i as u64 / ZONE
        );
    }
    let _ = std::fs::remove_file(&out);
}

/// All `"blob":"…"` values of both header copies' metadata JSON.
fn header_blobs(vol: &Path) -> Vec<String> {
    let area = read_at(vol, 0, 131072);
    let text = String::from_utf8_lossy(&area);
    let mut v: Vec<String> = text
        .split("\"blob\":\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

fn check_json(env: &Env, vol: &Path) -> (bool, serde_json::Value) {
    let out = run(env.cmd().args(["check", "--json"]).arg(vol));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("check --json printed no JSON:\n{text}"));
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("check --json ({e}): {line}"));
    (out.status.success(), v)
}

/// Runs `cryptvol reencrypt FILE` with a crash injected; asserts it died of SIGKILL.
fn reencrypt_crashing(env: &Env, vol: &Path, step: &str, skip: u64) {
    use std::os::unix::process::ExitStatusExt;
    let out = run(env
        .cmd()
        .env("CRYPTVOL_FAULT_INJECTION", "1")
        .env("CRYPTVOL_TEST_CRASH_AT", step)
        .env("CRYPTVOL_TEST_CRASH_SKIP", skip.to_string())
        .arg("reencrypt")
        .arg(vol));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{step} (skip {skip}): expected death by SIGKILL, got {}:\n{err}",
        out.status
    );
    assert!(
        err.contains(&format!("killing the process at step {step}")),
        "{err}"
    );
}

/// What the header must record after a crash.
#[derive(Debug, Clone, Copy, PartialEq)]
enum After {
    /// In progress: watermark, hotzone offset (if a step was interrupted).
    InProgress(u64, Option<u64>),
    /// The last header write (the new keyslots) reached the disk: finished. With the
    /// `check` finding of the other copy when the crash came before it was rewritten.
    Finished(Option<&'static str>),
}

/// What finishing an interrupted step at open converts in zone 3.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Conv {
    /// Every allocated sector (no new ciphertext had been written).
    All,
    /// Some (the crash came half-way through the zone's data).
    Part,
    /// None (all new ciphertext was on disk).
    None,
}

/// Allocated sectors of zone 3 (chunks 192..256; `c % 5` = 1 never written, = 2
/// zeroed and deallocated): 39 chunks of 16 sectors.
const ZONE3_ALLOCATED_SECTORS: u64 = 39 * 16;

struct Case {
    step: &'static str,
    skip: u64,
    after: After,
    converted: Conv,
}

/// Header writes during an offline re-encryption of 8 zones: #0 begin; zone z: #1+2z
/// (hotzone recorded), #2+2z (watermark past the zone, no hotzone); #17 finalize.
fn crash_matrix() -> Vec<Case> {
    let z3 = 3 * ZONE;
    let c = |step, skip, after, converted| Case {
        step,
        skip,
        after,
        converted,
    };
    let hot3 = After::InProgress(z3, Some(z3));
    vec![
        c("reencrypt-after-hotzone", 3, hot3, Conv::All),
        c("reencrypt-mid-zone", 3, hot3, Conv::Part),
        c("reencrypt-after-zone-data", 3, hot3, Conv::None),
        c(
            "reencrypt-before-finalize",
            0,
            After::InProgress(SIZE, None),
            Conv::None,
        ),
        // The begin write: only the first copy records the re-encryption.
        c("header-copy-1", 0, After::InProgress(0, None), Conv::None),
        // Zone 3's hotzone on the first copy only.
        c("header-copy-1", 7, hot3, Conv::All),
        // Zone 3's hotzone on both copies, no data written.
        c("header-copy-2", 7, hot3, Conv::All),
        // Zone 3 done on both copies.
        c(
            "header-copy-2",
            8,
            After::InProgress(z3 + ZONE, None),
            Conv::None,
        ),
        // Zone 3's "done" write torn on the first copy: the hotzone copy rules.
        c("header-copy-1-torn", 8, hot3, Conv::None),
        // Zone 3's hotzone written on the first copy, the second torn.
        c("header-copy-2-torn", 7, hot3, Conv::All),
        // The finalize write torn on the first copy: still in progress, all converted.
        c(
            "header-copy-1-torn",
            17,
            After::InProgress(SIZE, None),
            Conv::None,
        ),
        // The finalize write complete: done (the crash comes after the last write).
        c("header-copy-2", 17, After::Finished(None), Conv::None),
        // The finalize write on the first copy only: done, the second copy is stale.
        c(
            "header-copy-1",
            17,
            After::Finished(Some("HEADER_COPY_STALE")),
            Conv::None,
        ),
        // The finalize write on the first copy, the second torn: done, one copy damaged.
        c(
            "header-copy-2-torn",
            17,
            After::Finished(Some("HEADER_COPY_DAMAGED")),
            Conv::None,
        ),
    ]
}

fn run_case(env: &Env, base: &Path, want: &[u8], base_alloc: u64, i: usize, case: &Case) {
    let what = format!("case {i}: crash at {} (skip {})", case.step, case.skip);
    let vol = copy_volume(env, base, &format!("case{i}.img"));
    let old_blobs = header_blobs(&vol);
    assert_eq!(old_blobs.len(), 1, "{what}: one keyslot blob");
    reencrypt_crashing(env, &vol, case.step, case.skip);

    let info = info_json(env, &vol);
    let r = &info["reencrypt"];
    let (ok, verdict) = check_json(env, &vol);
    match case.after {
        After::InProgress(wm, hot) => {
            assert!(!r.is_null(), "{what}: info shows no re-encryption: {info}");
            assert_eq!(r["watermark"], wm, "{what}: {r}");
            assert_eq!(r["size"], SIZE, "{what}: {r}");
            assert_eq!(r["new_keyslots"].as_array().map(Vec::len), Some(1), "{r}");
            match hot {
                Some(off) => {
                    assert_eq!(r["hotzone"]["offset"], off, "{what}: {r}");
                    assert_eq!(r["hotzone"]["length"], ZONE, "{what}: {r}");
                }
                None => assert!(r["hotzone"].is_null(), "{what}: {r}"),
            }
            let text = run_ok(env.cmd().arg("info").arg(&vol));
            assert!(
                text.contains("re-encryption: in progress")
                    && text.contains(&format!("watermark {wm} bytes"))
                    && text.contains("interrupted step") == hot.is_some(),
                "{what}: info text:\n{text}"
            );
            assert!(!ok, "{what}: check passed an interrupted re-encryption");
            assert_eq!(verdict["verdict"], "NON_COMPLIANT", "{what}: {verdict}");
            assert!(
                verdict.to_string().contains("REENCRYPTION_INTERRUPTED"),
                "{what}: {verdict}"
            );
            // Resume without the crash: it finishes.
            let out = run(env.cmd().arg("reencrypt").arg(&vol));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{what}: resume failed ({}):\n{err}",
                out.status
            );
            // An interrupted step is finished at open: the resume starts after it.
            let resume_at = if hot.is_some() { wm + ZONE } else { wm };
            assert!(
                err.contains(&format!("resuming the re-encryption of {}", s(&vol)))
                    && err.contains(&format!("(watermark {resume_at} bytes)")),
                "{what}: the resume does not start at {resume_at}:\n{err}"
            );
            let converted = err
                .lines()
                .find(|l| l.contains("finished a re-encryption step interrupted by a crash"))
                .and_then(|l| l.split("converted=").nth(1))
                .and_then(|n| n.trim().parse::<u64>().ok());
            eprintln!("{what}: recovery converted {converted:?} sectors");
            match (hot, case.converted) {
                (None, _) => assert_eq!(converted, None, "{what}: {err}"),
                (Some(_), Conv::All) => {
                    assert_eq!(converted, Some(ZONE3_ALLOCATED_SECTORS), "{what}: {err}")
                }
                (Some(_), Conv::None) => assert_eq!(converted, Some(0), "{what}: {err}"),
                (Some(_), Conv::Part) => assert!(
                    converted.is_some_and(|n| n > 0 && n < ZONE3_ALLOCATED_SECTORS),
                    "{what}: {err}"
                ),
            }
            assert!(!err.contains("torn write"), "{what}: {err}");
        }
        After::Finished(finding) => {
            assert!(r.is_null(), "{what}: {info}");
            match finding {
                None => assert!(ok, "{what}: check: {verdict}"),
                Some(code) => {
                    assert!(!ok, "{what}: check: {verdict}");
                    let text = verdict.to_string();
                    assert!(
                        text.contains(code) && !text.contains("REENCRYPTION_INTERRUPTED"),
                        "{what}: {verdict}"
                    );
                    // Right after the crash the other header copy (stale, or torn: only
                    // its first 2 KiB rewritten) may still hold the old wrapped data key.
                    // The next read-write open rewrites both copies from the verified
                    // header: then the old wrapped key is gone and check passes.
                    let srv = env.serve(&[s(&vol)], &[], false);
                    let log = srv.stop();
                    assert!(
                        log.contains("rewrote both header copies"),
                        "{what}: no header repair at open:\n{log}"
                    );
                    let area = read_at(&vol, 0, 131072);
                    assert!(
                        !contains(&area, old_blobs[0].as_bytes()),
                        "{what}: the old wrapped key survived the repair"
                    );
                    let (ok, verdict) = check_json(env, &vol);
                    assert!(ok, "{what}: check after the repair: {verdict}");
                    verify_served(env, &vol, want, &what);
                    return;
                }
            }
        }
    }
    let info = info_json(env, &vol);
    assert!(info["reencrypt"].is_null(), "{what}: not finished: {info}");
    assert_eq!(
        info["allocation"]["allocated_bytes"], base_alloc,
        "{what}: re-encryption changed the allocation"
    );
    let (ok, verdict) = check_json(env, &vol);
    assert!(ok, "{what}: check after finishing: {verdict}");
    // The keyslot blob changed; the old one is gone from both header copies.
    let new_blobs = header_blobs(&vol);
    assert_eq!(new_blobs.len(), 1, "{what}: {new_blobs:?}");
    assert_ne!(new_blobs, old_blobs, "{what}: keyslot not re-wrapped");
    let area = read_at(&vol, 0, 131072);
    assert!(
        !contains(&area, old_blobs[0].as_bytes()),
        "{what}: the old wrapped key is still in the header area"
    );
    verify_served(env, &vol, want, &what);
    let _ = std::fs::remove_file(&vol);
}

fn matrix(range: std::ops::Range<usize>) {
    let env = Env::new();
    let base = known_volume(&env, "base.img");
    let want = expected_image();
    verify_served(&env, &base, &want, "the known content before re-encryption");
    let base_alloc = info_json(&env, &base)["allocation"]["allocated_bytes"]
        .as_u64()
        .expect("allocated_bytes");
    assert!(
        base_alloc > 0 && base_alloc < SIZE,
        "the known volume must be partly allocated: {base_alloc}"
    );
    let cases = crash_matrix();
    for i in range {
        run_case(&env, &base, &want, base_alloc, i, &cases[i]);
    }
}

/// Crashes inside the re-encryption steps (and before finalizing).
#[test]
fn offline_crash_matrix_steps() {
    matrix(0..4);
}

/// Crashes during the header writes of the begin, zone and finalize steps.
#[test]
fn offline_crash_matrix_header_writes() {
    matrix(4..crash_matrix().len());
}

fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let logf = std::fs::File::create(log).expect("log");
    cmd.stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("spawn cryptvol")
}

/// The watermark the header records (0 when none is in progress).
fn header_watermark(env: &Env, vol: &Path) -> Option<u64> {
    info_json(env, vol)["reencrypt"]["watermark"].as_u64()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ctrl-C during an offline re-encryption: a prompt exit with a clear message, the
/// watermark in the header; the next run resumes there (not from 0). Meanwhile the
/// half-converted volume serves correct data read-only (both keys), and the daemon
/// refuses to re-encrypt it read-only without retrying in a loop.
#[test]
fn ctrl_c_stops_offline_reencryption_and_the_next_run_resumes() {
    let env = Env::new();
    let vol = known_volume(&env, "vol.img");
    let want = expected_image();
    let old_blobs = header_blobs(&vol);
    let log = env.path("reencrypt1.log");
    let mut child = spawn(
        env.cmd()
            .env("CRYPTVOL_FAULT_INJECTION", "1")
            // 1 s per 4 MiB step (8 steps): the Ctrl-C sent once the watermark passes
            // 8 MiB lands seconds before the end even when noticing that is slow.
            .env("CRYPTVOL_TEST_REENCRYPT_STEP_DELAY_MS", "1000")
            .arg("reencrypt")
            .arg(&vol),
        &log,
    );
    wait_until("the watermark to pass 8 MiB", 60, || {
        header_watermark(&env, &vol).is_some_and(|w| w >= 2 * ZONE)
    });
    // Prompt means between two steps, not at the end: the watermark checked below is
    // short of the end (the clock is only the failure bound).
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = wait_child(&mut child, PATIENCE, "the interrupted re-encryption");
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success() && status.code().is_some(),
        "{status}: {err}"
    );
    assert!(
        err.contains("interrupted at") && err.contains("run the same command again to resume"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let info = info_json(&env, &vol);
    let wm = info["reencrypt"]["watermark"]
        .as_u64()
        .expect("in progress");
    assert!((2 * ZONE..SIZE).contains(&wm), "{info}");
    assert_eq!(wm % ZONE, 0, "stopped between steps: {info}");
    assert!(info["reencrypt"]["hotzone"].is_null(), "clean stop: {info}");
    assert!(
        err.contains(&format!("({wm} bytes under the new data key")),
        "the message gives the watermark the header records ({wm}):\n{err}"
    );

    // Half converted, served read-only: reads are right on both sides of the watermark;
    // re-encryption is refused and not attempted in the background.
    let ctl = env.path("control.sock");
    let srv = env.serve(&[s(&vol)], &["--read-only", "--control", s(&ctl)], false);
    verify_uri(&env, &srv.uri("vol"), &want, "read-only, half re-encrypted");
    let err = fails(env.cmd().args(["reencrypt", "vol", "--control"]).arg(&ctl));
    assert!(
        err.contains("served read-only") && err.contains("serve it read-write"),
        "{err}"
    );
    let st = run_ok(
        env.cmd()
            .args(["reencrypt", "--status", "--json", "vol", "--control"])
            .arg(&ctl),
    );
    let st: serde_json::Value = serde_json::from_str(&st).expect("status json");
    assert_eq!(st["in_progress"], true, "{st}");
    assert_eq!(st["reencrypt"]["watermark"], wm, "{st}");
    assert_eq!(st["reencrypt"]["running"], false, "{st}");
    let log = srv.stop();
    assert!(
        log.contains("served read-only") && !log.contains("step failed"),
        "{log}"
    );
    assert_eq!(
        header_watermark(&env, &vol),
        Some(wm),
        "read-only changed it"
    );

    // The next run resumes at the watermark and finishes.
    let out = run(env.cmd().arg("reencrypt").arg(&vol));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("resuming the re-encryption of {}", s(&vol)))
            && err.contains(&format!("(watermark {wm} bytes)")),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("the old data key is destroyed"), "{stdout}");
    assert!(info_json(&env, &vol)["reencrypt"].is_null());
    let new_blobs = header_blobs(&vol);
    assert_eq!(new_blobs.len(), 1);
    assert_ne!(new_blobs, old_blobs);
    verify_served(&env, &vol, &want, "after resuming");
}

fn ctl_status(env: &Env, ctl: &Path) -> serde_json::Value {
    let out = run_ok(
        env.cmd()
            .args(["reencrypt", "--status", "--json", "vol", "--control"])
            .arg(ctl),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("--status --json ({e}):\n{out}"))
}

fn serve_delayed(env: &Env, vol: &Path, ctl: &Path, extra: &[&str]) -> Server {
    let sock = env.path("nbd.sock");
    let mut args = vec!["--control", s(ctl)];
    args.extend_from_slice(extra);
    env.serve_env(
        &sock,
        &[s(vol)],
        &args,
        false,
        &[
            ("CRYPTVOL_FAULT_INJECTION", "1"),
            ("CRYPTVOL_TEST_REENCRYPT_STEP_DELAY_MS", "300"),
        ],
    )
}

/// Online: status during and after, a second request refused, SIGTERM between steps,
/// automatic resume at the next start (no client request), a read-only export refused.
#[test]
fn online_status_refusals_and_resume_after_sigterm() {
    let env = Env::new();
    let vol = known_volume(&env, "vol.img");
    let want = expected_image();
    let old_blobs = header_blobs(&vol);
    let ctl = env.path("control.sock");

    // A path that is no volume file: said so (not only "no such export").
    let err = fails(
        env.cmd()
            .arg("reencrypt")
            .arg(env.path("missing.img"))
            .arg("--control")
            .arg(env.path("none.sock")),
    );
    assert!(
        err.contains("there is no volume file at that path"),
        "{err}"
    );

    // Read-only: refused, nothing changes.
    let srv = env.serve(&[s(&vol)], &["--read-only", "--control", s(&ctl)], false);
    let err = fails(env.cmd().args(["reencrypt", "vol", "--control"]).arg(&ctl));
    assert!(
        err.contains("served read-only") && err.contains("serve it read-write"),
        "{err}"
    );
    srv.stop();
    assert!(info_json(&env, &vol)["reencrypt"].is_null());
    assert_eq!(header_blobs(&vol), old_blobs);

    let srv = serve_delayed(&env, &vol, &ctl, &[]);
    let st = ctl_status(&env, &ctl);
    assert_eq!(st["in_progress"], false, "{st}");
    assert!(st["reencrypt"].is_null(), "{st}");
    let out = run_ok(
        env.cmd()
            .args(["reencrypt", "vol", "--no-wait", "--json", "--control"])
            .arg(&ctl),
    );
    let started: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(started["started"], true, "{started}");
    assert_eq!(started["size"], SIZE, "{started}");
    let st = ctl_status(&env, &ctl);
    assert_eq!(st["in_progress"], true, "{st}");
    let r = &st["reencrypt"];
    assert_eq!(r["running"], true, "{st}");
    assert_eq!(r["finished"], false, "{st}");
    assert_eq!(r["size"], SIZE, "{st}");
    assert!(r["watermark"].as_u64().is_some_and(|w| w < SIZE), "{st}");
    // A second request while it runs: refused, pointing at --status.
    let err = fails(env.cmd().args(["reencrypt", "vol", "--control"]).arg(&ctl));
    assert!(
        err.contains("already being re-encrypted")
            && err.contains("cryptvol reencrypt --status vol"),
        "{err}"
    );
    let text = run_ok(
        env.cmd()
            .args(["reencrypt", "--status", "vol", "--control"])
            .arg(&ctl),
    );
    assert!(text.contains("vol: re-encrypting: "), "{text}");
    // SIGTERM between steps once a few zones are done.
    wait_until("the watermark to pass 8 MiB", 60, || {
        ctl_status(&env, &ctl)["reencrypt"]["watermark"]
            .as_u64()
            .is_some_and(|w| w >= 2 * ZONE)
    });
    let log = srv.stop();
    assert!(
        log.contains("paused at") && log.contains("resumes at the next start"),
        "{log}"
    );
    let info = info_json(&env, &vol);
    let wm = info["reencrypt"]["watermark"]
        .as_u64()
        .expect("in progress");
    assert!((2 * ZONE..SIZE).contains(&wm), "{info}");
    assert!(info["reencrypt"]["hotzone"].is_null(), "clean stop: {info}");

    // Restart: it resumes by itself and finishes; no client request.
    let srv = serve_delayed(&env, &vol, &ctl, &[]);
    let st = ctl_status(&env, &ctl);
    assert!(
        st["reencrypt"]["watermark"]
            .as_u64()
            .is_some_and(|w| w >= wm),
        "resumed below the recorded watermark {wm}: {st}"
    );
    wait_until("the resumed re-encryption to finish", 60, || {
        ctl_status(&env, &ctl)["reencrypt"]["finished"] == true
    });
    let st = ctl_status(&env, &ctl);
    assert_eq!(st["in_progress"], false, "{st}");
    assert_eq!(st["reencrypt"]["watermark"], SIZE, "{st}");
    let text = run_ok(
        env.cmd()
            .args(["reencrypt", "--status", "vol", "--control"])
            .arg(&ctl),
    );
    assert!(text.contains("vol: re-encryption complete"), "{text}");
    verify_uri(
        &env,
        &srv.uri("vol"),
        &want,
        "served after the resumed re-encryption",
    );
    let log = srv.stop();
    assert!(
        log.contains("resuming an interrupted re-encryption")
            && log.contains(&format!("watermark={wm}")),
        "{log}"
    );
    assert!(log.contains("re-encryption complete"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(info_json(&env, &vol)["reencrypt"].is_null());
    let new_blobs = header_blobs(&vol);
    assert_eq!(new_blobs.len(), 1);
    assert_ne!(new_blobs, old_blobs, "keyslot not re-wrapped");
    verify_served(&env, &vol, &want, "after the online re-encryption");
}

/// A volume with a key keyslot and a passphrase keyslot, re-encrypted offline with
/// --passphrase-file: both keyslots are re-wrapped (new blobs, old ones gone), and each
/// alone opens the volume with the data intact.
#[test]
fn offline_reencryption_rewraps_key_and_passphrase_keyslots() {
    let env = Env::new();
    let vol = known_volume(&env, "vol.img");
    let want = expected_image();
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse battery\n").expect("passphrase file");
    run_ok(
        env.cmd()
            .args([
                "keyslot",
                "add",
                "--pbkdf-memory",
                "8192",
                "--pbkdf-time",
                "1",
                "--passphrase-file",
            ])
            .arg(&pass)
            .arg(&vol),
    );
    let before = info_json(&env, &vol);
    assert_eq!(before["keyslots"].as_array().map(Vec::len), Some(2));
    let old_blobs = header_blobs(&vol);
    assert_eq!(old_blobs.len(), 2, "{old_blobs:?}");

    // A wrong passphrase: refused before anything changes.
    let wrong = env.path("wrong");
    std::fs::write(&wrong, "not the passphrase\n").expect("file");
    let err = fails(
        env.cmd()
            .args(["reencrypt", "--passphrase-file"])
            .arg(&wrong)
            .arg(&vol),
    );
    assert!(err.contains("passphrase"), "{err}");
    assert!(info_json(&env, &vol)["reencrypt"].is_null());
    assert_eq!(header_blobs(&vol), old_blobs);

    let out = run_ok(
        env.cmd()
            .args(["reencrypt", "--passphrase-file"])
            .arg(&pass)
            .arg(&vol),
    );
    assert!(
        out.contains("keyslots now: 0: local") && out.contains("1: passphrase"),
        "{out}"
    );
    let after = info_json(&env, &vol);
    assert!(after["reencrypt"].is_null(), "{after}");
    let ks = after["keyslots"].as_array().expect("keyslots");
    assert_eq!(ks.len(), 2, "{after}");
    assert_eq!(ks[0]["backend"], before["keyslots"][0]["backend"]);
    assert_eq!(ks[0]["key_id"], before["keyslots"][0]["key_id"]);
    assert_eq!(ks[1]["backend"], "passphrase", "{after}");
    let new_blobs = header_blobs(&vol);
    assert_eq!(new_blobs.len(), 2, "{new_blobs:?}");
    let area = read_at(&vol, 0, 131072);
    for b in &old_blobs {
        assert!(
            !contains(&area, b.as_bytes()),
            "an old wrapped key is still in the header area"
        );
    }
    // The passphrase alone (an empty keystore: the key keyslot cannot open).
    let empty = env.path("empty-keystore");
    std::fs::create_dir(&empty).expect("mkdir");
    let sock = env.path("pass.sock");
    let srv = env.serve_env(
        &sock,
        &[s(&vol)],
        &["--read-only", "--passphrase-file", s(&pass)],
        false,
        &[("CRYPTVOL_KEYSTORE", s(&empty))],
    );
    verify_uri(&env, &srv.uri("vol"), &want, "opened with the passphrase");
    srv.stop();
    // The key keyslot alone.
    verify_served(&env, &vol, &want, "opened with the master key");
}
