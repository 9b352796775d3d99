//! kill -9 cycles under verified I/O (issue 17 item 2): the short mode of
//! `scripts/crash-test.sh`, and the journaling client's checker catching lost and
//! garbled blocks (so a passing cycle means something).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn client() -> PathBuf {
    repo().join("scripts").join("crash").join("crashclient.py")
}

/// Every variant (I/O only, online re-encryption, served snapshot, offline rekey,
/// offline resize) on the thin and the thick volume, each cycle ending in a kill -9.
#[test]
fn short_crash_cycles_lose_nothing() {
    require_python_nbd();
    let out = run(Command::new(repo().join("scripts").join("crash-test.sh"))
        .arg("--short")
        .env("CRYPTVOL_BIN", bin()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "crash-test.sh --short failed:\n{report}"
    );
    assert!(
        stdout.contains(
            "crash-test tally: cycles=10 passed=10 failed=0 \
             plain=2 reencrypt=2 snapshot=2 rekey=2 resize=2 "
        ),
        "{report}"
    );
    let ok_lines = stdout.lines().filter(|l| l.contains(": OK ")).count();
    assert_eq!(ok_lines, 10, "{report}");
    // The thick volume's rekey and resize are killed at a named step, mid-update.
    assert_eq!(stdout.matches("killed at step").count(), 2, "{report}");
    assert_eq!(
        stdout.matches("resumed re-encryption finished").count(),
        2,
        "{report}"
    );
}

fn py(args: &[&str]) -> std::process::Output {
    run(Command::new("/usr/bin/python3").arg(client()).args(args))
}

fn start_work(uri: &str, state: &Path, journals: &Path, progress: &Path) -> Child {
    Command::new("/usr/bin/python3")
        .arg(client())
        .args(["work", uri, s(state), s(journals), s(progress), "7", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start crashclient.py work")
}

/// Acknowledged requests and completed flushes the client has reported.
fn progress(p: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let v: Vec<u64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (
        v.first().copied().unwrap_or(0),
        v.get(1).copied().unwrap_or(0),
    )
}

fn state_blocks(state: &Path) -> Vec<(u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).expect("state")).expect("json");
    let mut blocks: Vec<(u64, u64)> = v["blocks"]
        .as_object()
        .expect("blocks")
        .iter()
        .map(|(k, g)| (k.parse().expect("block"), g.as_u64().expect("gen")))
        .collect();
    blocks.sort_unstable();
    blocks
}

#[test]
fn checker_reports_lost_and_garbled_blocks() {
    require_python_nbd();
    let env = Env::new();
    let vol = env.create("check.vol", "4M", &[]);
    let (state, journals, prog) = (
        env.path("state.json"),
        env.path("journal"),
        env.path("progress"),
    );
    std::fs::write(&state, r#"{"blocks": {}, "next_gen": 1}"#).expect("state");
    std::fs::create_dir(&journals).expect("journal dir");
    let sock = env.path("nbd.sock");
    let srv = env.serve_on(&sock, &[s(&vol)], &[], false);
    let uri = srv.uri("check");
    let mut work = start_work(&uri, &state, &journals, &prog);
    wait_until(
        Duration::from_secs(300),
        "300 acknowledged writes and 3 completed flushes from the client",
        || {
            assert!(
                work.try_wait().expect("poll").is_none(),
                "client ended early"
            );
            let (acked, flushed) = progress(&prog);
            acked >= 300 && flushed >= 3
        },
    );
    srv.signal("KILL");
    srv.wait_exit(Duration::from_secs(60));
    let out = work.wait_with_output().expect("client");
    assert!(out.status.success(), "{out:?}");
    let srv = env.serve_on(&sock, &[s(&vol)], &[], false);
    // The real crash passes, and the verified image becomes the state.
    let out = py(&["verify", &uri, s(&state), s(&journals)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(r#""result": "OK""#),
        "{text}"
    );
    for f in std::fs::read_dir(&journals).expect("journals") {
        std::fs::remove_file(f.expect("entry").path()).expect("rm journal");
    }
    let blocks = state_blocks(&state);
    assert!(blocks.len() >= 3, "too few blocks written: {blocks:?}");
    let ((zeroed, _), (regen, gen), (garbled, _)) = (blocks[0], blocks[1], blocks[2]);
    // Lose one block to zeros, give one a generation never written, garble one.
    let script = format!(
        "import sys\nsys.dont_write_bytecode = True\nsys.path.insert(0, '{dir}')\nimport crashclient\n\
         h.pwrite(bytes(4096), {zeroed} * 4096)\n\
         h.pwrite(crashclient.record({regen}, {gen} + 1000000), {regen} * 4096)\n\
         h.pwrite(b'\\x5a' * 4096, {garbled} * 4096)\nh.flush()",
        dir = client().parent().expect("dir").display()
    );
    let out = nbdsh(&uri, &script);
    assert!(out.status.success(), "{out:?}");
    let out = py(&["verify", &uri, s(&state), s(&journals)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(r#""lost": 2"#) && text.contains(r#""garbage": 1"#),
        "{text}"
    );
    for b in [zeroed, regen, garbled] {
        assert!(
            text.contains(&format!(", {b}, ")),
            "block {b} not named: {text}"
        );
    }
    srv.stop();
}
