//! Per-export authorization with real clients running as other Unix users: who may open
//! an export over a Unix socket (`SO_PEERCRED`), what a refused client sees (no export in
//! `NBD_OPT_LIST`, `NBD_REP_ERR_POLICY`), and the audit record of each refusal.
//!
//! The daemon runs as root (CI runs the suite as root); clients run as uid 65534 and
//! 65533 through `setpriv`. Sockets are made mode 0666 so that the file permission is not
//! what refuses them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const NOBODY: u32 = 65534;
const OTHER: u32 = 65533;

/// A hand-written NBD client (fixed newstyle) printing one line per step, so the test can
/// check reply types exactly: `list: NAME...`, `go NAME: ok` or `go NAME: error 0xTYPE MSG`,
/// `export_name NAME: closed` / `transmission`, `probe: closed after N refusals`.
const RAW_CLIENT: &str = r#"
import socket, struct, sys

path, mode, name = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(path)

def rx(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b

def option(o, data):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data)

def replies():
    while True:
        magic, o, t, l = struct.unpack(">QIII", rx(20))
        d = rx(l)
        yield t, d
        if t == 1 or t & 0x80000000:
            return

def go(export):
    e = export.encode()
    option(7, struct.pack(">I", len(e)) + e + struct.pack(">H", 0))
    for t, d in replies():
        if t & 0x80000000:
            return "error %#x %s" % (t, d.decode(errors="replace"))
    return "ok"

rx(18)
if mode == "export_name":
    s.sendall(struct.pack(">I", 2))  # no C_NO_ZEROES: a success is 134 bytes
    option(1, name.encode())
    try:
        rx(134)
        print("export_name %s: transmission" % name)
    except EOFError:
        print("export_name %s: closed" % name)
    sys.exit(0)
s.sendall(struct.pack(">I", 3))
if mode == "list_go":
    option(3, b"")
    names = [d[4:4 + struct.unpack(">I", d[:4])[0]].decode() for t, d in replies() if t == 2]
    print("list: " + " ".join(names))
    print("go %s: %s" % (name, go(name)))
elif mode == "probe":
    n = 0
    try:
        while n < 100:
            r = go(name)
            assert r.startswith("error 0x80000002"), r
            n += 1
    except EOFError:
        print("probe: closed after %d refusals" % n)
"#;

/// `setpriv` running `prog` as `uid`/`gid` with only the given supplementary groups.
fn as_ids(uid: u32, gid: u32, groups: &[u32], prog: &str) -> Command {
    require("setpriv");
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.arg(format!("--groups={}", list.join(",")));
    }
    c.arg("--").arg(prog);
    c
}

fn raw_client(uid: u32, gid: u32, sock: &Path, mode: &str, export: &str) -> String {
    // The system interpreter: a python3 found first on root's PATH (a pyenv shim under
    // /root) may not be executable by another user.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        require("python3");
        "python3"
    };
    let mut c = as_ids(uid, gid, &[], python);
    c.arg("-c").arg(RAW_CLIENT).arg(sock).arg(mode).arg(export);
    run_ok(&mut c)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A root daemon serving `v` (and whatever `volumes` adds) on a 0666 Unix socket in a
/// directory every user can reach, auditing into `audit.jsonl`.
struct Setup {
    _env: Env,
    srv: Server,
    audit: PathBuf,
}

fn setup(extra: &[&str], config: Option<&str>) -> Setup {
    let euid = run_ok(Command::new("id").arg("-u"));
    assert_eq!(
        euid.trim(),
        "0",
        "the authorization tests run clients as other users: run the suite as root (CI does)"
    );
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the test directory");
    let vol = env.create("v.img", "16M", &[]);
    let audit = env.path("audit.jsonl");
    let mut args: Vec<String> = vec![
        "--socket-mode".into(),
        "0666".into(),
        "--audit-log".into(),
        s(&audit).into(),
    ];
    let mut volumes = Vec::new();
    match config {
        Some(text) => {
            let w = env.create("w.img", "16M", &[]);
            let text = text.replace("@V@", s(&vol)).replace("@W@", s(&w));
            let cfg = env.path("c.toml");
            std::fs::write(&cfg, text).expect("write config");
            args.push("--config".into());
            args.push(s(&cfg).into());
        }
        None => volumes.push(format!("v={}", vol.display())),
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let volumes: Vec<&str> = volumes.iter().map(String::as_str).collect();
    let srv = env.serve(&volumes, &args, false);
    Setup {
        _env: env,
        srv,
        audit,
    }
}

/// The audit log's `open-export` records.
fn refusals(audit: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("audit line is JSON"))
        .filter(|v| v["operation"] == "open-export")
        .collect()
}

fn nbdinfo_size(uid: u32, gid: u32, uri: &str) -> Output {
    require("nbdinfo");
    run(as_ids(uid, gid, &[], "nbdinfo").args(["--size", uri]))
}

#[test]
fn unprivileged_uid_is_refused_by_default_on_unix_socket() {
    let t = setup(&[], None);
    let sock = &t.srv.sock;

    // It does not see the export, and opening it is a policy refusal, not "unknown".
    let out = raw_client(NOBODY, NOBODY, sock, "list_go", "v");
    assert!(out.contains("list: \n"), "{out}");
    assert!(
        out.contains("go v: error 0x80000002 access to export \"v\" is not permitted"),
        "{out}"
    );
    // The old-style EXPORT_NAME cannot carry an error: the connection is closed.
    let out = raw_client(NOBODY, NOBODY, sock, "export_name", "v");
    assert!(out.contains("export_name v: closed"), "{out}");
    // A real client fails too, and its listing is empty.
    let out = nbdinfo_size(NOBODY, NOBODY, &t.srv.uri("v"));
    assert!(!out.status.success(), "{}", text(&out));
    let out = run_ok(as_ids(NOBODY, NOBODY, &[], "nbdinfo").args(["--list", &t.srv.uri("")]));
    assert!(!out.contains("export=\"v\""), "{out}");

    // The daemon's own user (root here) is let in.
    let out = run_ok(Command::new("nbdinfo").args(["--size", &t.srv.uri("v")]));
    assert_eq!(out.trim(), (16u64 << 20).to_string());

    // Each refused connection is one audit record per export: who, which, where, why.
    let recs = refusals(&t.audit);
    assert_eq!(recs.len(), 3, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["result"], "denied");
    assert_eq!(r["export"], "v");
    assert_eq!(r["peer_uid"], NOBODY);
    assert_eq!(r["peer_gid"], NOBODY);
    assert!(r["peer_pid"].as_i64().is_some_and(|p| p > 0), "{r}");
    assert_eq!(r["listener"], format!("unix://{}", sock.display()));
    assert_eq!(r["uid"], 0, "the daemon's own uid");
    let reason = r["reason"].as_str().expect("reason");
    assert!(
        reason.contains("uid 65534") && reason.contains("allow_uid"),
        "{reason}"
    );
    // And a warning in the server's log.
    let log = t.srv.log_text();
    assert!(
        log.contains("refused: the client may not open this export"),
        "{log}"
    );
    assert!(log.contains("uid 65534"), "{log}");
}

#[test]
fn a_client_probing_a_refused_export_is_disconnected() {
    let t = setup(&[], None);
    let out = raw_client(NOBODY, NOBODY, &t.srv.sock, "probe", "v");
    assert!(out.contains("probe: closed after 16 refusals"), "{out}");
    // One record for the connection, not one per attempt.
    assert_eq!(refusals(&t.audit).len(), 1);
}

#[test]
fn allow_uid_lets_that_user_read_the_export() {
    let t = setup(&["--allow-uid", "nobody"], None);
    qemu_io(&t.srv.uri("v"), &["write -P 0x5a 64k 64k"]);
    let out = raw_client(NOBODY, NOBODY, &t.srv.sock, "list_go", "v");
    assert!(
        out.contains("list: v\n") && out.contains("go v: ok"),
        "{out}"
    );
    require("qemu-io");
    let out = run(as_ids(NOBODY, NOBODY, &[], "qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0x5a 64k 64k",
        &t.srv.uri("v"),
    ]));
    let txt = text(&out);
    assert!(
        out.status.success() && !txt.contains("Pattern verification failed"),
        "{txt}"
    );
    // Another unprivileged user is still refused.
    let out = nbdinfo_size(OTHER, OTHER, &t.srv.uri("v"));
    assert!(!out.status.success(), "{}", text(&out));
    let recs = refusals(&t.audit);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["peer_uid"], OTHER);
}

#[test]
fn allow_gid_matches_the_primary_group_only() {
    let t = setup(&["--allow-gid", &NOBODY.to_string()], None);
    let uri = t.srv.uri("v");
    // Primary group 65534: allowed, whatever the uid.
    let out = nbdinfo_size(OTHER, NOBODY, &uri);
    assert!(out.status.success(), "{}", text(&out));
    // 65534 only as a supplementary group: SO_PEERCRED does not show it, so refused.
    require("nbdinfo");
    let out = run(as_ids(OTHER, OTHER, &[NOBODY], "nbdinfo").args(["--size", &uri]));
    assert!(!out.status.success(), "{}", text(&out));
    let recs = refusals(&t.audit);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["peer_uid"], OTHER);
    assert_eq!(recs[0]["peer_gid"], OTHER);
}

#[test]
fn plaintext_tcp_client_is_refused_without_allow_anyone() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let t = setup(&["--tcp", &addr], None);
    // Even root: a TCP client has no identity.
    let out = run(Command::new("nbdinfo").args(["--size", &format!("nbd://{addr}/v")]));
    assert!(!out.status.success(), "{}", text(&out));
    let out = run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://{addr}")]));
    assert!(!out.contains("export=\"v\""), "{out}");
    let recs = refusals(&t.audit);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert!(
        r["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{r}"
    );
    assert_eq!(r["listener"], format!("tcp://{addr}"));
    assert!(r.get("peer_uid").is_none(), "{r}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|m| m.contains("allow_anyone")),
        "{r}"
    );
    // The Unix socket still serves the daemon's user.
    let out = run_ok(Command::new("nbdinfo").args(["--size", &t.srv.uri("v")]));
    assert_eq!(out.trim(), (16u64 << 20).to_string());
}

#[test]
fn config_file_exports_have_their_own_allow_lists() {
    let cfg = "\
[[export]]
name = \"shared\"
path = \"@V@\"
allow_uid = [\"nobody\"]

[[export]]
name = \"private\"
path = \"@W@\"
";
    let t = setup(&[], Some(cfg));
    let out = raw_client(NOBODY, NOBODY, &t.srv.sock, "list_go", "private");
    assert!(out.contains("list: shared\n"), "{out}");
    assert!(out.contains("go private: error 0x80000002"), "{out}");
    let out = nbdinfo_size(NOBODY, NOBODY, &t.srv.uri("shared"));
    assert!(out.status.success(), "{}", text(&out));
    // Root (the daemon's user) sees both.
    let out = run_ok(Command::new("nbdinfo").args(["--list", &t.srv.uri("")]));
    assert!(
        out.contains("export=\"shared\"") && out.contains("export=\"private\""),
        "{out}"
    );
    let recs = refusals(&t.audit);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["export"], "private");
}
