//! Bounds before trust (issue 14, A5 and B4/B5/B7/B10): files a hostile user can write
//! (a volume header, a changed-chunk sidecar, a keyslot) must not make `check` call an
//! unencrypted image compliant, nor make `info`/`check`/`serve` abort or stall; and a
//! volume restored from a snapshot gets its own data key.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// Rewrites both header copies of the volume at `path` after `f` changed the metadata
/// JSON, with valid checksums: what anyone who can write the file can do (the header MAC
/// needs the data key, but `info` and `check` cannot verify it without one).
fn forge_header(path: &Path, f: &dyn Fn(&mut serde_json::Value)) {
    use sha2::{Digest, Sha256};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open volume");
    for copy in 0..2u64 {
        let mut c = vec![0u8; 65536];
        file.read_exact_at(&mut c, copy * 65536).expect("read copy");
        let len = u32::from_le_bytes(c[56..60].try_into().expect("4 bytes")) as usize;
        let mut m: serde_json::Value =
            serde_json::from_slice(&c[4096..4096 + len]).expect("metadata JSON");
        f(&mut m);
        let json = serde_json::to_vec(&m).expect("encode");
        c[4096..].fill(0);
        c[4096..4096 + json.len()].copy_from_slice(&json);
        c[56..60].copy_from_slice(&(json.len() as u32).to_le_bytes());
        c[96..128].fill(0);
        let sum = Sha256::digest(&c);
        c[96..128].copy_from_slice(&sum);
        file.write_all_at(&c, copy * 65536).expect("write copy");
    }
}

/// A volume size of 2^60 bytes with an allocation map geometry consistent with it (page
/// count, copy offsets, data offset), so that only its size betrays it.
fn forge_huge_map(m: &mut serde_json::Value) {
    let size: u64 = 1 << 60;
    let chunk = m["allocation_map"]["chunk_size"]
        .as_u64()
        .expect("chunk size");
    let pages = size.div_ceil(chunk).div_ceil(32000);
    let start = m["allocation_map"]["copy_offsets"][0]
        .as_u64()
        .expect("offset");
    m["volume"]["size"] = size.into();
    m["allocation_map"]["pages"] = pages.into();
    m["allocation_map"]["copy_offsets"] = serde_json::json!([start, start + pages * 4096]);
    m["volume"]["data_offset"] = ((start + 2 * pages * 4096).div_ceil(1 << 20) << 20).into();
}

fn status_and_stderr(cmd: &mut Command) -> (Option<i32>, String) {
    let out = run(cmd);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn forged_allocation_map_geometry_is_a_clear_error_not_an_abort() {
    let env = Env::new();
    let vol = env.create("forged.img", "16M", &[]);
    forge_header(&vol, &forge_huge_map);

    let (code, err) = status_and_stderr(env.cmd().arg("info").arg(&vol));
    assert_eq!(code, Some(1), "info: {err}");
    assert!(
        err.contains("allocation map of") && err.contains("the header is damaged or forged"),
        "{err}"
    );
    assert!(!err.contains("memory allocation"), "{err}");

    let (code, err) = status_and_stderr(env.cmd().arg("check").arg(&vol));
    assert_eq!(code, Some(1), "check: {err}");
    assert!(err.contains("1 non-compliant"), "{err}");
    let out = run(env.cmd().arg("check").arg("--json").arg(&vol));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("the header is damaged or forged"),
        "{report}"
    );
}

/// An ext4 image whose first eight bytes are the changed-chunk sidecar's magic.
fn ext4_with_sidecar_magic(path: &Path) {
    require("mkfs.ext4");
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(8 << 20).expect("size image");
    drop(f);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.write_all_at(b"CVCBT001", 0).expect("write magic");
}

#[test]
fn sidecar_magic_does_not_make_an_unencrypted_image_compliant() {
    let env = Env::new();
    // Under any name, and even named as the sidecar of a real volume beside it.
    env.create("vol.img", "8M", &[]);
    for name in ["disk.img", "vol.img.cbt"] {
        let img = env.path(name);
        ext4_with_sidecar_magic(&img);
        let out = run(env.cmd().arg("check").arg("--json").arg(&img));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stdout} {stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
        assert_eq!(v["verdict"], "NON_COMPLIANT", "{name}: {v:#}");
        assert_eq!(v["content"], "ext4", "{name}: {v:#}");
    }
}
