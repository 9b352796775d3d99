//! systemd integration: the unit files (systemd-analyze), socket activation through
//! systemd-socket-activate, sd_notify readiness, `serve --config`, and the attach/detach
//! scripts (their error paths and, with a stand-in nbd-client, the whole flow: the kernel nbd
//! driver is not available in this environment).

mod common;

use std::io::ErrorKind;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port, require, run, run_ok, Env};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn units_dir() -> PathBuf {
    repo().join("systemd")
}

fn script(name: &str) -> PathBuf {
    repo().join("scripts").join(name)
}

fn wait_exit(child: &mut Child, secs: u64) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {secs} s", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
}

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Kills the child on drop (a failing assertion must not leave servers behind).
struct Guard(Option<Child>);

impl Guard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Unit files

/// Copies the units to `dir`, pointing ExecStart/ExecStop at this build and this checkout
/// (systemd-analyze verify requires the executables to exist).
fn install_units_for_verify(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for name in [
        "cryptvol.service",
        "cryptvol.socket",
        "cryptvol-attach@.service",
    ] {
        let text = std::fs::read_to_string(units_dir().join(name)).expect("read unit");
        let text = text
            .replace("/usr/local/bin/cryptvol", &bin().display().to_string())
            .replace(
                "/usr/local/lib/cryptvol/",
                &format!("{}/", repo().join("scripts").display()),
            );
        assert!(
            !text.contains("/usr/local/"),
            "unsubstituted path in {name}"
        );
        std::fs::write(dir.join(name), &text).expect("write unit");
        out.push(dir.join(name));
    }
    // A template is verified through an instance.
    let inst = dir.join("cryptvol-attach@data.service");
    std::fs::copy(dir.join("cryptvol-attach@.service"), &inst).expect("instance");
    out.push(inst);
    out
}

/// Runs `systemd-analyze verify`; returns (success, diagnostics about our units).
fn verify(dir: &Path, units: &[PathBuf]) -> (bool, Vec<String>) {
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .env("SYSTEMD_LOG_LEVEL", "info"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir_s = dir.display().to_string();
    let ours: Vec<String> = text
        .lines()
        .filter(|l| l.contains(&dir_s) || l.contains("cryptvol"))
        .map(str::to_string)
        .collect();
    (out.status.success(), ours)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require("systemd-analyze");
    let tmp = tempfile::tempdir().expect("tempdir");
    let units = install_units_for_verify(tmp.path());
    let (ok, diags) = verify(tmp.path(), &units);
    assert!(ok && diags.is_empty(), "systemd-analyze verify: {diags:#?}");

    // The check can fail: an unknown directive and a missing executable are reported.
    let bad = tmp.path().join("cryptvol-bad.service");
    std::fs::write(
        &bad,
        "[Service]\nType=notify\nExecStart=/nonexistent/cryptvol serve\nProtectSystm=strict\n",
    )
    .expect("write");
    let (ok, diags) = verify(tmp.path(), std::slice::from_ref(&bad));
    assert!(!ok, "a missing executable must fail verification");
    assert!(
        diags.iter().any(|l| l.contains("ProtectSystm")),
        "unknown key not reported: {diags:#?}"
    );
}

fn unit_settings(name: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(units_dir().join(name)).expect("read unit");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn assert_has(settings: &[(String, String)], key: &str, value: &str) {
    assert!(
        settings.iter().any(|(k, v)| k == key && v == value),
        "missing {key}={value}; have {:?}",
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .collect::<Vec<_>>()
    );
}

#[test]
fn units_carry_the_required_settings() {
    let s = unit_settings("cryptvol.service");
    for (k, v) in [
        ("Type", "notify"),
        (
            "ExecStart",
            "/usr/local/bin/cryptvol serve --config /etc/cryptvol/cryptvol.toml",
        ),
        ("Restart", "on-failure"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/cryptvol /run/cryptvol"),
        ("RuntimeDirectory", "cryptvol"),
        ("RuntimeDirectoryPreserve", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("LimitCORE", "0"),
        ("MemoryDenyWriteExecute", "yes"),
        ("ProtectHome", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("UMask", "0077"),
        ("KillSignal", "SIGTERM"),
        ("After", "network.target cryptvol.socket"),
        ("Wants", "cryptvol.socket"),
    ] {
        assert_has(&s, k, v);
    }
    assert!(s.iter().any(|(k, _)| k == "LimitMEMLOCK"));
    assert!(s.iter().any(|(k, _)| k == "TimeoutStopSec"));

    let s = unit_settings("cryptvol.socket");
    assert_has(&s, "ListenStream", "/run/cryptvol/nbd.sock");
    // No TCP socket by default: any local account could reach it (issue 14, B1).
    let streams: Vec<&String> = s
        .iter()
        .filter(|(k, _)| k == "ListenStream")
        .map(|(_, v)| v)
        .collect();
    assert!(
        streams.iter().all(|v| v.starts_with('/')),
        "cryptvol.socket listens on TCP by default: {streams:?}"
    );
    assert_has(&s, "SocketMode", "0600");

    let s = unit_settings("cryptvol-attach@.service");
    for (k, v) in [
        ("Type", "oneshot"),
        ("RemainAfterExit", "yes"),
        ("Requires", "cryptvol.service"),
        ("EnvironmentFile", "-/etc/cryptvol/attach/%i.env"),
        ("ExecStart", "/usr/local/lib/cryptvol/attach.sh %I"),
        ("ExecStop", "/usr/local/lib/cryptvol/detach.sh %I"),
    ] {
        assert_has(&s, k, v);
    }
}

#[test]
fn service_hardening_exposure_is_low() {
    require("systemd-analyze");
    let tmp = tempfile::tempdir().expect("tempdir");
    install_units_for_verify(tmp.path());
    let out = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(tmp.path().join("cryptvol.service")),
    );
    let level: f64 = out
        .lines()
        .find_map(|l| l.split("exposure level for cryptvol.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    assert!(level <= 2.5, "exposure level {level} is too high:\n{out}");
}

// ---------------------------------------------------------------------------------------
// serve --config

fn write_config(env: &Env, body: &str) -> PathBuf {
    let p = env.path("cryptvol.toml");
    let text = format!("keystore = \"{}\"\n{body}", env.keystore().display());
    std::fs::write(&p, text).expect("write config");
    p
}

#[test]
fn config_unknown_key_is_an_error_naming_key_and_file() {
    let env = Env::new();
    let vol = env.create("v.img", "16M", &[]);
    let cfg = write_config(
        &env,
        &format!(
            "[[export]]\nname = \"v\"\npath = \"{}\"\nread_onyl = true\n",
            vol.display()
        ),
    );
    let out = run(env.cmd().arg("serve").arg("--config").arg(&cfg));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read_onyl"), "{err}");
    assert!(err.contains(&cfg.display().to_string()), "{err}");
}

#[test]
fn config_exports_and_cli_volumes_combine() {
    require("nbdinfo");
    let env = Env::new();
    let a = env.create("a.img", "16M", &[]);
    let b = env.create("b.img", "32M", &[]);
    let file_sock = env.path("from-file.sock");
    let cli_sock = env.path("from-cli.sock");
    let cfg = write_config(
        &env,
        &format!(
            "[listen]\nunix = [\"{}\"]\n[[export]]\nname = \"a\"\npath = \"{}\"\nread_only = true\n",
            file_sock.display(),
            a.display()
        ),
    );
    let log = env.path("serve.log");
    let mut g = Guard(Some(
        env.cmd()
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--unix")
            .arg(&cli_sock)
            .arg(format!("bee={}", b.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn"),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(&cli_sock).is_err() {
        if let Ok(Some(st)) = g.child().try_wait() {
            panic!("serve exited ({st}):\n{}", read_log(&log));
        }
        assert!(Instant::now() < deadline, "not ready:\n{}", read_log(&log));
        std::thread::sleep(Duration::from_millis(50));
    }
    // --unix replaced the file's listeners.
    assert!(!file_sock.exists(), "the config file's listener was opened");
    let list = run_ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix://?socket={}", cli_sock.display()),
    ]));
    assert!(list.contains("\"export-name\": \"a\""), "{list}");
    assert!(list.contains("\"export-name\": \"bee\""), "{list}");
    let ro = run_ok(Command::new("nbdinfo").args([
        "--json",
        &format!("nbd+unix:///a?socket={}", cli_sock.display()),
    ]));
    assert!(ro.contains("\"is_read_only\": true"), "{ro}");
    let size = run_ok(Command::new("nbdinfo").args([
        "--size",
        &format!("nbd+unix:///bee?socket={}", cli_sock.display()),
    ]));
    assert_eq!(size.trim(), (32u64 << 20).to_string());
    let mut child = g.0.take().expect("child");
    sigterm(&child);
    assert!(wait_exit(&mut child, 30).success(), "{}", read_log(&log));
}

// ---------------------------------------------------------------------------------------
// Socket activation

#[test]
fn socket_activation_serves_on_the_passed_unix_and_tcp_sockets() {
    require("systemd-socket-activate");
    require("nbdinfo");
    let env = Env::new();
    let vol = env.create("act.img", "16M", &[]);
    let configured = env.path("configured.sock");
    let cfg = write_config(
        &env,
        &format!(
            // allow_anyone: the TCP client below has no identity.
            "[listen]\nunix = [\"{}\"]\n[[export]]\nname = \"act\"\npath = \"{}\"\nallow_anyone = true\n",
            configured.display(),
            vol.display()
        ),
    );
    let sock = env.path("activated.sock");
    let port = free_port();
    let log = env.path("activate.log");
    let mut g = Guard(Some(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&sock)
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--fdname=nbd-unix:nbd-tcp")
            .arg("-E")
            .arg("RUST_LOG=info")
            .arg(bin())
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn systemd-socket-activate"),
    ));
    // systemd-socket-activate binds at once and starts cryptvol on the first connection;
    // that connection waits in the listen queue meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket:\n{}", read_log(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let size = run_ok(Command::new("timeout").args([
        "60",
        "nbdinfo",
        "--size",
        &format!("nbd+unix:///act?socket={}", sock.display()),
    ]));
    assert_eq!(size.trim(), (16u64 << 20).to_string());
    let size = run_ok(Command::new("timeout").args([
        "60",
        "nbdinfo",
        "--size",
        &format!("nbd://127.0.0.1:{port}/act"),
    ]));
    assert_eq!(size.trim(), (16u64 << 20).to_string());

    let text = read_log(&log);
    assert!(text.contains("\"nbd-unix\""), "{text}");
    assert!(text.contains("\"nbd-tcp\""), "{text}");
    assert!(
        !configured.exists(),
        "configured listener opened despite socket activation"
    );
    let mut child = g.0.take().expect("child");
    sigterm(&child);
    assert!(wait_exit(&mut child, 30).success(), "{}", read_log(&log));
    assert!(
        sock.exists(),
        "the daemon removed a socket file it does not own"
    );
}

#[test]
fn socket_activation_refuses_a_non_socket_descriptor() {
    let env = Env::new();
    let vol = env.create("n.img", "16M", &[]);
    // fd 3 is /dev/null; `timeout` ends the test should the descriptor be ignored.
    let out = run(Command::new("timeout")
        .args(["60", "sh", "-c"])
        .arg(
            "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" serve --unix \"$1\" \"$2\" 3</dev/null",
        )
        .arg(bin())
        .arg(env.path("n.sock"))
        .arg(&vol)
        .env("CRYPTVOL_KEYSTORE", env.keystore()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("inherited file descriptor 3") && err.contains("not a socket"),
        "{err}"
    );
}

#[test]
fn socket_activation_applies_the_loopback_rule() {
    require("systemd-socket-activate");
    let env = Env::new();
    let vol = env.create("r.img", "16M", &[]);
    let port = free_port();
    let log = env.path("remote.log");
    let mut g = Guard(Some(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(format!("0.0.0.0:{port}"))
            .arg("-E")
            .arg(format!("CRYPTVOL_KEYSTORE={}", env.keystore().display()))
            .arg(bin())
            .arg("serve")
            .arg(&vol)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn"),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "no socket:\n{}", read_log(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = wait_exit(g.child(), 60);
    assert!(!status.success());
    let text = read_log(&log);
    assert!(text.contains("not a loopback address"), "{text}");
}

// ---------------------------------------------------------------------------------------
// sd_notify

fn recv_msg(sock: &UnixDatagram, secs: u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 4096];
    loop {
        // A signal can interrupt the wait (EINTR): wait again for what is left.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("recv on the notify socket: {e} ({:?})", e.kind()),
        }
    }
}

fn notify_round_trip(env: &Env, rx: &UnixDatagram, notify_socket: &str) {
    let vol = env.create(&format!("n{}.img", rand_id()), "16M", &[]);
    let sock = env.path(&format!("notify-{}.sock", rand_id()));
    let log = env.path(&format!("notify-{}.log", rand_id()));
    let mut g = Guard(Some(
        env.cmd()
            .arg("serve")
            .arg("--unix")
            .arg(&sock)
            .arg(format!("vol={}", vol.display()))
            .env("NOTIFY_SOCKET", notify_socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn"),
    ));
    let ready = recv_msg(rx, 60).unwrap_or_else(|| panic!("no READY=1:\n{}", read_log(&log)));
    // Ready means ready: the listener accepts at once, without retrying.
    let conn = UnixStream::connect(&sock);
    assert!(
        conn.is_ok(),
        "READY=1 before the listener accepts: {conn:?}"
    );
    drop(conn);
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    assert!(lines.contains(&"STATUS=serving 1 export"), "{ready:?}");
    if which("nbdinfo") {
        let size = run_ok(Command::new("nbdinfo").args([
            "--size",
            &format!("nbd+unix:///vol?socket={}", sock.display()),
        ]));
        assert_eq!(size.trim(), (16u64 << 20).to_string());
    }
    let mut child = g.0.take().expect("child");
    sigterm(&child);
    let stopping = recv_msg(rx, 30).expect("no STOPPING=1 after SIGTERM");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(wait_exit(&mut child, 30).success(), "{}", read_log(&log));
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn rand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
fn notify_ready_after_listen_and_stopping_on_sigterm() {
    let env = Env::new();
    let path = env.path("notify.dgram");
    let rx = UnixDatagram::bind(&path).expect("bind notify socket");
    notify_round_trip(&env, &rx, &path.display().to_string());
}

#[test]
fn notify_to_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt as _;
    let env = Env::new();
    let name = format!("cryptvol-test-notify-{}", rand_id());
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
    let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
    notify_round_trip(&env, &rx, &format!("@{name}"));
}

#[test]
fn no_ready_when_a_volume_cannot_be_unlocked() {
    let env = Env::new();
    let vol = env.create("locked.img", "16M", &[]);
    let path = env.path("notify.dgram");
    let rx = UnixDatagram::bind(&path).expect("bind");
    let out = run(Command::new(bin())
        .arg("serve")
        .arg("--unix")
        .arg(env.path("l.sock"))
        .arg(&vol)
        .env("CRYPTVOL_KEYSTORE", env.path("empty-keystore"))
        .env("NOTIFY_SOCKET", &path));
    assert!(!out.status.success());
    rx.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    match rx.recv(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("unexpected notification after a failed start: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// attach.sh / detach.sh

fn shells() -> Vec<Vec<String>> {
    // The scripts are POSIX sh: run them under dash/bash (sh) and busybox.
    let mut v = vec![vec!["sh".to_string()]];
    require("busybox");
    v.push(vec!["busybox".to_string(), "sh".to_string()]);
    v
}

fn sh_cmd(shell: &[String], script_name: &str) -> Command {
    let mut c = Command::new(&shell[0]);
    c.args(&shell[1..]).arg(script(script_name));
    c
}

#[test]
fn scripts_help_and_usage_errors() {
    for shell in shells() {
        for name in ["attach.sh", "detach.sh"] {
            let out = run(sh_cmd(&shell, name).arg("--help"));
            assert!(out.status.success(), "{name} --help under {shell:?}");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.starts_with("Usage: "), "{text}");

            let out = run(&mut sh_cmd(&shell, name));
            assert_eq!(out.status.code(), Some(2), "{name} without args");
            assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));

            let out = run(sh_cmd(&shell, name).args(["x", "--frobnicate"]));
            assert_eq!(out.status.code(), Some(2));
            assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option --frobnicate"));
        }
        for bad in [
            &["d", "--block-size", "3000"][..],
            &["d", "--connections", "0"],
            &["d", "--timeout", "soon"],
            &["d", "--device", "/dev/sda"],
            &["d", "--port", "70000", "--host", "h"],
            &["d", "--port"],
            &["d", "e"],
        ] {
            let out = run(sh_cmd(&shell, "attach.sh").args(bad));
            assert_eq!(out.status.code(), Some(2), "attach.sh {bad:?}");
        }
        let out = run(sh_cmd(&shell, "detach.sh").arg("/dev/sda"));
        assert_eq!(out.status.code(), Some(2));
    }
}

/// A fake sysfs with nbd0 busy (size), nbd1 busy (pid), nbd2 and nbd3 free, and a
/// stand-in nbd-client that records its arguments and sets the device size.
struct FakeKernel {
    dir: tempfile::TempDir,
}

impl FakeKernel {
    fn new(with_module: bool) -> FakeKernel {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys");
        if with_module {
            std::fs::create_dir_all(sys.join("module/nbd")).expect("mkdir");
            for (i, size, pid) in [
                (0, "2048", false),
                (1, "0", true),
                (2, "0", false),
                (3, "0", false),
            ] {
                let d = sys.join(format!("block/nbd{i}"));
                std::fs::create_dir_all(&d).expect("mkdir");
                std::fs::write(d.join("size"), format!("{size}\n")).expect("size");
                if pid {
                    std::fs::write(d.join("pid"), "4242\n").expect("pid");
                }
            }
        } else {
            std::fs::create_dir_all(&sys).expect("mkdir");
        }
        let client = dir.path().join("nbd-client");
        std::fs::write(
            &client,
            r#"#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_LOG"
for a in "$@"; do case "$a" in /dev/nbd*) dev=${a#/dev/} ;; esac; done
if [ "$1" = -d ]; then echo 0 > "$CRYPTVOL_SYSFS/block/$dev/size"
else echo 32768 > "$CRYPTVOL_SYSFS/block/$dev/size"; fi
"#,
        )
        .expect("write fake nbd-client");
        run_ok(Command::new("chmod").arg("+x").arg(&client));
        FakeKernel { dir }
    }
    fn apply(&self, c: &mut Command) {
        let d = self.dir.path();
        c.env("CRYPTVOL_SYSFS", d.join("sys"))
            .env("CRYPTVOL_NBD_CLIENT", d.join("nbd-client"))
            .env("CRYPTVOL_MODPROBE", "false")
            .env("CRYPTVOL_ATTACH_STATE_DIR", d.join("state"))
            .env("FAKE_LOG", d.join("calls.log"));
    }
    fn calls(&self) -> String {
        read_log(&self.dir.path().join("calls.log"))
    }
    fn size(&self, dev: &str) -> String {
        read_log(&self.dir.path().join(format!("sys/block/{dev}/size")))
            .trim()
            .to_string()
    }
    fn link(&self, export: &str) -> PathBuf {
        self.dir.path().join("state").join(export)
    }
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn attach_reports_unreachable_daemon_missing_export_and_missing_driver() {
    require("nbdinfo");
    let env = Env::new();
    let vol = env.create("data.img", "16M", &[]);
    let server = env.serve(&[&format!("data={}", vol.display())], &[], true);
    let sock = server.sock.display().to_string();
    for shell in shells() {
        let fake = FakeKernel::new(false);

        let mut c = sh_cmd(&shell, "attach.sh");
        c.args(["data", "--unix"]).arg(env.path("nobody.sock"));
        fake.apply(&mut c);
        let out = run(&mut c);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr_of(&out).contains("cannot reach the cryptvol daemon"),
            "{}",
            stderr_of(&out)
        );

        let mut c = sh_cmd(&shell, "attach.sh");
        c.args(["nope", "--unix", &sock]);
        fake.apply(&mut c);
        let out = run(&mut c);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr_of(&out);
        assert!(
            err.contains("export \"nope\" does not exist") && err.contains("available: data"),
            "{err}"
        );

        // Reachable and existing, but no nbd driver (empty sysfs, modprobe fails).
        let mut c = sh_cmd(&shell, "attach.sh");
        c.args(["data", "--host", "127.0.0.1", "--port"])
            .arg(server.port.expect("tcp").to_string());
        fake.apply(&mut c);
        let out = run(&mut c);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr_of(&out).contains(
                "this kernel has no nbd driver: use nbdfuse + losetup (see docs/attach.md)"
            ),
            "{}",
            stderr_of(&out)
        );
        assert!(fake.calls().is_empty(), "nbd-client ran: {}", fake.calls());
    }
    server.stop();
}

#[test]
fn attach_and_detach_flow_with_a_stand_in_nbd_client() {
    require("nbdinfo");
    let env = Env::new();
    let vol = env.create("data.img", "16M", &[]);
    let small = env.create("small.img", "16M", &["--sector-size", "512"]);
    let server = env.serve(
        &[
            &format!("data={}", vol.display()),
            &format!("small={}", small.display()),
        ],
        &[],
        false,
    );
    let sock = server.sock.display().to_string();
    for shell in shells() {
        let fake = FakeKernel::new(true);
        let mut c = sh_cmd(&shell, "attach.sh");
        c.args([
            "data",
            "--unix",
            &sock,
            "--connections",
            "2",
            "--timeout",
            "30",
            "--read-only",
        ]);
        fake.apply(&mut c);
        let out = run(&mut c);
        assert!(out.status.success(), "attach failed: {}", stderr_of(&out));
        // nbd0 has a size and nbd1 a pid: the first free device is nbd2.
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/dev/nbd2");
        // The block size defaults to the export's preferred size (its 4096-byte sectors).
        assert_eq!(
            fake.calls().trim(),
            format!("-u {sock} /dev/nbd2 -N data -b 4096 -C 2 -t 30 -R")
        );
        assert_eq!(
            std::fs::read_link(fake.link("data")).expect("state link"),
            PathBuf::from("/dev/nbd2")
        );

        // A second attach of the same export is refused.
        let mut c = sh_cmd(&shell, "attach.sh");
        c.args(["data", "--unix", &sock]);
        fake.apply(&mut c);
        let out = run(&mut c);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr_of(&out).contains("already attached at /dev/nbd2"),
            "{}",
            stderr_of(&out)
        );

        // A 512-byte-sector export gets -b 512, on the next free device, configured by env.
        let mut c = sh_cmd(&shell, "attach.sh");
        c.arg("small").env("CRYPTVOL_SOCKET", &sock);
        fake.apply(&mut c);
        let out = run(&mut c);
        assert!(out.status.success(), "attach failed: {}", stderr_of(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "/dev/nbd3");
        assert!(
            fake.calls()
                .contains(&format!("-u {sock} /dev/nbd3 -N small -b 512\n")),
            "{}",
            fake.calls()
        );

        // Detach by export name and by device.
        let mut c = sh_cmd(&shell, "detach.sh");
        c.arg("data");
        fake.apply(&mut c);
        let out = run(&mut c);
        assert!(out.status.success(), "detach failed: {}", stderr_of(&out));
        assert_eq!(fake.size("nbd2"), "0");
        assert!(
            fake.link("data").symlink_metadata().is_err(),
            "state link left behind"
        );
        let mut c = sh_cmd(&shell, "detach.sh");
        c.arg("/dev/nbd3");
        fake.apply(&mut c);
        let out = run(&mut c);
        assert!(out.status.success(), "detach failed: {}", stderr_of(&out));
        assert!(fake.link("small").symlink_metadata().is_err());
        assert!(fake.calls().contains("-d /dev/nbd2\n") && fake.calls().contains("-d /dev/nbd3\n"));

        // Detaching again: nothing to do, success; an unknown export: a clear error.
        let mut c = sh_cmd(&shell, "detach.sh");
        c.arg("/dev/nbd3");
        fake.apply(&mut c);
        let out = run(&mut c);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("not attached"));
        let mut c = sh_cmd(&shell, "detach.sh");
        c.arg("data");
        fake.apply(&mut c);
        let out = run(&mut c);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr_of(&out).contains("export \"data\" is not attached"));
    }
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Watchdog keep-alives (the sd_notify stand-in; scripts/systemd-test.sh checks the
// restart under a real systemd)

/// `WATCHDOG=1` datagrams received within `secs` (other notifications are skipped).
fn next_keepalive(rx: &UnixDatagram, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match rx.recv(&mut buf) {
            Ok(n) if buf[..n].split(|&b| b == b'\n').any(|l| l == b"WATCHDOG=1") => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv on the notify socket: {e} ({:?})", e.kind()),
        }
    }
    false
}

/// Waits until process `pid` is in state `want` ('T': stopped) per /proc/PID/stat.
fn wait_proc_state(pid: u32, want: char) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
        if state == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never in state {want}: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_with_watchdog(env: &Env, notify: &Path, usec: &str, pid: Option<&str>) -> Guard {
    let vol = env.create(&format!("w{}.img", rand_id()), "16M", &[]);
    let mut c = env.cmd();
    c.arg("serve")
        .arg("--unix")
        .arg(env.path(&format!("w-{}.sock", rand_id())))
        .arg(format!("vol={}", vol.display()))
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", usec)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.path(&format!("w-{}.log", rand_id()))).expect("log"));
    if let Some(p) = pid {
        c.env("WATCHDOG_PID", p);
    }
    Guard(Some(c.spawn().expect("spawn")))
}

#[test]
fn watchdog_keepalives_arrive_and_stop_while_the_daemon_is_stopped() {
    let env = Env::new();
    let path = env.path("notify.dgram");
    let rx = UnixDatagram::bind(&path).expect("bind notify socket");
    // WatchdogSec=0.4s: a keep-alive every 200 ms.
    let mut g = serve_with_watchdog(&env, &path, "400000", None);
    let ready = recv_msg(&rx, 60).expect("no READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    for _ in 0..3 {
        assert!(
            next_keepalive(&rx, 30),
            "no WATCHDOG=1 from a healthy daemon"
        );
    }
    let pid = g.child().id();
    run_ok(Command::new("kill").args(["-STOP", &pid.to_string()]));
    wait_proc_state(pid, 'T');
    // Drop what was queued before the stop; then nothing for 10 intervals.
    rx.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    while rx.recv(&mut buf).is_ok() {}
    rx.set_nonblocking(false).expect("blocking");
    assert!(!next_keepalive(&rx, 2), "WATCHDOG=1 from a stopped daemon");
    run_ok(Command::new("kill").args(["-CONT", &pid.to_string()]));
    assert!(next_keepalive(&rx, 30), "no WATCHDOG=1 after SIGCONT");
    sigterm(g.child());
    assert!(wait_exit(g.child(), 30).success());
}

#[test]
fn no_keepalives_when_the_watchdog_is_meant_for_another_process() {
    let env = Env::new();
    let path = env.path("notify.dgram");
    let rx = UnixDatagram::bind(&path).expect("bind notify socket");
    // PID 1 is never the daemon.
    let mut g = serve_with_watchdog(&env, &path, "400000", Some("1"));
    let ready = recv_msg(&rx, 60).expect("no READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        !next_keepalive(&rx, 2),
        "WATCHDOG=1 although WATCHDOG_PID names another process"
    );
    sigterm(g.child());
    assert!(wait_exit(g.child(), 30).success());
}
