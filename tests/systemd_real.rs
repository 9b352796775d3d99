//! cryptvol.service and cryptvol.socket under a real systemd (systemd-nspawn booting this
//! host's /usr): socket activation, reload, structured journal fields and a watchdog
//! restart. The checks are in scripts/systemd-test.sh; this test runs it on this build.

mod common;

use std::process::Command;

#[test]
fn units_work_under_a_real_systemd() {
    common::require("systemd-nspawn");
    common::require("nbdinfo");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(repo.join("scripts/systemd-test.sh"))
        .arg(common::bin())
        .output()
        .expect("run scripts/systemd-test.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for step in [
        "PASS: socket activation",
        "PASS: systemctl reload",
        "PASS: journalctl -o json",
        "PASS: watchdog: healthy daemon",
        "PASS: watchdog: SIGSTOPped daemon",
        "systemd-test: OK",
    ] {
        assert!(
            stdout.contains(step),
            "missing {step:?}:\n{stdout}\n{stderr}"
        );
    }
}
