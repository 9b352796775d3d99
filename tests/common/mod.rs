//! Shared harness for integration tests: temporary keystores and volumes, a real
//! `cryptvol serve` process, and the real NBD peers (nbdkit, libnbd tools, qemu, fio).
//! A missing peer is a test failure, never a skip: run scripts/install-deps.sh.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The cryptvol binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cryptvol"))
}

/// Panics (fails the test) when a peer program is missing.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "required peer `{tool}` is not installed; run scripts/install-deps.sh (as root)");
}

/// Runs a command, asserting success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its full output without asserting.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A scratch directory with its own keystore.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env { dir: tempfile::Builder::new().prefix("cryptvol-it-").tempdir().expect("tempdir") }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn keystore(&self) -> PathBuf {
        self.path("keys")
    }
    /// `cryptvol <args>` with this env's keystore.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("CRYPTVOL_KEYSTORE", self.keystore()).env("RUST_LOG", "info");
        c
    }
    /// Creates a volume with the default local key.
    pub fn create(&self, name: &str, size: &str, extra: &[&str]) -> PathBuf {
        let p = self.path(name);
        let mut c = self.cmd();
        c.arg("create").args(["--size", size]).args(extra).arg(&p);
        run_ok(&mut c);
        p
    }
    /// Starts `cryptvol serve` on a Unix socket (and a TCP port when `tcp`), waits until it accepts.
    pub fn serve(&self, volumes: &[&str], extra: &[&str], tcp: bool) -> Server {
        let sock = self.path(&format!("nbd-{}.sock", rand_suffix()));
        let port = if tcp { Some(free_port()) } else { None };
        let log = self.path(&format!("serve-{}.log", rand_suffix()));
        let mut c = self.cmd();
        c.arg("serve").arg("--unix").arg(&sock);
        if let Some(p) = port {
            c.args(["--tcp", &format!("127.0.0.1:{p}")]);
        }
        c.args(extra).args(volumes);
        let logf = std::fs::File::create(&log).expect("log file");
        c.stdout(Stdio::null()).stderr(logf);
        let child = c.spawn().expect("spawn cryptvol serve");
        let mut s = Server { child: Some(child), sock, port, log };
        s.wait_ready();
        s
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A running `cryptvol serve`; killed on drop.
pub struct Server {
    child: Option<Child>,
    pub sock: PathBuf,
    pub port: Option<u16>,
    pub log: PathBuf,
}

impl Server {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("cryptvol serve exited early ({status}):\n{}", self.log_text());
                }
            }
            let unix_ok = std::os::unix::net::UnixStream::connect(&self.sock).is_ok();
            let tcp_ok = self.port.map(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok()).unwrap_or(true);
            if unix_ok && tcp_ok {
                return;
            }
            assert!(Instant::now() < deadline, "cryptvol serve did not become ready:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// `nbd+unix:///EXPORT?socket=...`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port.expect("server has no TCP listener"))
    }
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("server running")
    }
    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
    /// Sends SIGTERM and waits; asserts a clean exit.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("server running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.log_text();
                assert!(status.success(), "cryptvol serve exited with {status} after SIGTERM:\n{log}");
                return log;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("cryptvol serve did not stop within 30 s of SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), for test images.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads a whole file.
pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Runs a Python snippet under nbdsh (python3-libnbd); `h` is a connected handle when `uri` is given.
pub fn nbdsh(uri: &str, script: &str) -> Output {
    require("nbdsh");
    run(Command::new("nbdsh").args(["-u", uri, "-c", script]))
}
