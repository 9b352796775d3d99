//! Interoperability with the real NBD peers: nbdinfo, qemu-img, qemu-io, nbdcopy,
//! nbd-client (listing), fio's nbd engine. Every test runs its own `cryptvol serve`.

mod common;

use std::process::Command;

use common::*;

fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    require("nbdinfo");
    let out = run_ok(Command::new("nbdinfo").arg("--json").args(args));
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{out}"))
}

fn only_export(j: &serde_json::Value) -> &serde_json::Value {
    let exports = j["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "expected one export: {j}");
    &exports[0]
}

fn assert_flag(e: &serde_json::Value, key: &str, want: bool) {
    assert_eq!(
        e[key].as_bool(),
        Some(want),
        "nbdinfo {key} should be {want}: {e}"
    );
}

#[test]
fn nbdinfo_size_block_sizes_and_flags() {
    let env = Env::new();
    let vol = env.create("disk.img", "64M", &[]);
    let small = env.create("small.img", "16M", &["--sector-size", "512"]);
    let srv = env.serve(&[s(&vol), s(&small)], &[], false);

    let e = only_export(&nbdinfo_json(&[&srv.uri("disk")])).clone();
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["export-size"].as_u64(), Some(64 << 20), "{e}");
    // Any alignment is served (read-modify-write); whole sectors are preferred.
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(33_554_432), "{e}");
    for f in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert_flag(&e, f, true);
    }
    assert_flag(&e, "is_read_only", false);

    let e = only_export(&nbdinfo_json(&[&srv.uri("small")])).clone();
    assert_eq!(e["export-size"].as_u64(), Some(16 << 20), "{e}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(512), "{e}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(33_554_432), "{e}");

    // nbdinfo --can / --is agree (exit status 0 = true, 2 = false).
    let st = run(Command::new("nbdinfo").args(["--is", "read-only", &srv.uri("disk")]));
    assert_eq!(
        st.status.code(),
        Some(2),
        "nbdinfo --is read-only should be false"
    );
    for c in ["flush", "fua", "trim", "zero", "multi-conn", "cache"] {
        let st = run(Command::new("nbdinfo").args(["--can", c, &srv.uri("disk")]));
        assert_eq!(
            st.status.code(),
            Some(0),
            "nbdinfo --can {c} should be true"
        );
    }
}

#[test]
fn nbdinfo_read_only_server() {
    let env = Env::new();
    let vol = env.create("ro.img", "8M", &[]);
    let srv = env.serve(&[s(&vol)], &["--read-only"], false);
    let e = only_export(&nbdinfo_json(&[&srv.uri("ro")])).clone();
    assert_flag(&e, "is_read_only", true);
    assert_eq!(e["export-size"].as_u64(), Some(8 << 20), "{e}");
    let st = run(Command::new("nbdinfo").args(["--is", "read-only", &srv.uri("ro")]));
    assert_eq!(
        st.status.code(),
        Some(0),
        "nbdinfo --is read-only should be true"
    );
}

#[test]
fn nbdinfo_lists_exports_with_descriptions() {
    let env = Env::new();
    let a = env.create("a.img", "16M", &[]);
    let b = env.create("b.img", "32M", &["--sector-size", "512"]);
    let c = env.create("c.img", "8M", &[]);
    let va = format!("alpha={}", s(&a));
    let vb = format!("beta={}", s(&b));
    let srv = env.serve(&[&va, &vb, s(&c)], &[], false);
    let j = nbdinfo_json(&["--list", &srv.uri("")]);
    let exports = j["exports"].as_array().expect("exports");
    let mut seen: Vec<(String, u64)> = exports
        .iter()
        .map(|e| {
            let name = e["export-name"].as_str().expect("name").to_string();
            let desc = e["description"].as_str().unwrap_or_default();
            assert!(
                desc.contains("cryptvol"),
                "export {name} has no cryptvol description: {e}"
            );
            (name, e["export-size"].as_u64().expect("size"))
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("alpha".into(), 16 << 20),
            ("beta".into(), 32 << 20),
            ("c".into(), 8 << 20)
        ],
        "{j}"
    );
}

#[test]
fn default_export_with_one_volume_only() {
    let env = Env::new();
    let a = env.create("one.img", "16M", &[]);
    let srv = env.serve(&[s(&a)], &[], false);
    let e = only_export(&nbdinfo_json(&[&srv.uri("")])).clone();
    assert_eq!(e["export-size"].as_u64(), Some(16 << 20), "{e}");
    // Data written through the default export is the named export's data.
    qemu_io(&srv.uri(""), &["write -P 0x5c 0 64k"]);
    qemu_io(&srv.uri("one"), &["read -P 0x5c 0 64k"]);
    drop(srv);

    let b = env.create("two.img", "16M", &[]);
    let srv = env.serve(&[s(&a), s(&b)], &[], false);
    let out = run(Command::new("nbdinfo").arg(srv.uri("")));
    assert!(
        !out.status.success(),
        "nbdinfo on the default export of a two-volume server succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("default export"),
        "unclear nbdinfo error: {err}"
    );
    // On the wire: an error reply with a human-readable message, and the connection goes on.
    let mut r = Raw::start(&srv);
    let rep = r.go("").expect_err("OPT_GO \"\" accepted with two exports");
    assert_eq!(
        rep.kind,
        proto::REP_ERR_UNKNOWN,
        "reply type {:#x}",
        rep.kind
    );
    let msg = String::from_utf8_lossy(&rep.data);
    assert!(
        msg.len() > 10,
        "error reply without a useful message: {msg:?}"
    );
    let rep = r.go("nope").expect_err("unknown export accepted");
    assert_eq!(rep.kind, proto::REP_ERR_UNKNOWN);
    let (size, _) = r.go("two").expect("named export after errors");
    assert_eq!(size, 16 << 20);
    r.disconnect();
}

#[test]
fn qemu_img_convert_round_trip_and_no_plaintext_on_disk() {
    require("qemu-img");
    let env = Env::new();
    let vol = env.create("img.img", "32M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let data = pattern(32 << 20, 0x9e37_79b9_7f4a_7c15);
    let src = env.path("src.raw");
    std::fs::write(&src, &data).expect("write source image");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        &srv.uri("img"),
    ]));
    let out = env.path("out.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &srv.uri("img"),
        s(&out),
    ]));
    let back = read(&out);
    assert_eq!(back.len(), data.len(), "size of the converted-out image");
    assert!(back == data, "qemu-img round trip changed the data");
    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &srv.uri("img")]));
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
    srv.stop();

    // No plaintext on disk: neither distinctive 64-byte windows nor whole sectors.
    let disk = read(&vol);
    let off = info_json(&env, &vol)["data_offset"]
        .as_u64()
        .expect("data_offset") as usize;
    assert!(
        disk.len() >= off + data.len(),
        "backing file shorter than the data area"
    );
    for k in 0..8usize {
        let at = k * (4 << 20) + 12345 * k;
        assert!(
            !contains(&disk, &data[at..at + 64]),
            "plaintext at image offset {at} found in the backing file"
        );
    }
    let area = &disk[off..off + data.len()];
    let same_sectors = area
        .chunks(4096)
        .zip(data.chunks(4096))
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(
        same_sectors, 0,
        "{same_sectors} sectors stored in plaintext"
    );
    assert!(
        area.iter().filter(|&&b| b == 0).count() < area.len() / 100,
        "data area looks unwritten"
    );
}

#[test]
fn qemu_io_unaligned_patterns_4096() {
    qemu_io_patterns("4096");
}

#[test]
fn qemu_io_unaligned_patterns_512() {
    qemu_io_patterns("512");
}

fn qemu_io_patterns(sector: &str) {
    let env = Env::new();
    let vol = env.create("q.img", "16M", &["--sector-size", sector]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let u = srv.uri("q");
    qemu_io(
        &u,
        &[
            "write -P 0xab 1000 5000",
            "read -P 0xab 1000 5000",
            // A 2-byte write straddling the 4096 boundary (and the 512 one at 4096).
            "write -P 0xcd 4095 2",
            "read -P 0xcd 4095 2",
            "read -P 0xab 1000 3095",
            "read -P 0xab 4097 1903",
            // 512-aligned writes (sub-sector on a 4096-sector volume).
            "write -P 0x11 8704 512",
            "write -P 0x22 9216 1024",
            "read -P 0x11 8704 512",
            "read -P 0x22 9216 1024",
            // FUA, zeroes, discard, a large write.
            "write -f -P 0x33 65536 65536",
            "write -z 70000 10000",
            "read -P 0x33 65536 4464",
            "read -P 0 70000 10000",
            "read -P 0x33 80000 51072",
            "write -P 0x44 1048576 4194304",
            "discard 2097152 1048576",
            "read -P 0x44 1048576 1048576",
            "read -P 0x44 3145728 2097152",
            "flush",
        ],
    );
    // A new connection sees the same data.
    qemu_io(
        &u,
        &[
            "read -P 0xab 1000 3095",
            "read -P 0xcd 4095 2",
            "read -P 0x11 8704 512",
            "read -P 0 70000 10000",
        ],
    );
    // And a wrong pattern is detected (the check itself can fail).
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xee 1000 100", &u]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern:\n{text}"
    );
    // After a restart of the server, still there.
    srv.stop();
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(
        &srv.uri("q"),
        &[
            "read -P 0xab 1000 3095",
            "read -P 0xcd 4095 2",
            "read -P 0x44 1048576 1048576",
        ],
    );
}

#[test]
fn nbdcopy_both_ways() {
    require("nbdcopy");
    let env = Env::new();
    let vol = env.create("c.img", "24M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let data = pattern(24 << 20, 77);
    let src = env.path("in.raw");
    std::fs::write(&src, &data).expect("write source");
    run_ok(Command::new("nbdcopy").args([s(&src), &srv.uri("c")]));
    let out = env.path("out.raw");
    run_ok(Command::new("nbdcopy").args([&srv.uri("c"), s(&out)]));
    assert!(read(&out) == data, "nbdcopy round trip changed the data");
    // Export to export on the same server (two connections at once, multi-conn).
    let vol2 = env.create("d.img", "24M", &[]);
    drop(srv);
    let srv = env.serve(&[s(&vol), s(&vol2)], &[], false);
    run_ok(Command::new("nbdcopy").args([&srv.uri("c"), &srv.uri("d")]));
    let out2 = env.path("out2.raw");
    run_ok(Command::new("nbdcopy").args([&srv.uri("d"), s(&out2)]));
    assert!(
        read(&out2) == data,
        "nbdcopy export-to-export changed the data"
    );
}

#[test]
fn nbd_client_lists_exports() {
    require("nbd-client");
    let env = Env::new();
    let a = env.create("first.img", "8M", &[]);
    let b = env.create("second.img", "8M", &[]);
    let srv = env.serve(&[s(&a), s(&b)], &[], true);
    let port = srv.port.expect("tcp port").to_string();
    let out = run_ok(Command::new("nbd-client").args(["-l", "127.0.0.1", &port]));
    let names: Vec<&str> = out
        .lines()
        .map(|l| l.split(':').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty() && !l.starts_with("Negotiation"))
        .collect();
    assert!(
        names.contains(&"first") && names.contains(&"second"),
        "nbd-client -l output:\n{out}"
    );
    // The same listing works over TCP with libnbd.
    let j = run_ok(Command::new("nbdinfo").args(["--list", "--json", &srv.tcp_uri("")]));
    assert!(j.contains("\"first\"") && j.contains("\"second\""), "{j}");
}

#[test]
fn fio_random_io_with_verification() {
    require("fio");
    let env = Env::new();
    let vol = env.create("fio.img", "64M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let uri = srv.uri("fio");
    let common = [
        "--name=it",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=32",
        "--numjobs=4",
        "--size=8M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--group_reporting",
        "--randseed=4242",
    ];
    let fio = |extra: &[&str]| {
        let out = run(Command::new("fio")
            .current_dir(env.dir.path())
            .args(common)
            .arg(format!("--uri={uri}"))
            .args(extra));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("verify:") && text.contains("err= 0"),
            "fio {extra:?} failed ({}):\n{text}",
            out.status
        );
        text
    };
    // Write with verification, then a second run verifying only (fresh connections).
    let w = fio(&["--do_verify=1"]);
    assert!(w.contains("WRITE:"), "{w}");
    let v = fio(&["--verify_only"]);
    assert!(v.contains("READ:"), "{v}");
    // Mixed random read/write at the same depth, in the gaps between the verified regions.
    let out = run(Command::new("fio").current_dir(env.dir.path()).args([
        "--name=mix",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=4",
        "--size=4M",
        "--offset_increment=16M",
        "--offset=8M",
        "--group_reporting",
    ]));
    assert!(
        out.status.success(),
        "fio randrw failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The verified regions are untouched by the mixed run.
    fio(&["--verify_only"]);
    assert!(
        srv.log_text().lines().all(|l| !l.contains("panicked")),
        "server panicked:\n{}",
        srv.log_text()
    );
}

#[test]
fn same_data_different_ciphertext() {
    let env = Env::new();
    let a = env.create("a.img", "8M", &[]);
    let b = env.create("b.img", "8M", &[]);
    let srv = env.serve(&[s(&a), s(&b)], &[], false);
    for name in ["a", "b"] {
        qemu_io(&srv.uri(name), &["write -P 0x5a 0 1M"]);
    }
    srv.stop();
    let ia = info_json(&env, &a);
    let ib = info_json(&env, &b);
    assert_ne!(ia["uuid"], ib["uuid"], "two volumes share a UUID");
    let ca = read_at(&a, ia["data_offset"].as_u64().expect("offset"), 1 << 20);
    let cb = read_at(&b, ib["data_offset"].as_u64().expect("offset"), 1 << 20);
    let plain = vec![0x5au8; 4096];
    for (i, (x, y)) in ca.chunks(4096).zip(cb.chunks(4096)).enumerate() {
        assert_ne!(x, y, "sector {i}: same ciphertext in both volumes");
        assert_ne!(x, &plain[..], "sector {i} stored in plaintext");
    }
    // Within one volume, equal plaintext sectors encrypt differently (the tweak is the sector number).
    let sectors: std::collections::HashSet<&[u8]> = ca.chunks(4096).collect();
    assert_eq!(
        sectors.len(),
        256,
        "equal ciphertext for equal plaintext in different sectors"
    );
    assert!(
        !contains(&ca, &[0x5a; 64]),
        "plaintext run found in ciphertext"
    );
}

/// A 16 MiB image that is mostly zeros (holes) with data islands.
fn sparse_image(env: &Env) -> (std::path::PathBuf, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let p = env.path("sparse.raw");
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(16 << 20).expect("set_len");
    let mut data = vec![0u8; 16 << 20];
    for (i, off) in [0usize, 3 << 20, (7 << 20) + 4096, (15 << 20) + 512]
        .iter()
        .enumerate()
    {
        let chunk = pattern(300_000, i as u64 + 40);
        f.write_all_at(&chunk, *off as u64).expect("write");
        data[*off..*off + chunk.len()].copy_from_slice(&chunk);
    }
    (p, data)
}

#[test]
fn sparse_images_land_with_their_zeros() {
    // Never-written sectors of a volume read as pseudo-random bytes (documented), so a
    // client that copies a sparse image must get zeros where the image has holes.
    require("qemu-img");
    require("nbdcopy");
    let env = Env::new();
    let (src, data) = sparse_image(&env);
    let a = env.create("a.img", "16M", &[]);
    let b = env.create("b.img", "16M", &["--sector-size", "512"]);
    let srv = env.serve(&[s(&a), s(&b)], &[], false);
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&src),
        &srv.uri("a"),
    ]));
    run_ok(Command::new("nbdcopy").args([s(&src), &srv.uri("b")]));
    for name in ["a", "b"] {
        let out = env.path(&format!("{name}.out"));
        run_ok(Command::new("nbdcopy").args([&srv.uri(name), s(&out)]));
        assert!(
            read(&out) == data,
            "export {name} differs from the sparse source image (holes not zeroed?)"
        );
    }
}
