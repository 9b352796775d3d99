//! Strict libnbd clients with no special flags (issue 16, item 8): the server advertises
//! a minimum block size of 1 (it serves any alignment by read-modify-write) and the
//! volume's sector size as the preferred size, so `nbdcopy` of a file whose size is no
//! multiple of 4096 and fio's nbd engine with 512-byte requests work against a
//! 4096-byte-sector volume. (`nbdfuse` under a default loop device: tests/filesystem.rs;
//! the advertised sizes as nbdinfo sees them: tests/peers.rs.)

mod common;

use std::process::Command;

use common::*;

/// Not a multiple of 512 or 4096: libnbd refused the last request when the minimum was
/// the sector size ("request is unaligned").
const ODD_LEN: usize = 104_000;

#[test]
fn nbdcopy_of_a_file_of_unaligned_size_round_trips() {
    require("nbdcopy");
    let env = Env::new();
    let vol = env.create("odd.img", "1M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let data = pattern(ODD_LEN, 104);
    let src = env.path("in.raw");
    std::fs::write(&src, &data).expect("write source");

    run_ok(Command::new("nbdcopy").args([s(&src), &srv.uri("odd")]));
    let out = env.path("out.raw");
    run_ok(Command::new("nbdcopy").args([&srv.uri("odd"), s(&out)]));

    let back = read(&out);
    assert_eq!(back.len(), 1 << 20, "nbdcopy copies the whole export");
    assert!(
        back[..ODD_LEN] == data[..],
        "the first {ODD_LEN} bytes changed on the way through the export"
    );
    assert!(
        back[ODD_LEN..].iter().all(|&b| b == 0),
        "the bytes after the copied file are not the volume's zeros"
    );
    let log = srv.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// fio's nbd engine with its default (strict) libnbd handle: 512-byte-aligned requests of
/// 512 bytes to 128 KiB, mixed reads and writes, every written block verified.
#[test]
fn fio_nbd_engine_with_512_byte_requests_verifies() {
    require("fio");
    let env = Env::new();
    let vol = env.create("fio.img", "64M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let out = run(Command::new("fio").current_dir(env.dir.path()).args([
        "--name=unaligned",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("fio")),
        "--rw=randrw",
        "--bsrange=512-128k",
        "--iodepth=16",
        "--numjobs=2",
        "--size=8M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--group_reporting",
        "--randseed=16",
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("err= 0") && !text.contains("verify:"),
        "fio failed ({}):\n{text}",
        out.status
    );
    assert!(
        text.contains("READ:") && text.contains("WRITE:"),
        "fio did not both read and write:\n{text}"
    );
    let log = srv.stop();
    assert!(!log.contains("panicked"), "{log}");
}
