//! Live export management against a real `cryptvol serve --config FILE --control PATH`:
//! `cryptvol exports add|remove|list` and a config reload on SIGHUP, while a client of
//! another export does verified I/O the whole time and must never see an error.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const BLOCK: usize = 4096;
/// Blocks the background client cycles through on export `a`.
const A_BLOCKS: u64 = 256;

fn config(env: &Env, exports: &[(&str, &Path)]) -> PathBuf {
    config_with(env, exports, "")
}

/// A config file with `exports`, the last one with `extra` lines in its table.
fn config_with(env: &Env, exports: &[(&str, &Path)], extra: &str) -> PathBuf {
    let mut text = String::new();
    for (name, path) in exports {
        text.push_str(&format!(
            "\n[[export]]\nname = \"{name}\"\npath = \"{}\"\n",
            s(path)
        ));
    }
    text.push_str(extra);
    let p = env.path("cryptvol.toml");
    let tmp = env.path("cryptvol.toml.new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, &p).expect("rename config");
    p
}

fn exports_cmd(env: &Env, ctl: &Path, args: &[&str]) -> std::process::Output {
    run(env
        .cmd()
        .arg("exports")
        .args(args)
        .arg("--control")
        .arg(ctl))
}

/// The export names `exports list --json` shows.
fn listed(env: &Env, ctl: &Path) -> Vec<String> {
    let out = run_ok(
        env.cmd()
            .args(["exports", "list", "--json", "--control"])
            .arg(ctl),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("exports list --json");
    v["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_string())
        .collect()
}

/// Whether `exports list --json` shows `export` read-only (`None`: not listed).
fn read_only(env: &Env, ctl: &Path, export: &str) -> Option<bool> {
    let out = run_ok(
        env.cmd()
            .args(["exports", "list", "--json", "--control"])
            .arg(ctl),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("exports list --json");
    v["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .find(|e| e["name"] == export)
        .map(|e| e["read_only"].as_bool().expect("read_only"))
}

/// Waits until `export` has no client (as `exports list --json` reports).
fn wait_idle(env: &Env, ctl: &Path, export: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run_ok(
            env.cmd()
                .args(["exports", "list", "--json", "--control"])
                .arg(ctl),
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("exports list --json");
        let busy = v["exports"]
            .as_array()
            .expect("exports array")
            .iter()
            .any(|e| e["name"] == export && e["connections"] != 0);
        if !busy {
            return;
        }
        assert!(Instant::now() < deadline, "{export} keeps a client: {out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `count` blocks on `export` and reads them back.
fn verified_io(srv: &Server, export: &str, seed: u64, count: u64) -> Raw {
    let (mut c, size, _) = Raw::open(srv, export);
    assert!(size >= count * BLOCK as u64, "export {export} is too small");
    for i in 0..count {
        let data = pattern(BLOCK, seed + i);
        assert_eq!(c.write(i, i * BLOCK as u64, &data), 0, "write on {export}");
    }
    for i in 0..count {
        let back = c.read(100 + i, i * BLOCK as u64, BLOCK as u32);
        assert_eq!(
            back.as_deref(),
            Ok(&pattern(BLOCK, seed + i)[..]),
            "{export} block {i}"
        );
    }
    c
}

/// A client of `a` writing and verifying blocks until told to stop; returns the number of
/// verified rounds (any error panics the thread, which fails the test at `join`).
struct Background {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Background {
    fn start(srv: &Server) -> Background {
        let (mut c, _, _) = Raw::open(srv, "a");
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (st, rd) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !st.load(Ordering::SeqCst) {
                let block = n % A_BLOCKS;
                let data = pattern(BLOCK, 1_000_000 + n);
                let off = block * BLOCK as u64;
                assert_eq!(c.write(n, off, &data), 0, "a: write {n} failed");
                let back = c.read(n, off, BLOCK as u32).expect("a: read failed");
                assert!(
                    back == data,
                    "a: block {block} does not read back (round {n})"
                );
                n += 1;
                rd.store(n, Ordering::SeqCst);
            }
            c.disconnect();
        });
        Background {
            stop,
            rounds,
            thread,
        }
    }
    /// Waits until the client has done `more` further rounds (it is still running).
    fn progresses(&self, more: u64) {
        let start = self.rounds.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.rounds.load(Ordering::SeqCst) < start + more {
            assert!(!self.thread.is_finished(), "the client of a stopped");
            assert!(
                Instant::now() < deadline,
                "the client of a made no progress"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the client of a saw an error");
        self.rounds.load(Ordering::SeqCst)
    }
}

/// Waits until the server's log has `needle` at least `count` times.
fn wait_log(srv: &Server, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while srv.log_text().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exports_are_added_removed_and_reloaded_while_another_export_keeps_serving() {
    let env = Env::new();
    let a = env.create("a.img", "8M", &[]);
    let b = env.create("b.img", "8M", &[]);
    let c = env.create("c.img", "8M", &[]);
    let d = env.create("d.img", "8M", &[]);
    let ctl = env.path("control.sock");
    let cfg = config(&env, &[("a", &a), ("d", &d)]);
    let srv = env.serve(&[], &["--config", s(&cfg), "--control", s(&ctl)], false);
    let bg = Background::start(&srv);
    bg.progresses(20);

    // Add b through the CLI and do verified I/O on it.
    let out = exports_cmd(&env, &ctl, &["add", &format!("b={}", s(&b))]);
    assert!(out.status.success(), "exports add b: {out:?}");
    assert_eq!(listed(&env, &ctl), ["a", "d", "b"]);
    let mut cb = verified_io(&srv, "b", 7, 16);
    bg.progresses(20);

    // A name already served is refused; so is a file that is not a volume.
    let dup = fails(
        env.cmd()
            .args(["exports", "add", &format!("a={}", s(&c)), "--control"])
            .arg(&ctl),
    );
    assert!(dup.contains("\"a\" is already served"), "{dup}");
    std::fs::write(env.path("junk.img"), vec![0u8; 1 << 20]).unwrap();
    let junk = fails(
        env.cmd()
            .args([
                "exports",
                "add",
                &format!("j={}", s(&env.path("junk.img"))),
                "--control",
            ])
            .arg(&ctl),
    );
    assert!(junk.contains("cannot open volume"), "{junk}");

    // Removing b while its client is connected is refused, naming the count and --force.
    let busy = fails(
        env.cmd()
            .args(["exports", "remove", "b", "--control"])
            .arg(&ctl),
    );
    assert!(
        busy.contains("1 client(s) connected") && busy.contains("--force"),
        "{busy}"
    );
    assert_eq!(
        cb.read(500, 0, BLOCK as u32).as_deref(),
        Ok(&pattern(BLOCK, 7)[..])
    );

    // --force disconnects b's client cleanly and drops the export.
    let out = run_ok(
        env.cmd()
            .args(["exports", "remove", "b", "--force", "--control"])
            .arg(&ctl),
    );
    assert!(out.contains("1 client(s) disconnected"), "{out}");
    cb.expect_closed(Duration::from_secs(60));
    assert_eq!(listed(&env, &ctl), ["a", "d"]);
    let mut probe = Raw::start(&srv);
    let refused = probe.go("b").expect_err("b is still served");
    assert_eq!(refused.kind, proto::REP_ERR_UNKNOWN, "{refused:?}");
    wait_log(&srv, "client disconnected: export removed", 1);
    bg.progresses(20);

    // Its volume and key were released: it can be added again, and removed idle.
    run_ok(
        env.cmd()
            .args(["exports", "add", &format!("b={}", s(&b)), "--control"])
            .arg(&ctl),
    );
    drop(verified_io(&srv, "b", 7, 1));
    run_ok(
        env.cmd()
            .args(["exports", "remove", "b", "--control"])
            .arg(&ctl),
    );

    // SIGHUP: the config now names a and c (d is gone).
    config(&env, &[("a", &a), ("c", &c)]);
    srv.signal("HUP");
    wait_log(&srv, "SIGHUP: config reload done", 1);
    assert_eq!(listed(&env, &ctl), ["a", "c"]);
    let cc = verified_io(&srv, "c", 99, 8);

    // A reload that drops c while its client is connected keeps serving it, with a warning;
    // once the client is gone, the next reload removes it.
    config(&env, &[("a", &a)]);
    srv.signal("HUP");
    wait_log(&srv, "SIGHUP: config reload done", 2);
    assert!(
        srv.log_text()
            .contains("export removed from the config file is still served"),
        "{}",
        srv.log_text()
    );
    assert_eq!(listed(&env, &ctl), ["a", "c"]);
    cc.disconnect();
    wait_idle(&env, &ctl, "c");
    srv.signal("HUP");
    wait_log(&srv, "SIGHUP: config reload done", 3);
    assert_eq!(listed(&env, &ctl), ["a"]);
    config(&env, &[("a", &a), ("c", &c)]);
    srv.signal("HUP");
    wait_log(&srv, "SIGHUP: config reload done", 4);
    assert_eq!(listed(&env, &ctl), ["a", "c"]);
    let cc = verified_io(&srv, "c", 99, 1);

    // A changed export (now read-only) with a client is served unchanged, with a warning;
    // idle, the next reload replaces it.
    config_with(&env, &[("a", &a), ("c", &c)], "read_only = true\n");
    srv.signal("HUP");
    wait_log(&srv, "SIGHUP: config reload done", 5);
    assert!(
        srv.log_text()
            .contains("export changed in the config file but has clients"),
        "{}",
        srv.log_text()
    );
    assert_eq!(read_only(&env, &ctl, "c"), Some(false));
    cc.disconnect();
    wait_idle(&env, &ctl, "c");
    srv.signal("HUP");
    wait_log(&srv, "SIGHUP: config reload done", 6);
    assert_eq!(read_only(&env, &ctl, "c"), Some(true));
    assert_eq!(listed(&env, &ctl), ["a", "c"]);

    // A broken config on reload changes nothing.
    std::fs::write(&cfg, "[[export]\nname = ").unwrap();
    srv.signal("HUP");
    wait_log(&srv, "the config file cannot be used, nothing changed", 1);
    assert_eq!(listed(&env, &ctl), ["a", "c"]);

    bg.progresses(20);
    let rounds = bg.finish();
    assert!(rounds >= 100, "the client of a did only {rounds} rounds");
    // Everything a's client wrote last is there.
    let (mut check, _, _) = Raw::open(&srv, "a");
    for n in rounds.saturating_sub(A_BLOCKS)..rounds {
        let block = n % A_BLOCKS;
        let back = check
            .read(n, block * BLOCK as u64, BLOCK as u32)
            .expect("read a");
        assert!(
            back == pattern(BLOCK, 1_000_000 + n),
            "a: block {block} lost"
        );
    }
    check.disconnect();
    let log = srv.stop();
    assert!(log.contains("export removed"), "{log}");
}
