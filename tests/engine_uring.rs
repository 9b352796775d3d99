//! `cryptvol serve --engine`: the io_uring engine under fio's verified random I/O, data
//! written by one engine read back by the other, the choice in the start-up log (flag,
//! auto picks threads, config file key) and bad values refused.

mod common;

use common::*;

#[test]
fn uring_engine_under_fio_verify_and_read_back_by_threads() {
    require("fio");
    let env = Env::new();
    let vol = env.create("ur.img", "64M", &[]);
    let srv = env.serve(&[s(&vol)], &["--engine", "uring"], false);
    let w = fio_engine_verify(
        &env,
        &srv.uri("ur"),
        "uring",
        "4k-256k",
        1818,
        &["--do_verify=1"],
    );
    assert!(w.contains("WRITE:"), "{w}");
    let log = srv.stop();
    assert_eq!(engine_in_log(&log).as_deref(), Some("io_uring"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    // What io_uring wrote, the threads engine reads back (same format on disk)...
    let srv = env.serve(&[s(&vol)], &["--engine", "threads"], false);
    let v = fio_engine_verify(
        &env,
        &srv.uri("ur"),
        "uring",
        "4k-256k",
        1818,
        &["--verify_only"],
    );
    assert!(v.contains("READ:"), "{v}");
    let log = srv.stop();
    assert_eq!(engine_in_log(&log).as_deref(), Some("threads"), "{log}");

    // ...and a second io_uring run verifies it too (fresh daemon, fresh rings).
    let srv = env.serve(&[s(&vol)], &["--engine", "uring"], false);
    fio_engine_verify(
        &env,
        &srv.uri("ur"),
        "uring",
        "4k-256k",
        1818,
        &["--verify_only"],
    );
    srv.stop();
}

#[test]
fn auto_picks_threads_and_the_config_file_key_is_read() {
    let env = Env::new();
    let vol = env.create("auto.img", "16M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let log = srv.stop();
    assert_eq!(engine_in_log(&log).as_deref(), Some("threads"), "{log}");

    let conf = env.path("cryptvol.toml");
    std::fs::write(&conf, "engine = \"uring\"\n").expect("config");
    let srv = env.serve(&[s(&vol)], &["--config", s(&conf)], false);
    let log = srv.stop();
    assert_eq!(engine_in_log(&log).as_deref(), Some("io_uring"), "{log}");

    // The flag wins over the file.
    let srv = env.serve(
        &[s(&vol)],
        &["--config", s(&conf), "--engine", "threads"],
        false,
    );
    let log = srv.stop();
    assert_eq!(engine_in_log(&log).as_deref(), Some("threads"), "{log}");
}

#[test]
fn unknown_engines_are_refused() {
    let env = Env::new();
    let vol = env.create("bad.img", "16M", &[]);
    let err = fails(
        env.cmd()
            .args([
                "serve",
                "--unix",
                s(&env.path("b.sock")),
                "--engine",
                "fast",
            ])
            .arg(&vol),
    );
    assert!(err.contains("auto, threads, uring"), "{err}");

    let conf = env.path("bad.toml");
    std::fs::write(&conf, "engine = \"fast\"\n").expect("config");
    let err = fails(
        env.cmd()
            .args([
                "serve",
                "--unix",
                s(&env.path("c.sock")),
                "--config",
                s(&conf),
            ])
            .arg(&vol),
    );
    assert!(err.contains("engine") && err.contains("\"fast\""), "{err}");
}
