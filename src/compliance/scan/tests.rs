//! Unit tests of the scanner: sidecar recognition, feature lists, key facts from
//! errors, content probes and the directory walk.

use super::*;

/// A sidecar as docs/format.md §10.7 describes it.
fn sidecar(uuid: &uuid::Uuid, in_use: u8, base: &str, words: &[u64]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut b = b"CVCBT001".to_vec();
    b.extend_from_slice(uuid.as_bytes());
    b.push(in_use);
    b.extend_from_slice(&(base.len() as u16).to_le_bytes());
    b.extend_from_slice(base.as_bytes());
    b.extend_from_slice(&volume::SNAPSHOT_CHUNK.to_le_bytes());
    b.extend_from_slice(&(words.len() as u64).to_le_bytes());
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let sum = Sha256::digest(&b);
    b.extend_from_slice(&sum);
    b
}

#[test]
fn only_a_well_formed_sidecar_parses() {
    let u = uuid::Uuid::from_bytes([3; 16]);
    let good = sidecar(&u, 0, "snap-1", &[1, 2, 3]);
    assert_eq!(parse_sidecar(&good), Some((u, 3)));
    assert_eq!(parse_sidecar(&sidecar(&u, 1, "", &[])), Some((u, 0)));
    assert_eq!(parse_sidecar(&good[..good.len() - 1]), None);
    assert_eq!(parse_sidecar(b"CVCBT001"), None);
    assert_eq!(parse_sidecar(&sidecar(&u, 2, "snap-1", &[1])), None);
    // The magic plus anything else (an ext4 image given eight bytes) is not one.
    let mut forged = vec![0u8; 4096];
    forged[..8].copy_from_slice(b"CVCBT001");
    assert_eq!(parse_sidecar(&forged), None);
    // A word count that disagrees with the length, with a valid checksum.
    let mut b = sidecar(&u, 0, "s", &[7, 7]);
    b.truncate(b.len() - 32);
    let at = 8 + 16 + 1 + 2 + 1 + 8;
    b[at..at + 8].copy_from_slice(&3u64.to_le_bytes());
    let sum = <sha2::Sha256 as sha2::Digest>::digest(&b);
    b.extend_from_slice(&sum);
    assert_eq!(parse_sidecar(&b), None);
}

#[test]
fn feature_lists() {
    assert_eq!(split_features("reencrypt"), vec!["reencrypt"]);
    assert_eq!(split_features("a, reencrypt"), vec!["a", "reencrypt"]);
    assert!(split_features("").is_empty());
}

#[test]
fn describe_errors_become_facts() {
    let nf = KeyError::NotFound {
        backend: "local".into(),
        key: "mk-x".into(),
    };
    assert!(matches!(from_error(nf), KeyFacts::Missing(_)));
    let pd = KeyError::KeyUnusable {
        key: "k".into(),
        state: "pending deletion according to exec backend v".into(),
    };
    assert!(matches!(
        from_error(pd),
        KeyFacts::Found {
            state: KeyState::PendingDeletion,
            ..
        }
    ));
    let d = KeyError::KeyUnusable {
        key: "k".into(),
        state: "disabled in AWS KMS".into(),
    };
    assert!(matches!(
        from_error(d),
        KeyFacts::Found {
            state: KeyState::Disabled,
            ..
        }
    ));
    let t = KeyError::Transient("timeout".into());
    assert!(matches!(from_error(t), KeyFacts::LookupFailed(_)));
}

#[test]
fn probing_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let probe_of = |path: &Path| probe(path, &std::fs::metadata(path).unwrap()).unwrap();
    std::fs::write(p("empty"), b"").unwrap();
    assert_eq!(probe_of(&p("empty")), DataKind::Empty);
    // Sparse: 10 MiB of holes with a zero block written in the middle.
    let f = File::create(p("sparse")).unwrap();
    f.set_len(10 << 20).unwrap();
    f.write_at(&[0u8; 4096], 5 << 20).unwrap();
    assert_eq!(probe_of(&p("sparse")), DataKind::Zeros);
    // A single non-zero byte far from the start.
    f.write_at(&[1], 7 << 20).unwrap();
    assert_eq!(probe_of(&p("sparse")), DataKind::Unrecognised);
    std::fs::write(p("text"), b"hello").unwrap();
    assert_eq!(probe_of(&p("text")), DataKind::Unrecognised);
    let mut q = vec![0u8; 1024];
    q[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    std::fs::write(p("q"), &q).unwrap();
    assert_eq!(probe_of(&p("q")), DataKind::Qcow2 { version: 3 });
}

#[test]
fn walking_reports_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/b"), b"x").unwrap();
    std::fs::write(d.join("a"), b"x").unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).unwrap();
    std::os::unix::fs::symlink(d, d.join("sub/loop")).unwrap();
    nix::unistd::mkfifo(&d.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut out = Vec::new();
    walk(d, None, &mut HashSet::new(), &mut out);
    let names: Vec<(String, &str)> = out
        .iter()
        .map(|e| match e {
            Entry::Item(p, _) => (p.strip_prefix(d).unwrap().display().to_string(), "item"),
            Entry::Unreadable(p, _) => (p.strip_prefix(d).unwrap().display().to_string(), "error"),
            Entry::Skipped(p, _, _) => (p.strip_prefix(d).unwrap().display().to_string(), "skip"),
            Entry::Image(p) => (p.display().to_string(), "image"),
        })
        .collect();
    let want: Vec<(String, &str)> = [
        ("a", "item"),
        ("dangling", "error"),
        ("fifo", "skip"),
        ("sub/b", "item"),
        ("sub/loop", "skip"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), *b))
    .collect();
    assert_eq!(names, want);
}

#[test]
fn rbd_paths_are_images_not_files() {
    let mut out = Vec::new();
    walk(
        Path::new("rbd:rbd/vol1"),
        None,
        &mut HashSet::new(),
        &mut out,
    );
    assert!(
        matches!(out.as_slice(), [Entry::Image(p)] if p == Path::new("rbd:rbd/vol1")),
        "an rbd: path must be checked as an image, not looked up as a file"
    );
}
