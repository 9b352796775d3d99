//! Growing a served volume online (issue 16 item 2): `cryptvol resize --control PATH
//! EXPORT --size SIZE` while an nbdsh client does verified I/O the whole time; new
//! connections (nbdinfo) see the new size, the grown space reads and writes, the metrics'
//! size gauge follows, the audit log records it, and after the daemon stops the volume
//! checks clean and reopens with the new size. Shrinking is refused with a clear error.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const OLD: u64 = 64 * MIB + 4096; // the last 64 KiB chunk is short
const MID: u64 = OLD + 64 * MIB;
/// Past 2 GiB the allocation map needs a second page: the second grow moves it.
const BIG: u64 = 3 << 30;

/// An nbdsh client that writes and reads back 4 KiB blocks all over the first half of the
/// size of its handshake (the test's own marks are in the last chunk) until `stop` exists,
/// recording its count of verified blocks in `progress`.
fn start_verifier(uri: &str, progress: &Path, stop: &Path) -> Child {
    require("nbdsh");
    let script = format!(
        r#"
import os
size = h.get_size()
blocks = size // 4096 // 2
i = 0
while not os.path.exists({stop:?}):
    off = (i * 7919 % blocks) * 4096
    data = bytes([(i + k) % 251 for k in range(16)]) * 256
    h.pwrite(data, off)
    got = h.pread(4096, off)
    assert got == data, "block at %d differs" % off
    i += 1
    with open({progress:?} + ".tmp", "w") as f:
        f.write(str(i))
    os.replace({progress:?} + ".tmp", {progress:?})
h.flush()
# The export grew meanwhile: this connection keeps the size of its handshake, but a
# client told the new size another way (a kernel device: attach --refresh-size) may use
# the grown space on it. libnbd's own bounds check is turned off for that.
h.set_strict_mode(0)
h.pwrite(b'X' * 4096, size)
assert h.pread(4096, size) == b'X' * 4096, "the grown space on an old connection"
print("VERIFIED", i, size, "BEYOND-OK")
"#,
        stop = s(stop),
        progress = s(progress),
    );
    // As `common::nbdsh`: the distribution's Python has the libnbd bindings.
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("nbdsh")
        .env("PATH", path)
        .args(["-u", uri, "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbdsh")
}

fn verified(progress: &Path) -> u64 {
    std::fs::read_to_string(progress)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the verifier has verified more than `than` blocks.
fn wait_progress(progress: &Path, than: u64, client: &mut Child) -> u64 {
    wait_until(
        Duration::from_secs(180),
        &format!("the verifying client to pass {than} blocks"),
        || {
            if let Ok(Some(status)) = client.try_wait() {
                let mut err = String::new();
                if let Some(e) = client.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the verifying client exited early ({status}):\n{err}");
            }
            verified(progress) > than
        },
    );
    verified(progress)
}

fn resize(env: &Env, ctl: &Path, size: &str) -> std::process::Output {
    run(env
        .cmd()
        .args(["resize", "--control", s(ctl), "g", "--size", size]))
}

/// The size gauge of export `g`, scraped from the metrics endpoint.
fn scraped_size(srv: &Server) -> u64 {
    srv.metric("cryptvol_volume_size_bytes{export=\"g\"}") as u64
}

#[test]
fn online_grow_under_verified_io_is_seen_by_new_connections_and_survives_a_restart() {
    require("nbdsh");
    let env = Env::new();
    let vol = env.create("g.vol", &OLD.to_string(), &[]);
    let ctl = env.path("control.sock");
    let export = format!("g={}", s(&vol));
    let srv = env.serve(
        &[&export],
        &["--control", s(&ctl), "--metrics", "127.0.0.1:0"],
        false,
    );
    assert_eq!(scraped_size(&srv), OLD);
    nbdsh_ok(
        &srv.uri("g"),
        &format!("h.pwrite(b'Z' * 8192, {})\nh.flush()", OLD - 8192),
    );
    let (progress, stop) = (env.path("progress"), env.path("stop"));
    let mut client = start_verifier(&srv.uri("g"), &progress, &stop);
    let mut seen = wait_progress(&progress, 0, &mut client);

    let big = BIG.to_string();
    for (arg, want, moved) in [("+64M", MID, false), (big.as_str(), BIG, true)] {
        let out = resize(&env, &ctl, arg);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("grown online") && text.contains(&want.to_string()),
            "{text}"
        );
        assert_eq!(text.contains("allocation map was moved"), moved, "{text}");
        assert!(text.contains("keep the old one"), "{text}");
        // A new connection sees the new size; the gauge follows.
        assert_eq!(nbdinfo_size(&srv.uri("g")), want);
        assert_eq!(scraped_size(&srv), want);
        // The client kept verifying through the grow.
        seen = wait_progress(&progress, seen, &mut client);
    }

    // The grown space: zeros after the old end (also in the old last chunk), and writes
    // at the new end read back.
    let got = nbdsh_ok(
        &srv.uri("g"),
        &format!(
            "assert h.get_size() == {big}\n\
             assert h.pread(8192, {old} - 8192) == b'Z' * 8192\n\
             assert h.pread(65536, {old}) == bytes(65536)\n\
             h.pwrite(b'M' * 4096, {mid} - 4096)\n\
             h.pwrite(b'E' * 4096, {big} - 4096)\nh.flush()\n\
             assert h.pread(4096, {mid} - 4096) == b'M' * 4096\n\
             assert h.pread(4096, {big} - 4096) == b'E' * 4096\n\
             print('OK')",
            big = BIG,
            old = OLD,
            mid = MID,
        ),
    );
    assert!(got.contains("OK"), "{got}");

    // Shrinking is refused, saying why and what to do; the size stays.
    let out = resize(&env, &ctl, "32M");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot shrink") && err.contains("new volume and copy"),
        "{err}"
    );
    assert_eq!(nbdinfo_size(&srv.uri("g")), BIG);

    std::fs::write(&stop, b"").unwrap();
    let out = client.wait_with_output().expect("nbdsh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the verifying client failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It kept the size of its handshake the whole time, and could use the grown space.
    assert!(text.contains(&format!(" {OLD} BEYOND-OK")), "{text}");
    eprintln!("verifying client: {}", text.trim());
    srv.stop();

    // Audit records, a clean check, and the new size when opened again.
    let audit = String::from_utf8_lossy(&read(&env.keystore().join("audit.jsonl"))).into_owned();
    let grows: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"operation\":\"resize\"") && l.contains("online=true"))
        .collect();
    assert_eq!(grows.len(), 3, "{audit}");
    assert!(grows[0].contains(&format!("{OLD}->{MID}")) && grows[0].contains("\"result\":\"ok\""));
    assert!(grows[1].contains(&format!("{MID}->{BIG}")));
    assert!(grows[2].contains("\"result\":\"error\""), "{}", grows[2]);
    let out = run(env.cmd().arg("check").arg(&vol));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("COMPLIANT"), "{text}");
    assert_eq!(info_json(&env, &vol)["size"], BIG);
    let srv = env.serve(&[&export], &[], false);
    let got = nbdsh_ok(
        &srv.uri("g"),
        &format!(
            "assert h.pread(4096, {big} - 4096) == b'E' * 4096\n\
             assert h.pread(8192, {old} - 8192) == b'Z' * 8192\nprint('OK', h.get_size())",
            big = BIG,
            old = OLD
        ),
    );
    assert!(got.contains(&format!("OK {BIG}")), "{got}");
    srv.stop();
}

#[test]
fn read_only_and_unknown_exports_are_refused() {
    let env = Env::new();
    let vol = env.create("r.vol", "64M", &[]);
    let ctl = env.path("control.sock");
    let export = format!("g={}", s(&vol));
    let srv = env.serve(&[&export], &["--control", s(&ctl), "--read-only"], false);
    let out = resize(&env, &ctl, "+64M");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("read-only") && err.contains("read-write"),
        "{err}"
    );
    let out = run(env
        .cmd()
        .args(["resize", "--control", s(&ctl), "nope", "--size", "+1M"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no export named"), "{err}");
    let err = fails(env.cmd().args([
        "resize",
        "--control",
        s(&ctl),
        "g",
        "--size",
        "+1M",
        "--preallocate",
    ]));
    assert!(err.contains("--preallocate"), "{err}");
    srv.stop();
    assert_eq!(info_json(&env, &vol)["size"], 64 << 20);
}

#[test]
fn a_daemon_killed_at_any_step_of_an_online_grow_leaves_the_old_or_the_new_size() {
    let env = Env::new();
    let base = grow_faults::base(&env);
    // The offline grow's fault points: the online grow runs the same steps on disk.
    for (step, grown) in grow_faults::STEPS {
        let want = grow_faults::want(grown);
        let vol = grow_faults::copy_for(&env, &base, step);
        let ctl = env.path(&format!("{step}.ctl"));
        let sock = env.path(&format!("{step}.sock"));
        let export = format!("g={}", s(&vol));
        let srv = env.serve_env(
            &sock,
            &[&export],
            &["--control", s(&ctl)],
            false,
            &grow_faults::env(step),
        );
        let to = grow_faults::TO.to_string();
        let out = resize(&env, &ctl, &to);
        assert!(
            !out.status.success(),
            "{step}: the grow was not interrupted"
        );
        let status = srv.wait_exit(Duration::from_secs(60));
        assert!(
            !status.success(),
            "{step}: the daemon was not killed ({status})"
        );
        grow_faults::assert_size(&env, &vol, step, want);
        let srv = env.serve(&[&export], &["--control", s(&ctl)], false);
        grow_faults::assert_served(&srv.uri("g"), step, want);
        if !grown {
            // The interrupted grow can simply be run again, online.
            let out = resize(&env, &ctl, &to);
            assert!(out.status.success(), "{step}: {out:?}");
            assert_eq!(nbdinfo_size(&srv.uri("g")), grow_faults::TO, "{step}");
        }
        srv.stop();
        grow_faults::assert_check_clean(&env, &vol, step);
    }
}
