//! Start-up with many exports (issue 18: ≤ 5 ms of start time per export). `serve` opens
//! exports a few at a time and group-commits their audit records; these tests hold it to
//! what opening them one by one guaranteed: every export's unwrap is in the audit log
//! before the server accepts a client, every export answers, and after a kill -9 no
//! export's changed-chunk sidecar can be loaded (the tracking restarts).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{info_json, require, run, s, Env};

const EXPORTS: usize = 7;

/// Offset of the "in use" flag in a `.cbt` sidecar (after the magic and the UUID).
const IN_USE_AT: usize = 8 + 16;

fn sidecar(vol: &Path) -> PathBuf {
    PathBuf::from(format!("{}.cbt", vol.display()))
}

/// Volume UUIDs of the successful `unwrap` records in the keystore's audit log.
fn unwrapped(env: &Env) -> BTreeSet<String> {
    let log = std::fs::read_to_string(env.keystore().join("audit.jsonl")).unwrap_or_default();
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit line is JSON"))
        .filter(|r| r["operation"] == "unwrap" && r["result"] == "ok")
        .filter_map(|r| r["volume_uuid"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn many_exports_are_audited_before_serving_and_lose_tracking_on_kill_9() {
    require("nbdinfo");
    let env = Env::new();
    let names: Vec<String> = (0..EXPORTS).map(|i| format!("v{i}.img")).collect();
    let vols: Vec<PathBuf> = names.iter().map(|n| env.create(n, "8M", &[])).collect();
    let uuids: BTreeSet<String> = vols
        .iter()
        .map(|v| {
            info_json(&env, v)["uuid"]
                .as_str()
                .expect("uuid")
                .to_string()
        })
        .collect();
    assert_eq!(uuids.len(), EXPORTS);
    assert!(unwrapped(&env).is_empty(), "unwrap records before serve");

    let args: Vec<&str> = vols.iter().map(|v| s(v)).collect();
    let srv = env.serve(&args, &[], false);
    // The socket accepts: every unwrap must already be in the audit log.
    assert_eq!(
        unwrapped(&env),
        uuids,
        "an export was served before its audit record"
    );
    assert_eq!(srv.log_text().matches("export opened").count(), EXPORTS);
    for i in 0..EXPORTS {
        let out = run(std::process::Command::new("nbdinfo")
            .arg("--size")
            .arg(srv.uri(&format!("v{i}"))));
        assert!(out.status.success(), "export v{i}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "8388608");
    }
    // Every sidecar says "in use" while served.
    for v in &vols {
        let b = std::fs::read(sidecar(v)).expect("sidecar written at open");
        assert_eq!(b.get(IN_USE_AT), Some(&1), "{} not in use", v.display());
    }
    srv.signal("KILL");
    let _ = srv.wait_exit(Duration::from_secs(60));
    for v in &vols {
        let b = std::fs::read(sidecar(v)).expect("sidecar");
        assert_eq!(
            b.get(IN_USE_AT),
            Some(&1),
            "{} clean after kill -9",
            v.display()
        );
    }

    // A clean stop marks them closed; the next start reads them and marks them in use
    // again before it serves.
    let srv = env.serve(&args, &[], false);
    srv.term();
    let status = srv.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    for v in &vols {
        let b = std::fs::read(sidecar(v)).expect("sidecar");
        assert_eq!(
            b.get(IN_USE_AT),
            Some(&0),
            "{} not closed cleanly",
            v.display()
        );
    }
    let srv = env.serve(&args, &[], false);
    for v in &vols {
        let b = std::fs::read(sidecar(v)).expect("sidecar");
        assert_eq!(
            b.get(IN_USE_AT),
            Some(&1),
            "{} not in use again",
            v.display()
        );
    }
    drop(srv);
}
