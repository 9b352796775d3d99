//! `cryptvol serve --direct`: O_DIRECT data I/O under fio's verified random I/O with both
//! engines, data written direct read back buffered, and the choice in the start-up log
//! (flag and config file key). The tests' directory is on a filesystem with O_DIRECT
//! (ext4 here); a refusal would fail the test, not skip it.

mod common;

use common::*;

#[test]
fn direct_with_each_engine_under_fio_verify_and_read_back_buffered() {
    require("fio");
    let env = Env::new();
    // 512-byte sectors: fio's 512-byte-aligned requests take the buffered path, 4 KiB
    // aligned ones the direct path, in the same run.
    let vol = env.create("d.img", "64M", &["--sector-size", "512"]);
    for (engine, want) in [("threads", "threads+direct"), ("uring", "io_uring+direct")] {
        let srv = env.serve(&[s(&vol)], &["--direct", "--engine", engine], false);
        let w = fio_engine_verify(
            &env,
            &srv.uri("d"),
            "direct",
            "512-256k",
            1819,
            &["--do_verify=1"],
        );
        assert!(w.contains("WRITE:"), "{w}");
        let log = srv.stop();
        assert_eq!(engine_in_log(&log).as_deref(), Some(want), "{log}");
        assert!(!log.contains("panicked"), "{log}");

        // What went direct, the buffered engine reads back.
        let srv = env.serve(&[s(&vol)], &[], false);
        let v = fio_engine_verify(
            &env,
            &srv.uri("d"),
            "direct",
            "512-256k",
            1819,
            &["--verify_only"],
        );
        assert!(v.contains("READ:"), "{v}");
        let log = srv.stop();
        assert_eq!(engine_in_log(&log).as_deref(), Some("threads"), "{log}");
    }
}

#[test]
fn the_config_file_key_turns_direct_on() {
    let env = Env::new();
    let vol = env.create("c.img", "16M", &[]);
    let conf = env.path("cryptvol.toml");
    std::fs::write(&conf, "direct = true\nengine = \"uring\"\n").expect("config");
    let srv = env.serve(&[s(&vol)], &["--config", s(&conf)], false);
    let log = srv.stop();
    assert_eq!(
        engine_in_log(&log).as_deref(),
        Some("io_uring+direct"),
        "{log}"
    );
}
