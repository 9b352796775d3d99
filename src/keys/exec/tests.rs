use super::*;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn ctx(uuid: &uuid::Uuid) -> EncryptionContext {
    EncryptionContext::for_volume(uuid)
}

fn example_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/exec-backend-example.py")
}

/// The example program on a fresh key directory.
fn example(dir: &Path) -> ExecBackend {
    ExecBackend::new(
        "example",
        ExecSpec {
            program: PathBuf::from("/usr/bin/python3"),
            args: vec![
                example_script().display().to_string(),
                "--dir".into(),
                dir.join("example-keys").display().to_string(),
            ],
            timeout_secs: 30,
            env: vec![],
        },
        Principal::current(),
    )
}

/// A shell-script backend with the given body.
fn script(dir: &Path, body: &str, timeout_secs: u64) -> ExecBackend {
    let path = dir.join("backend.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    ExecBackend::new(
        "sh",
        ExecSpec {
            program: path,
            args: vec![],
            timeout_secs,
            env: vec![],
        },
        Principal::current(),
    )
}

#[tokio::test]
async fn example_program_round_trip_and_context_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let b = example(tmp.path());
    let vol = uuid::Uuid::new_v4();
    let (dek, wrapped) = b.generate_dek(None, &ctx(&vol)).await.unwrap();
    assert_eq!(wrapped.backend, "exec");
    assert_eq!(wrapped.key_id, "example:default");
    assert_eq!(
        wrapped.params.get("alg").map(String::as_str),
        Some("AES-256-GCM")
    );
    assert_eq!(wrapped.blob.len(), 12 + 64 + 16);
    let back = b.unwrap(&wrapped, &ctx(&vol)).await.unwrap();
    assert_eq!(back.expose(), dek.expose());

    // Another volume's context is refused before the program runs ...
    let other = uuid::Uuid::new_v4();
    let err = b.unwrap(&wrapped, &ctx(&other)).await.err().unwrap();
    assert!(matches!(err, KeyError::ContextMismatch { .. }), "{err:?}");
    // ... and a keyslot whose stored context was edited is refused by the program (AAD).
    let mut forged = wrapped.clone();
    forged.context = ctx(&other);
    let err = b.unwrap(&forged, &ctx(&other)).await.err().unwrap();
    assert!(matches!(err, KeyError::WrongKey { .. }), "{err:?}");
    assert!(err.to_string().contains("example:default"), "{err}");

    // Describe, a missing key, a disabled key.
    let d = b.describe_key(None).await.unwrap();
    assert_eq!(d.key_id, "example:default");
    assert_eq!(d.state, KeyState::Enabled);
    let err = b.describe_key(Some("nope")).await.err().unwrap();
    assert!(matches!(err, KeyError::NotFound { .. }), "{err:?}");
    let keys = tmp.path().join("example-keys");
    std::fs::write(keys.join("default.disabled"), b"").unwrap();
    let err = b.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::KeyUnusable { .. }), "{err:?}");
    assert!(err.to_string().contains("disabled"), "{err}");
}

#[tokio::test]
async fn keyslot_of_another_exec_backend_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = example(tmp.path());
    let vol = uuid::Uuid::new_v4();
    let (_dek, mut wrapped) = b.generate_dek(None, &ctx(&vol)).await.unwrap();
    wrapped.key_id = "other:default".into();
    let err = b.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(matches!(err, KeyError::Malformed(_)), "{err:?}");
}

#[tokio::test]
async fn slow_program_is_killed_at_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let b = script(tmp.path(), "sleep 30", 1);
    let start = Instant::now();
    let err = b.describe_key(None).await.err().unwrap();
    assert!(matches!(err, KeyError::Transient(_)), "{err:?}");
    assert!(err.to_string().contains("1 s"), "{err}");
    // Killed, not waited for: well short of the program's 30 s (a generous bound for a
    // loaded machine).
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn oversized_answer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = script(tmp.path(), "head -c 200000 /dev/zero", 10);
    let err = b.describe_key(None).await.err().unwrap();
    assert!(err.to_string().contains("more than 65536 bytes"), "{err}");
}

#[tokio::test]
async fn failing_and_garbled_programs() {
    let tmp = tempfile::tempdir().unwrap();
    let b = script(tmp.path(), "echo 'vault sealed' >&2; exit 3", 10);
    let err = b.describe_key(None).await.err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("exit status: 3") && msg.contains("vault sealed"),
        "{msg}"
    );

    let b = script(tmp.path(), "echo 'not json'", 10);
    let err = b.describe_key(None).await.err().unwrap();
    assert!(
        err.to_string().contains("not a valid protocol response"),
        "{err}"
    );

    let b = script(
        tmp.path(),
        r#"cat >/dev/null; echo '{"ok":false,"error":"access_denied","message":"policy says no"}'"#,
        10,
    );
    let err = b.describe_key(Some("k")).await.err().unwrap();
    assert!(matches!(err, KeyError::AccessDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("policy says no"), "{err}");

    let b = script(tmp.path(), "exit 0", 10);
    let err = b.describe_key(None).await.err().unwrap();
    assert!(err.to_string().contains("without an answer"), "{err}");

    let missing = ExecBackend::new(
        "gone",
        ExecSpec {
            program: tmp.path().join("no-such-program"),
            args: vec![],
            timeout_secs: 5,
            env: vec![],
        },
        Principal::current(),
    );
    let err = missing.describe_key(None).await.err().unwrap();
    assert!(err.to_string().contains("cannot run"), "{err}");
}

#[tokio::test]
async fn wrong_length_plaintext_and_foreign_key_id_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = uuid::Uuid::new_v4();
    let wrapped = WrappedDek {
        backend: "exec".into(),
        key_id: "sh:k".into(),
        blob: vec![1, 2, 3],
        context: ctx(&vol),
        params: BTreeMap::new(),
    };
    let b = script(
        tmp.path(),
        r#"cat >/dev/null; echo '{"ok":true,"key_id":"k","plaintext_b64":"AAAA"}'"#,
        10,
    );
    let err = b.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(err.to_string().contains("not 64"), "{err}");
    let b = script(
        tmp.path(),
        r#"cat >/dev/null; echo '{"ok":true,"key_id":"other","plaintext_b64":"AAAA"}'"#,
        10,
    );
    let err = b.unwrap(&wrapped, &ctx(&vol)).await.err().unwrap();
    assert!(err.to_string().contains("another key"), "{err}");
}

#[tokio::test]
async fn request_carries_the_documented_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let capture = tmp.path().join("req.json");
    let b = script(
        tmp.path(),
        &format!(
            r#"cat > {}; echo '{{"ok":true,"key_id":"k1","blob_b64":"AQID","params":{{"p":"1"}}}}'"#,
            capture.display()
        ),
        10,
    );
    let vol = uuid::Uuid::new_v4();
    let dek = Dek::generate().unwrap();
    let w = b.wrap(Some("k1"), &dek, &ctx(&vol)).await.unwrap();
    assert_eq!(w.key_id, "sh:k1");
    assert_eq!(w.blob, vec![1, 2, 3]);
    assert_eq!(w.params.get("p").map(String::as_str), Some("1"));
    let req: serde_json::Value = serde_json::from_slice(&std::fs::read(&capture).unwrap()).unwrap();
    assert_eq!(req["protocol"], 1);
    assert_eq!(req["op"], "wrap");
    assert_eq!(req["key_id"], "k1");
    assert_eq!(req["uid"], Principal::current().uid);
    assert_eq!(req["context"]["cryptvol:volume-uuid"], vol.to_string());
    let pt = STANDARD
        .decode(req["plaintext_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(&pt[..], &dek.expose()[..]);
}

#[test]
fn registry_add_list_remove_and_audit() {
    let tmp = tempfile::tempdir().unwrap();
    let ks = LocalKeystore::open(&tmp.path().join("keys"), true).unwrap();
    let spec = ExecSpec {
        program: PathBuf::from("/usr/bin/true"),
        args: vec!["a".into()],
        timeout_secs: 5,
        env: vec!["VAULT_ADDR".into()],
    };
    ks.exec_add("vault", spec.clone()).unwrap();
    assert_eq!(ks.exec_backends().unwrap().get("vault"), Some(&spec));
    assert_eq!(ks.exec_backend("vault").unwrap().name(), "vault");
    let relative = ExecSpec {
        program: PathBuf::from("true"),
        ..spec.clone()
    };
    assert!(ks.exec_add("rel", relative).is_err());
    assert!(ks.exec_add("bad name", spec.clone()).is_err());
    let slow = ExecSpec {
        timeout_secs: 1000,
        ..spec.clone()
    };
    assert!(ks.exec_add("slow", slow).is_err());
    ks.exec_remove("vault").unwrap();
    let err = ks.exec_backend("vault").err().unwrap();
    assert!(err.to_string().contains("cryptvol key exec add"), "{err}");
    assert!(ks.exec_remove("vault").is_err());
    let log = std::fs::read_to_string(ks.dir().join("audit.jsonl")).unwrap();
    let ops: Vec<(String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            (
                v["operation"].as_str().unwrap().to_string(),
                v["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            ("exec-add".to_string(), "ok".to_string()),
            ("exec-add".to_string(), "error".to_string()),
            ("exec-add".to_string(), "error".to_string()),
            ("exec-add".to_string(), "error".to_string()),
            ("exec-remove".to_string(), "ok".to_string()),
            ("exec-remove".to_string(), "error".to_string()),
        ]
    );
}

/// Issue 14 B8: the request was written before the deadline started to count, so a
/// program that never reads its stdin, behind a pipe that is already full (pipes can be
/// one page when the user's pipe quota is used up), blocked cryptvol forever. The
/// timeout must cover writing the request too.
#[test]
fn program_that_never_reads_its_stdin_is_killed_at_the_timeout() {
    use std::os::fd::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let b = script(tmp.path(), "exec sleep 60", 1);
    let mut child = Command::new(&b.spec.program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // Fill the stdin pipe so that the next write blocks.
    {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let stdin = child.stdin.as_mut().unwrap();
        let fd = stdin.as_raw_fd();
        fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        let block = [b' '; 4096];
        loop {
            match stdin.write(&block) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        fcntl(fd, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    }
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let request = LockedBytes::from_slice(b"{\"protocol\":1}\n").unwrap();
        let r = b.collect(&mut child, request);
        kill_group(&mut child);
        let _ = tx.send(r.err());
    });
    // Blocked until the program exits, it would take its 60 s; the bounds are well short
    // of that and generous for a loaded machine.
    let err = rx
        .recv_timeout(Duration::from_secs(50))
        .expect("still blocked writing the request long after the 1 s timeout")
        .expect("an error");
    assert!(matches!(err, KeyError::Transient(_)), "{err:?}");
    assert!(err.to_string().contains("1 s"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(50),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn registered_environment_names_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let ks = LocalKeystore::open(&tmp.path().join("keys"), true).unwrap();
    let spec = |env: &[&str]| ExecSpec {
        program: PathBuf::from("/usr/bin/true"),
        args: vec![],
        timeout_secs: 5,
        env: env.iter().map(|s| s.to_string()).collect(),
    };
    for bad in ["", "1X", "A=B", "A B", "X\n"] {
        let err = ks.exec_add("e", spec(&[bad])).expect_err(bad);
        assert!(err.to_string().contains("environment variable"), "{err}");
    }
    let many: Vec<String> = (0..33).map(|i| format!("V{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(ks.exec_add("e", spec(&many)).is_err());
    ks.exec_add("e", spec(&["VAULT_ADDR", "_X1"])).unwrap();
    let back = ks.exec_backends().unwrap();
    assert_eq!(back["e"].env, vec!["VAULT_ADDR", "_X1"]);
    // The child's environment: the allow-list, the registered names, a PATH always.
    let b = ExecBackend::new("e", back["e"].clone(), Principal::current());
    let names: Vec<String> = b.child_env().into_iter().map(|(k, _)| k).collect();
    assert!(
        names
            .iter()
            .all(|n| BASE_ENV.contains(&n.as_str()) || n == "VAULT_ADDR" || n == "_X1"),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "PATH"), "{names:?}");
}
