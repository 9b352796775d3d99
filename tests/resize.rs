//! Growing volumes (issue 16 item 2): `cryptvol resize FILE --size SIZE` on a volume that
//! is not served, checked through the real peers (nbdinfo, nbdsh), `info`, `check` and
//! the audit log; shrinking and resizing a served file are refused.

mod common;

use common::*;

const OLD: u64 = 64 * 1024 * 1024 + 4096; // the last 64 KiB chunk is short
const NEW: u64 = 2 * OLD;

#[test]
fn offline_grow_keeps_data_and_new_clients_see_and_use_the_new_size() {
    let env = Env::new();
    let vol = env.create("grow.vol", &OLD.to_string(), &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    // Data at the start and in the short last chunk (its bit is set).
    nbdsh_ok(
        &srv.uri(""),
        &format!(
            "h.pwrite(b'A' * 8192, 0)\nh.pwrite(b'Z' * 8192, {})\nh.flush()",
            OLD - 8192
        ),
    );
    // A served volume is refused, saying what to do.
    let err = fails(env.cmd().args(["resize", s(&vol), "--size", "+64M"]));
    assert!(
        err.contains("being served") && err.contains("resize --control"),
        "{err}"
    );
    srv.stop();

    let out = run_ok(
        env.cmd()
            .args(["resize", s(&vol), "--size", &format!("+{OLD}")]),
    );
    assert!(
        out.contains("grown from") && out.contains(&NEW.to_string()),
        "{out}"
    );
    let info = info_json(&env, &vol);
    assert_eq!(info["size"], NEW, "{info}");

    let srv = env.serve(&[s(&vol)], &[], false);
    assert_eq!(nbdinfo_size(&srv.uri("")), NEW);
    let got = nbdsh_ok(
        &srv.uri(""),
        &format!(
            "assert h.pread(8192, 0) == b'A' * 8192\n\
             assert h.pread(8192, {old} - 8192) == b'Z' * 8192\n\
             assert h.pread({rest}, {old}) == bytes({rest})\n\
             h.pwrite(b'E' * 4096, {new} - 4096)\nh.flush()\n\
             assert h.pread(4096, {new} - 4096) == b'E' * 4096\n\
             print('OK', h.get_size())",
            old = OLD,
            new = NEW,
            rest = 1 << 20,
        ),
    );
    assert!(got.contains(&format!("OK {NEW}")), "{got}");
    srv.stop();

    // The audit log records the resize; check finds the volume compliant.
    let audit = String::from_utf8_lossy(&read(&env.keystore().join("audit.jsonl"))).into_owned();
    let line = audit
        .lines()
        .find(|l| l.contains("\"operation\":\"resize\""))
        .unwrap_or_else(|| panic!("no resize record in the audit log:\n{audit}"));
    assert!(
        line.contains(&format!("{OLD}->{NEW}")) && line.contains("\"result\":\"ok\""),
        "{line}"
    );
    let out = run(env.cmd().arg("check").arg(&vol));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("COMPLIANT"), "{text}");
}

#[test]
fn shrinking_is_refused_and_the_volume_is_unchanged() {
    let env = Env::new();
    let vol = env.create("shrink.vol", "64M", &[]);
    let err = fails(env.cmd().args(["resize", s(&vol), "--size", "32M"]));
    assert!(
        err.contains("cannot shrink") && err.contains("use a new volume and copy"),
        "{err}"
    );
    let err = fails(env.cmd().args(["resize", s(&vol), "--size", "100"]));
    assert!(err.contains("cannot shrink"), "{err}");
    let err = fails(env.cmd().args(["resize", s(&vol), "--size", "64M"]));
    assert!(err.contains("already has"), "{err}");
    assert_eq!(info_json(&env, &vol)["size"], 64 << 20);
}

#[test]
fn a_thick_volume_grows_thin_or_thick_with_preallocate() {
    let env = Env::new();
    let vol = env.create("thick.vol", "64M", &["--preallocate"]);
    let srv = env.serve(&[s(&vol)], &[], false);
    nbdsh_ok(
        &srv.uri(""),
        "h.pwrite(b'T' * 65536, (64 << 20) - 65536)\nh.flush()",
    );
    srv.stop();
    let alloc = |v: &serde_json::Value| v["allocation"]["allocated_bytes"].as_u64();
    assert_eq!(alloc(&info_json(&env, &vol)), Some(64 << 20));
    // Without --preallocate the new space is thin.
    run_ok(env.cmd().args(["resize", s(&vol), "--size", "96M"]));
    let info = info_json(&env, &vol);
    assert_eq!(
        (info["size"].as_u64(), alloc(&info)),
        (Some(96 << 20), Some(64 << 20)),
        "{info}"
    );
    // With it, every chunk is allocated afterwards.
    run_ok(
        env.cmd()
            .args(["resize", s(&vol), "--size", "+32M", "--preallocate"]),
    );
    let info = info_json(&env, &vol);
    assert_eq!(
        (info["size"].as_u64(), alloc(&info)),
        (Some(128 << 20), Some(128 << 20)),
        "{info}"
    );
    let srv = env.serve(&[s(&vol)], &[], false);
    assert_eq!(nbdinfo_size(&srv.uri("")), 128 << 20);
    let got = nbdsh_ok(
        &srv.uri(""),
        "assert h.pread(65536, (64 << 20) - 65536) == b'T' * 65536\n\
         for off in range(64 << 20, 128 << 20, 1 << 20):\n    \
             assert h.pread(1 << 20, off) == bytes(1 << 20), off\n\
         print('THICK-OK')",
    );
    assert!(got.contains("THICK-OK"), "{got}");
    srv.stop();
}

/// Kills `cryptvol resize` (fault injection, SIGKILL) at each step of a grow that also
/// moves the allocation map: every state opens, with the old size before the first
/// header copy is complete and the new size after, and the data intact.
#[test]
fn a_resize_killed_at_any_step_leaves_the_old_or_the_new_size() {
    let env = Env::new();
    let base = grow_faults::base(&env);
    for (step, grown) in grow_faults::STEPS {
        let want = grow_faults::want(grown);
        let vol = grow_faults::copy_for(&env, &base, step);
        let to = grow_faults::TO.to_string();
        let out = run(env
            .cmd()
            .args(["resize", s(&vol), "--size", &to])
            .envs(grow_faults::env(step)));
        assert!(!out.status.success(), "{step}: resize was not killed");
        grow_faults::assert_size(&env, &vol, step, want);
        let srv = env.serve(&[s(&vol)], &[], false);
        grow_faults::assert_served(&srv.uri(""), step, want);
        srv.stop();
        if !grown {
            // The interrupted grow can simply be run again.
            run_ok(env.cmd().args(["resize", s(&vol), "--size", &to]));
            assert_eq!(info_json(&env, &vol)["size"], grow_faults::TO, "{step}");
        }
        grow_faults::assert_check_clean(&env, &vol, step);
    }
}
