//! Thin volumes (issue 7): never-written blocks read as zeros, the allocation map
//! survives crashes, `info` reports allocation, `--preallocate`.
//! The block-status / sparse-copy tests with real peers are in tests/thin_peers.rs.

mod common;

use common::*;
use std::process::Command;

fn py(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    require_python_nbd();
    run(Command::new("/usr/bin/python3")
        .arg(scripts_dir().join("crash.py"))
        .args(args)
        .envs(envs.iter().copied()))
}

#[test]
fn fresh_volume_reads_zeros_and_takes_no_space() {
    let env = Env::new();
    let vol = env.create("fresh.vol", "64M", &[]);
    let info = info_json(&env, &vol);
    assert_eq!(info["allocation"]["allocated_bytes"], 0, "{info}");
    assert_eq!(info["allocation"]["chunk_size"], 65536);
    assert_eq!(info["allocation"]["map"], "ok");
    // The data area is a hole: only the header and map are on disk.
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&vol).expect("stat").blocks() * 512;
    assert!(used <= 1 << 20, "fresh volume uses {used} bytes on disk");
    let srv = env.serve(&[s(&vol)], &[], false);
    let out = nbdsh(
        &srv.uri(""),
        "z = bytes(1 << 20)\n\
         for off in range(0, h.get_size(), 1 << 20):\n    \
             assert h.pread(1 << 20, off) == z, off\n\
         print('ZEROS', h.get_size())",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ZEROS 67108864"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One write allocates one chunk; info shows it after the flush.
    let out = nbdsh(
        &srv.uri(""),
        "h.pwrite(b'x' * 4096, 5 * 65536 + 8192)\nh.flush()\n\
         b = h.pread(65536, 5 * 65536)\n\
         assert b[8192:12288] == b'x' * 4096 and b[:8192] == bytes(8192) and b[12288:] == bytes(65536 - 12288)",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = info_json(&env, &vol);
    assert_eq!(info["allocation"]["allocated_bytes"], 65536, "{info}");
    assert_eq!(info["allocation"]["allocated_chunks"], 1);
    srv.stop();
    let text = run_ok(env.cmd().arg("info").arg(&vol));
    assert!(
        text.contains("allocated:    64 KiB (65536 bytes, 0.1%; 1 of 1024 chunks of 64 KiB)")
            && text.contains("alloc map:    ok"),
        "{text}"
    );
}

#[test]
fn preallocate_writes_ciphertext_everywhere() {
    let env = Env::new();
    let vol = env.create("pre.vol", "8M", &["--preallocate"]);
    let info = info_json(&env, &vol);
    assert_eq!(info["allocation"]["allocated_bytes"], 8 << 20, "{info}");
    let data = read(&vol);
    let off = info["data_offset"].as_u64().expect("offset") as usize;
    assert!(
        data[off..].chunks(4096).all(|c| c.iter().any(|&b| b != 0)),
        "every block of the data area holds ciphertext"
    );
    let srv = env.serve(&[s(&vol)], &[], false);
    let out = nbdsh(
        &srv.uri(""),
        "assert h.pread(8 << 20, 0) == bytes(8 << 20)\nprint('ZEROS')",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ZEROS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.stop();
}

#[test]
fn damaged_map_is_reported_by_info_and_repaired_by_serve() {
    let env = Env::new();
    let vol = env.create("dmg.vol", "16M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let out = nbdsh(&srv.uri(""), "h.pwrite(b'k' * 4096, 0)\nh.flush()");
    assert!(out.status.success());
    srv.stop();
    // Damage both copies of the only map page (copies at 128 KiB and 132 KiB).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&vol)
            .expect("open");
        f.write_all_at(&[0xEE; 32], 131072 + 1000).expect("w");
        f.write_all_at(&[0xEE; 32], 135168 + 1000).expect("w");
    }
    let info = info_json(&env, &vol);
    assert_eq!(info["allocation"]["map_healthy"], false, "{info}");
    assert_eq!(info["allocation"]["map_pages_damaged"][0], 0);
    assert!(info["allocation"]["map"]
        .as_str()
        .is_some_and(|m| m.contains("damaged in both copies")));
    // The compliance scan flags it (exit status 1)...
    let out = run(env.cmd().args(["check", "--json"]).arg(&vol));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ALLOCATION_MAP_DAMAGED"), "{text}");
    let srv = env.serve(&[s(&vol)], &[], false);
    let out = nbdsh(&srv.uri(""), "assert h.pread(4096, 0) == b'k' * 4096");
    assert!(out.status.success(), "written data survives a damaged map");
    let log = srv.stop();
    assert!(log.contains("allocation map pages damaged"), "{log}");
    let info = info_json(&env, &vol);
    assert_eq!(info["allocation"]["map"], "ok", "repaired: {info}");
    // ...and passes it once serving repaired the map.
    let out = run(env.cmd().args(["check", "--json"]).arg(&vol));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ALLOCATION_MAP_DAMAGED"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Kill -9 the server at random moments (and at the exact steps between the data
/// sync, the map write and the map sync, via fault injection) under a
/// write/zero/trim/flush workload, restart it, and check every block: it must hold
/// its contents as of the last completed flush or a value written after it —
/// never garbage, never another block's data, never zeros where flushed data was.
#[test]
fn kill_9_never_loses_flushed_data_or_shows_garbage() {
    let env = Env::new();
    let vol = env.create("crash.vol", "32M", &[]);
    let state = env.path("state.json");
    std::fs::write(&state, "{}").expect("state");
    let log = env.path("ops.log");
    let sock = env.path("crash.sock");
    let steps = [
        Some("alloc-map-after-data-sync"),
        Some("alloc-map-page-torn"),
        Some("alloc-map-before-map-sync"),
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    ];
    let mut rng = 0x5eed_u64;
    for (round, step) in steps.iter().enumerate() {
        let _ = std::fs::remove_file(&sock);
        // The previous round's log must not count as this round's progress.
        let _ = std::fs::remove_file(&log);
        let envs: Vec<(&str, &str)> = match step {
            Some(s) => vec![
                ("CRYPTVOL_FAULT_INJECTION", "1"),
                ("CRYPTVOL_TEST_CRASH_AT", s),
                ("CRYPTVOL_TEST_CRASH_SKIP", "6"),
            ],
            None => vec![],
        };
        let mut srv = env.serve_env(&sock, &[s(&vol)], &["--discard"], false, &envs);
        let uri = srv.uri("");
        let (st, lg) = (s(&state).to_string(), s(&log).to_string());
        let seed = round.to_string();
        let worker = std::thread::spawn(move || py(&["work", &uri, &st, &lg, &seed], &[]));
        match step {
            // The server kills itself at the 7th map update (flush or write-back).
            Some(_) => wait_until(PATIENCE, "the crash point", || !srv.alive()),
            None => {
                // Kill at a random point of the workload's progress (not of the clock):
                // once it has logged `ops` operations, however slow the machine is.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let ops = 8 + (rng % 400) as usize;
                // (A workload that ended early fails the checks below, with its output.)
                wait_until(PATIENCE, &format!("{ops} operations logged"), || {
                    worker.is_finished() || line_count(&log) >= ops
                });
                srv.signal("KILL");
            }
        }
        let out = worker.join().expect("worker");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("connection ended"),
            "round {round}: workload did not end on the dead connection: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        drop(srv);
        let ops = std::fs::read_to_string(&log).expect("log");
        assert!(
            ops.lines().count() > 3,
            "round {round}: workload did too little"
        );
        let _ = std::fs::remove_file(&sock);
        let srv = env.serve_on(&sock, &[s(&vol)], &["--discard"], false);
        let out = py(
            &["verify", &srv.uri(""), s(&state), s(&log)],
            &[("DISCARD", "1")],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("OK verify"),
            "round {round} ({step:?}): {stdout}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            srv.log_text()
        );
        eprintln!("round {round} ({step:?}): {}", stdout.trim());
        srv.stop();
    }
    // The map is healthy after all that (a torn page is repaired on the next open).
    let info = info_json(&env, &vol);
    assert_eq!(info["allocation"]["map"], "ok", "{info}");
}

/// The extents `nbdinfo --map --json` reports: (offset, length, type).
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u64)> {
    require("nbdinfo");
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --map JSON");
    j.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect()
}

/// A mostly empty 4 GiB volume: block status shows exactly the written chunks (nbdinfo and
/// qemu-img agree), nbdcopy copies it to a file quickly and leaves the file sparse, and the
/// copy holds exactly what was written.
#[test]
fn sparse_4g_volume_maps_and_copies_sparsely() {
    require("nbdcopy");
    require("qemu-img");
    let env = Env::new();
    let vol = env.create("big.vol", "4G", &[]);
    let srv = env.serve(&[s(&vol)], &["--metrics", "127.0.0.1:0"], true);
    assert_eq!(
        nbdinfo_map(&srv.uri("")),
        vec![(0, 4 << 30, 3)],
        "fresh: one hole"
    );
    // Write 1 MiB at 1 GiB + 64 KiB and 4 KiB at 3 GiB + 100 KiB (inside chunk 3 GiB + 64 KiB).
    let big = pattern(1 << 20, 11);
    let small = pattern(4096, 12);
    let (a, b) = ((1u64 << 30) + 65536, (3u64 << 30) + 100 * 1024);
    let script = format!(
        "h.pwrite(open('{}', 'rb').read(), {a})\nh.pwrite(open('{}', 'rb').read(), {b})\nh.flush()",
        {
            std::fs::write(env.path("big.bin"), &big).expect("w");
            s(&env.path("big.bin")).to_string()
        },
        {
            std::fs::write(env.path("small.bin"), &small).expect("w");
            s(&env.path("small.bin")).to_string()
        }
    );
    let out = nbdsh(&srv.uri(""), &script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chunk_b = b - b % 65536;
    let want = vec![
        (0, a, 3),
        (a, 1 << 20, 0),
        (a + (1 << 20), chunk_b - a - (1 << 20), 3),
        (chunk_b, 65536, 0),
        (chunk_b + 65536, (4 << 30) - chunk_b - 65536, 3),
    ];
    assert_eq!(
        nbdinfo_map(&srv.uri("")),
        want,
        "nbdinfo --map after writes"
    );
    // qemu-img map (its own NBD client, over TCP) reports the same data ranges.
    let out = run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &srv.tcp_uri(""),
    ]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let data: Vec<(u64, u64)> = j
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("len"),
            )
        })
        .collect();
    assert_eq!(
        data,
        vec![(a, 1 << 20), (chunk_b, 65536)],
        "qemu-img map: {j}"
    );
    for e in j.as_array().expect("array") {
        if e["data"] == false {
            assert_eq!(e["zero"], true, "holes read as zeros: {e}");
        }
    }
    // nbdcopy to a file: holes are skipped (the daemon's own count of bytes read says
    // so, whatever the speed of the machine) and the copy is sparse.
    let dst = env.path("copy.raw");
    let read_bytes =
        || srv.metric(r#"cryptvol_nbd_request_bytes_total{export="big",command="read"}"#);
    let read_before = read_bytes();
    let t = std::time::Instant::now();
    run_ok(Command::new("nbdcopy").args([&srv.uri(""), s(&dst)]));
    let secs = t.elapsed().as_secs_f64();
    let read = read_bytes() - read_before;
    assert!(
        read < (64 << 20) as f64,
        "nbdcopy read {read} bytes of a 4 GiB volume holding about 1 MiB of data"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&dst).expect("stat copy");
    assert_eq!(meta.len(), 4 << 30);
    let used = meta.blocks() * 512;
    assert!(
        used < 16 << 20,
        "destination is not sparse: {used} bytes allocated"
    );
    assert_eq!(read_at(&dst, a, 1 << 20), big);
    assert_eq!(read_at(&dst, b, 4096), small);
    assert!(read_at(&dst, b - 4096, 4096).iter().all(|&x| x == 0));
    assert!(read_at(&dst, 2 << 30, 1 << 20).iter().all(|&x| x == 0));
    eprintln!(
        "nbdcopy 4 GiB mostly empty: {secs:.2} s, {read} bytes read, {used} bytes allocated in the copy"
    );
    srv.stop();
}

/// An interrupted `create --preallocate` never leaves a half-made volume under the
/// final name; the next run removes the leftover and succeeds.
#[test]
fn interrupted_preallocation_leaves_nothing_visible() {
    let env = Env::new();
    let vol = env.path("pre.vol");
    let partial = env.path(".pre.vol.partial");
    let mut child = env
        .cmd()
        .args(["create", "--preallocate", "--size", "4G"])
        .arg(&vol)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn create");
    // Interrupt it while it preallocates: once the partial file holds data (8 MiB of the
    // 4 GiB), whatever the speed of the machine.
    use std::os::unix::fs::MetadataExt;
    wait_until(PATIENCE, "preallocation under way", || {
        std::fs::metadata(&partial).is_ok_and(|m| m.blocks() * 512 >= 8 << 20)
    });
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(!status.success(), "create was interrupted");
    assert!(!vol.exists(), "no half-made volume under the final name");
    // The next run cleans up and succeeds.
    env.create("pre.vol", "8M", &["--preallocate"]);
    assert!(!partial.exists(), "the leftover was removed");
    let info = info_json(&env, &vol);
    assert_eq!(info["allocation"]["allocated_bytes"], 8 << 20, "{info}");
}
