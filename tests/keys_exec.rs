//! The exec backend end to end, against the example program
//! scripts/exec-backend-example.py (Python 3 with python3-cryptography).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use cryptvol::keys::{EncryptionContext, KeyError, KeyOp, KeyService};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/exec-backend-example.py")
}

fn require_python_cryptography() {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import cryptography.hazmat.primitives.ciphers.aead"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3-cryptography is not installed for /usr/bin/python3; run scripts/install-deps.sh"
    );
}

/// `exec-backend-example.py --dir DIR ARGS...`
fn example_admin(dir: &Path, args: &[&str]) {
    run_ok(
        Command::new("/usr/bin/python3")
            .arg(example())
            .arg("--dir")
            .arg(dir)
            .args(args),
    );
}

/// Registers the example program, keeping its keys in `keys`, as exec backend `example`.
fn register_example(env: &Env, keys: &Path) {
    run_ok(
        env.cmd()
            .args(["key", "exec", "add", "example", "--timeout", "30", "--"])
            .arg("/usr/bin/python3")
            .arg(example())
            .arg("--dir")
            .arg(keys),
    );
}

fn slot0(env: &Env, vol: &Path) -> (String, String) {
    let info = info_json(env, vol);
    (
        info["keyslots"][0]["backend"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        info["keyslots"][0]["key_id"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

#[tokio::test]
async fn exec_backend_volume_lifecycle() {
    require_python_cryptography();
    let env = Env::new();
    let keys = env.path("example-keys");
    example_admin(&keys, &["create-key", "k1"]);
    register_example(&env, &keys);
    let list = run_ok(env.cmd().args(["key", "exec", "list"]));
    assert!(
        list.contains("example") && list.contains("exec-backend-example.py"),
        "{list}"
    );

    // Create, serve, write and read back through a real client.
    let vol = env.create("x.img", "16M", &["--key", "exec:example:k1"]);
    assert_eq!(slot0(&env, &vol), ("exec".into(), "example:k1".into()));
    let disk = read(&vol);
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("x"), &["write -P 0x6c 0 2M", "read -P 0x6c 0 2M"]);
    srv.stop();
    // The program's key file never appears in the volume.
    let k1 = read(&keys.join("k1.key"));
    assert!(!contains(&disk, &k1));

    // A keyslot is bound to its volume: another context is refused, by cryptvol
    // (stored context differs) and by the program (stored context edited to match).
    let (header, _) = cryptvol::volume::read_header(&vol).expect("header");
    let svc = KeyService::new(&env.keystore(), None);
    let other = EncryptionContext::for_volume(&uuid::Uuid::new_v4());
    let err = svc
        .unwrap(&header.keyslots[0], &other, KeyOp::Unwrap, None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeyError::ContextMismatch { .. }), "{err:?}");
    let mut forged = header.keyslots[0].clone();
    forged.context = other.clone();
    let err = svc
        .unwrap(&forged, &other, KeyOp::Unwrap, None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, KeyError::WrongKey { .. }), "{err:?}");
    let right = EncryptionContext::for_volume(&header.uuid);
    assert!(svc
        .unwrap(&header.keyslots[0], &right, KeyOp::Unwrap, None)
        .await
        .is_ok());

    // A key the program reports disabled: attach refused, naming the volume and the key.
    example_admin(&keys, &["disable-key", "k1"]);
    let err = serve_fails(&env, &vol);
    assert!(
        err.contains(s(&vol)) && err.contains("example:k1") && err.contains("disabled"),
        "{err}"
    );
    example_admin(&keys, &["enable-key", "k1"]);

    // Rekey exec -> local -> exec (the program's default key), data intact.
    run_ok(env.cmd().args(["key", "create", "--alias", "alias/l"]));
    run_ok(env.cmd().args(["rekey", s(&vol), "--to-key", "alias/l"]));
    assert_eq!(slot0(&env, &vol).0, "local");
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("x"), &["read -P 0x6c 0 2M"]);
    srv.stop();
    run_ok(
        env.cmd()
            .args(["rekey", s(&vol), "--to-key", "exec:example"]),
    );
    assert_eq!(slot0(&env, &vol), ("exec".into(), "example:default".into()));
    run_ok(env.cmd().args(["key", "disable", "alias/l"]));
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("x"), &["read -P 0x6c 0 2M"]);
    srv.stop();

    // The exec backend as the configured default key.
    run_ok(env.cmd().args(["key", "set-default", "exec:example:k1"]));
    let v2 = env.create("y.img", "4M", &[]);
    assert_eq!(slot0(&env, &v2), ("exec".into(), "example:k1".into()));

    // Unregistered: its volumes cannot be attached, with a clear message.
    run_ok(env.cmd().args(["key", "exec", "remove", "example"]));
    let err = serve_fails(&env, &vol);
    assert!(err.contains("example") && err.contains("exec add"), "{err}");
    let err = fails(
        env.cmd()
            .args(["key", "exec", "add", "rel", "--", "python3"]),
    );
    assert!(err.contains("absolute path"), "{err}");

    // Every exec operation is in the audit log, with the volume UUID.
    let log = std::fs::read_to_string(env.keystore().join("audit.jsonl")).expect("log");
    let exec: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["backend"] == "exec")
        .collect();
    let summary: Vec<String> = exec
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["operation"].as_str().unwrap_or(""),
                r["key_id"].as_str().unwrap_or(""),
                r["error"].as_str().unwrap_or("ok")
            )
        })
        .collect();
    for want in [
        "exec-add example ok",
        "generate example:k1 ok",
        "unwrap example:k1 ok",
        "unwrap example:k1 ContextMismatch",
        "unwrap example:k1 WrongKey",
        "unwrap example:k1 KeyUnusable",
        "rewrap-from example:k1 ok",
        "rewrap-to example:default ok",
        "unwrap example:default ok",
        "exec-remove example ok",
        "unwrap example:default NotFound",
    ] {
        assert!(
            summary.iter().any(|s| s == want),
            "{want} missing: {summary:#?}"
        );
    }
    assert!(exec
        .iter()
        .filter(|r| r["operation"] == "generate")
        .all(|r| r["volume_uuid"].as_str().is_some()));
}

/// Records its environment and open descriptors in the file named by its first argument,
/// then becomes the program named by the rest (the example backend), which answers.
const DUMPER: &str = r#"
import json, os, sys
fds = []
for fd in range(0, 4096):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
with open(sys.argv[1], "w") as f:
    json.dump({"env": dict(os.environ), "fds": fds}, f)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"#;

/// Issue 14 B8: the exec backend's program inherited cryptvol's whole environment (AWS
/// credentials included) and its open descriptors, the `--passphrase-fd` one included.
/// It must get a cleared environment (the allow-list plus the names registered with
/// `--env`) and only descriptors 0, 1 and 2.
#[test]
fn exec_program_inherits_no_environment_and_no_descriptors() {
    require_python_cryptography();
    let env = Env::new();
    let keys = env.path("example-keys");
    example_admin(&keys, &["create-key", "k1"]);
    let dumper = env.path("dumper.py");
    std::fs::write(&dumper, DUMPER).expect("write");
    let dump = env.path("dump.json");
    run_ok(
        env.cmd()
            .args(["key", "exec", "add", "dump", "--timeout", "30"])
            .args(["--env", "KEEP_ME", "--"])
            .arg("/usr/bin/python3")
            .arg(&dumper)
            .arg(&dump)
            .arg(example())
            .arg("--dir")
            .arg(&keys),
    );
    let list = run_ok(env.cmd().args(["key", "exec", "list"]));
    assert!(list.contains("environment KEEP_ME"), "{list}");
    let pass = env.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").expect("write");
    let vol = env.create(
        "v.img",
        "4M",
        &[
            "--passphrase-file",
            s(&pass),
            "--pbkdf-memory",
            "8192",
            "--pbkdf-time",
            "1",
        ],
    );
    // Descriptor 7 holds the passphrase, opened by the shell (so not close-on-exec),
    // and the environment carries credentials the program must not see.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"exec "$0" "$@" 7<"$PASSFILE""#)
        .arg(bin())
        .args(["keyslot", "add", s(&vol), "--key", "exec:dump:k1"])
        .args(["--unlock-passphrase-fd", "7"])
        .env("PASSFILE", &pass)
        .env("CRYPTVOL_KEYSTORE", env.keystore())
        .env("AWS_ACCESS_KEY_ID", "AKIAEXAMPLELEAKED")
        .env("AWS_SECRET_ACCESS_KEY", "leaked-secret")
        .env("CRYPTVOL_SOMETHING", "leaked")
        .env("HOME", "/root/leaked-home")
        .env("KEEP_ME", "kept")
        .env("LANG", "C.UTF-8");
    run_ok(&mut cmd);
    let d: serde_json::Value =
        serde_json::from_slice(&read(&dump)).expect("the program did not record its state");
    let child_env = d["env"].as_object().expect("env");
    let names: Vec<&String> = child_env.keys().collect();
    for n in &names {
        assert!(
            !n.starts_with("AWS_")
                && (!n.starts_with("CRYPTVOL_") || *n == "CRYPTVOL_EXEC_PROTOCOL"),
            "the program inherited {n}: {names:?}"
        );
    }
    assert!(!child_env.contains_key("HOME"), "{names:?}");
    assert!(!child_env.contains_key("PASSFILE"), "{names:?}");
    assert_eq!(child_env["KEEP_ME"], "kept");
    assert_eq!(child_env["LANG"], "C.UTF-8");
    assert_eq!(child_env["CRYPTVOL_EXEC_PROTOCOL"], "1");
    assert!(child_env.contains_key("PATH"), "{names:?}");
    assert_eq!(
        d["fds"],
        serde_json::json!([0, 1, 2]),
        "inherited descriptors"
    );
    // The operation itself went through: keyslot 1 is the program's.
    let info = info_json(&env, &vol);
    assert_eq!(info["keyslots"][1]["key_id"], "dump:k1");
}

/// A signal while `serve` is still unlocking its volumes (here: an exec backend that
/// hangs) is handled: SIGHUP does not end it, SIGTERM ends it cleanly (status 0, a log
/// line) instead of killing it by the signal's default action, as it did when the
/// handlers were installed only once serving.
#[test]
fn signals_during_start_up_are_handled() {
    require_python_cryptography();
    let env = Env::new();
    let keys = env.path("example-keys");
    example_admin(&keys, &["create-key", "k1"]);
    register_example(&env, &keys);
    let vol = env.create("x.img", "4M", &["--key", "exec:example:k1"]);
    // Replace the backend by one that blocks reading a FIFO: the test's open of the FIFO
    // for writing returns once the backend is running, and closing it lets the backend go.
    let fifo = env.path("hold.fifo");
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .expect("mkfifo");
    let hold = env.path("hold.sh");
    std::fs::write(&hold, "exec /bin/cat \"$1\" > /dev/null\n").expect("write");
    run_ok(
        env.cmd()
            .args(["key", "exec", "add", "example", "--timeout", "60", "--"])
            .arg("/bin/sh")
            .arg(&hold)
            .arg(&fifo),
    );
    let mut srv = env.serve_starting(&[s(&vol)]);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::OpenOptions::new().write(true).open(path));
    });
    let release = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the exec backend was never started:\n{}", srv.log_text()))
        .expect("open the FIFO");
    let _ = Command::new("kill")
        .args(["-HUP", &srv.pid().to_string()])
        .status();
    assert!(srv.alive(), "SIGHUP ended the daemon during start-up");
    let log = srv.stop();
    drop(release);
    assert!(log.contains("stop requested during start-up"), "{log}");
}
