//! Request semantics and error values as a libnbd client sees them (tests/nbdsh/semantics.py,
//! run with libnbd's client-side checks off so every request reaches the server).

mod common;

use common::*;

/// One volume served alone; returns (env, volume path, server).
fn setup(sector: &str, extra: &[&str]) -> (Env, std::path::PathBuf, Server) {
    let env = Env::new();
    let vol = env.create("v.img", "32M", &["--sector-size", sector]);
    let srv = env.serve(&[s(&vol)], extra, false);
    (env, vol, srv)
}

fn check(name: &str, sector: &str, extra: &[&str]) {
    let (_env, _vol, srv) = setup(sector, extra);
    semantics(name, &[&srv.uri("v")]);
    assert!(
        !srv.log_text().contains("panicked"),
        "server panicked:\n{}",
        srv.log_text()
    );
}

#[test]
fn out_of_range_requests_get_einval_or_enospc() {
    check("bounds", "4096", &[]);
}

#[test]
fn out_of_range_requests_512() {
    check("bounds", "512", &[]);
}

#[test]
fn unknown_or_misplaced_flags_get_einval() {
    check("bad_flags", "4096", &[]);
}

#[test]
fn zero_length_requests_succeed() {
    check("zero_length", "4096", &[]);
}

#[test]
fn flush_and_fua() {
    check("flush_fua", "4096", &[]);
}

#[test]
fn trim_keeps_neighbours() {
    check("trim", "4096", &[]);
}

#[test]
fn trim_keeps_neighbours_with_discard() {
    check("trim", "4096", &["--discard"]);
}

#[test]
fn write_zeroes_reads_back_zero() {
    check("zero", "4096", &[]);
}

#[test]
fn write_zeroes_reads_back_zero_with_discard() {
    check("zero", "512", &["--discard"]);
}

#[test]
fn cache_is_harmless() {
    check("cache", "4096", &[]);
}

#[test]
fn two_hundred_aio_requests_in_flight() {
    check("aio", "4096", &[]);
}

#[test]
fn two_hundred_aio_requests_with_small_budget() {
    // A 1 MiB in-flight budget forces back-pressure; everything must still complete.
    check("aio", "4096", &["--max-inflight", "1M"]);
}

#[test]
fn unaligned_small_writes_4096() {
    check("unaligned", "4096", &[]);
}

#[test]
fn unaligned_small_writes_512() {
    check("unaligned", "512", &[]);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let env = Env::new();
    let vol = env.create("v.img", "32M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    semantics("prepare_read_only", &[&srv.uri("v")]);
    srv.stop();
    let ro = env.serve(&[s(&vol)], &["--read-only"], false);
    semantics("read_only", &[&ro.uri("v")]);
    ro.stop();
    // Nothing changed on disk through the read-only server.
    let srv = env.serve(&[s(&vol)], &[], false);
    semantics("verify_prepared", &[&srv.uri("v")]);
}

#[test]
fn nbdsh_command_line() {
    // The plain nbdsh front end (strict mode on) against the server.
    let env = Env::new();
    let vol = env.create("v.img", "8M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    let out = nbdsh(
        &srv.uri("v"),
        "assert h.get_size() == 8 << 20\n\
         h.pwrite(b'\\x42' * 8192, 4096, nbd.CMD_FLAG_FUA)\n\
         assert h.pread(8192, 4096) == b'\\x42' * 8192\n\
         h.flush()\n\
         print('nbdsh-ok')",
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("nbdsh-ok"),
        "nbdsh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
