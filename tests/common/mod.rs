//! Shared harness for integration tests: temporary keystores and volumes, a real
//! `cryptvol serve` process, and the real NBD peers (nbdkit, libnbd tools, qemu, fio).
//! A missing peer is a test failure, never a skip: run scripts/install-deps.sh.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The cryptvol binary under test: `$CRYPTVOL_BIN` when set (scripts/test.sh points it
/// at the release build, so the tests exercise what ships while the test code itself is
/// built quickly in debug), else the binary cargo built with the tests.
pub fn bin() -> PathBuf {
    match std::env::var_os("CRYPTVOL_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_cryptvol")),
    }
}

/// Panics (fails the test) when a peer program is missing.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "required peer `{tool}` is not installed; run scripts/install-deps.sh (as root)"
    );
}

/// Runs a command, asserting success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
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
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
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
        Env {
            dir: tempfile::Builder::new()
                .prefix("cryptvol-it-")
                .tempdir()
                .expect("tempdir"),
        }
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
        c.env("CRYPTVOL_KEYSTORE", self.keystore())
            .env("RUST_LOG", "info");
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
        self.serve_on(&sock, volumes, extra, tcp)
    }
    /// Like [`Env::serve`], on a given Unix socket path.
    pub fn serve_on(&self, sock: &Path, volumes: &[&str], extra: &[&str], tcp: bool) -> Server {
        self.serve_env(sock, volumes, extra, tcp, &[])
    }
    /// Like [`Env::serve_on`], with extra environment variables for the server.
    pub fn serve_env(
        &self,
        sock: &Path,
        volumes: &[&str],
        extra: &[&str],
        tcp: bool,
        envs: &[(&str, &str)],
    ) -> Server {
        // Plaintext TCP clients have no identity: the exports must admit anyone.
        self.spawn_server(sock, volumes, extra, tcp, tcp, envs)
            .ready()
    }
    /// Like [`Env::serve`] with a TCP listener, but the exports keep the access policy
    /// `extra` gives them (no `--allow-anyone`): for TLS clients identified by their
    /// certificates.
    pub fn serve_tcp_policy(&self, volumes: &[&str], extra: &[&str]) -> Server {
        let sock = self.path(&format!("nbd-{}.sock", rand_suffix()));
        self.spawn_server(&sock, volumes, extra, true, false, &[])
            .ready()
    }
    /// Starts `cryptvol serve` on a Unix socket without waiting for it to be ready (for
    /// tests of start-up itself).
    pub fn serve_starting(&self, volumes: &[&str]) -> Server {
        let sock = self.path(&format!("nbd-{}.sock", rand_suffix()));
        self.spawn_server(&sock, volumes, &[], false, false, &[])
    }
    fn spawn_server(
        &self,
        sock: &Path,
        volumes: &[&str],
        extra: &[&str],
        tcp: bool,
        allow_anyone: bool,
        envs: &[(&str, &str)],
    ) -> Server {
        let sock = sock.to_path_buf();
        let port = if tcp { Some(free_port()) } else { None };
        let log = self.path(&format!("serve-{}.log", rand_suffix()));
        let mut c = self.cmd();
        c.arg("serve").arg("--unix").arg(&sock);
        if let Some(p) = port {
            c.args(["--tcp", &format!("127.0.0.1:{p}")]);
        }
        if allow_anyone {
            c.arg("--allow-anyone");
        }
        c.args(extra).args(volumes);
        c.envs(envs.iter().copied());
        let logf = std::fs::File::create(&log).expect("log file");
        c.stdout(Stdio::null()).stderr(logf);
        let child = c.spawn().expect("spawn cryptvol serve");
        Server {
            child: Some(child),
            sock,
            port,
            log,
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running `cryptvol serve`; killed on drop.
pub struct Server {
    child: Option<Child>,
    pub sock: PathBuf,
    pub port: Option<u16>,
    pub log: PathBuf,
}

impl Server {
    /// This server once it accepts connections (see [`Server::wait_ready`]).
    fn ready(mut self) -> Server {
        self.wait_ready();
        self
    }
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "cryptvol serve exited early ({status}):\n{}",
                        self.log_text()
                    );
                }
            }
            let unix_ok = std::os::unix::net::UnixStream::connect(&self.sock).is_ok();
            let tcp_ok = self
                .port
                .map(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
                .unwrap_or(true);
            if unix_ok && tcp_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cryptvol serve did not become ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// `nbd+unix:///EXPORT?socket=...`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
    pub fn tcp_uri(&self, export: &str) -> String {
        format!(
            "nbd://127.0.0.1:{}/{export}",
            self.port.expect("server has no TCP listener")
        )
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
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.log_text();
                assert!(
                    status.success(),
                    "cryptvol serve exited with {status} after SIGTERM:\n{log}"
                );
                return log;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "cryptvol serve did not stop within 30 s of SIGTERM:\n{}",
                    self.log_text()
                );
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
/// nbdsh runs `python3 -m nbd` from PATH; /usr/bin comes first so that the distribution's
/// Python (which has the bindings) is used even when a pyenv/venv python3 shadows it.
pub fn nbdsh(uri: &str, script: &str) -> Output {
    require("nbdsh");
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("nbdsh")
        .env("PATH", path)
        .args(["-u", uri, "-c", script]))
}

// ---------------------------------------------------------------------------------------------
// Helpers added for the peer, error, abuse and filesystem tests.

/// A path as `&str` (test paths are always UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The directory holding helper scripts (tests/nbdsh).
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("nbdsh")
}

/// Fails the test when the Python libnbd bindings are missing.
pub fn require_python_nbd() {
    require("nbdsh");
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3-libnbd is not installed for /usr/bin/python3; run scripts/install-deps.sh"
    );
}

/// Runs `tests/nbdsh/semantics.py CHECK ARGS...` and asserts it passed.
pub fn semantics(check: &str, args: &[&str]) {
    require_python_nbd();
    let out = run(Command::new("/usr/bin/python3")
        .arg(scripts_dir().join("semantics.py"))
        .arg(check)
        .args(args));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("OK {check}")),
        "libnbd check `{check}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cryptvol info --json FILE` parsed.
pub fn info_json(env: &Env, file: &Path) -> serde_json::Value {
    let out = run_ok(env.cmd().args(["info", "--json"]).arg(file));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("info --json is not JSON ({e}):\n{out}"))
}

/// `qemu-io -f raw URI -c CMD...`; asserts success and no pattern mismatch; returns stdout+stderr.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    require("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed:"),
        "qemu-io {cmds:?} on {uri} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Reads `len` bytes of a file at `offset`.
pub fn read_at(p: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", p.display()));
    buf
}

impl Server {
    /// Sends a signal (e.g. "KILL", "INT") without waiting.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid();
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status();
    }
    /// Waits for the process to exit (after a signal); returns its status.
    pub fn wait_exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "cryptvol serve did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Sends SIGTERM without waiting.
    pub fn term(&self) {
        let pid = self.pid();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

/// NBD protocol constants (from the specification), for the raw-socket tests.
pub mod proto {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_BLOCK_SIZE: u16 = 3;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_FLAG_FUA: u16 = 1;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const EPERM: u32 = 1;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const ESHUTDOWN: u32 = 108;
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A hand-driven NBD client over a Unix socket, for protocol edge cases and abuse.
pub struct Raw {
    pub s: std::os::unix::net::UnixStream,
}

impl Raw {
    /// Connects with 60 s read/write timeouts: a stuck server fails the test, never hangs
    /// it (generous because a debug server on a loaded 2-core machine can stall for
    /// seconds; the timeouts are a safety net, nothing waits for them to expire).
    pub fn connect(server: &Server) -> Raw {
        let s = std::os::unix::net::UnixStream::connect(&server.sock)
            .expect("connect to the server socket");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Raw { s }
    }
    pub fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.s.write_all(b)
    }
    pub fn recv(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }
    /// Reads the 18-byte greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let g = self.recv(18).expect("server greeting");
        assert_eq!(be64(&g[0..8]), proto::NBDMAGIC, "bad NBDMAGIC");
        assert_eq!(be64(&g[8..16]), proto::IHAVEOPT, "bad IHAVEOPT");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert!(
            flags & proto::FLAG_FIXED_NEWSTYLE != 0,
            "server is not fixed-newstyle"
        );
        flags
    }
    /// Greeting + client flags (fixed newstyle and no-zeroes).
    pub fn start(server: &Server) -> Raw {
        let mut r = Raw::connect(server);
        let f = r.greeting();
        let cf = u32::from(f & (proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES));
        r.send(&cf.to_be_bytes()).expect("send client flags");
        r
    }
    pub fn option(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(
            &u32::try_from(data.len())
                .expect("option length")
                .to_be_bytes(),
        );
        b.extend_from_slice(data);
        self.send(&b)
    }
    pub fn opt_reply(&mut self) -> std::io::Result<OptReply> {
        let h = self.recv(20)?;
        assert_eq!(be64(&h[0..8]), proto::REPLY_MAGIC, "bad option reply magic");
        let option = be32(&h[8..12]);
        let kind = be32(&h[12..16]);
        let len = be32(&h[16..20]);
        assert!(len < 65536, "option reply of {len} bytes");
        let data = self.recv(len as usize)?;
        Ok(OptReply { option, kind, data })
    }
    /// NBD_OPT_GO; returns (size, transmission flags, infos) or the error reply.
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), OptReply> {
        let mut d = Vec::new();
        d.extend_from_slice(&u32::try_from(name.len()).expect("name").to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        self.option(proto::OPT_GO, &d).expect("send OPT_GO");
        let mut export = None;
        loop {
            let r = self.opt_reply().expect("OPT_GO reply");
            assert_eq!(r.option, proto::OPT_GO, "reply does not echo the option");
            match r.kind {
                proto::REP_INFO => {
                    assert!(r.data.len() >= 2, "short NBD_REP_INFO");
                    if u16::from_be_bytes([r.data[0], r.data[1]]) == proto::INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                        export = Some((
                            be64(&r.data[2..10]),
                            u16::from_be_bytes([r.data[10], r.data[11]]),
                        ));
                    }
                }
                proto::REP_ACK => {
                    assert!(r.data.is_empty(), "ACK with payload");
                    return Ok(export.expect("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
                }
                k if k & (1 << 31) != 0 => return Err(r),
                k => panic!("unexpected reply type {k:#x} to NBD_OPT_GO"),
            }
        }
    }
    /// Full handshake to `export`.
    pub fn open(server: &Server, export: &str) -> (Raw, u64, u16) {
        let mut r = Raw::start(server);
        let (size, flags) = r
            .go(export)
            .unwrap_or_else(|e| panic!("NBD_OPT_GO {export:?} refused: {e:?}"));
        (r, size, flags)
    }
    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b)
    }
    /// Reads a simple reply header: (error, cookie).
    pub fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let h = self.recv(16)?;
        assert_eq!(
            be32(&h[0..4]),
            proto::SIMPLE_REPLY_MAGIC,
            "bad simple reply magic"
        );
        Ok((be32(&h[4..8]), be64(&h[8..16])))
    }
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        let len = u32::try_from(data.len()).expect("len");
        self.request(0, proto::CMD_WRITE, cookie, offset, len, data)
            .expect("send WRITE");
        let (err, c) = self.reply().expect("WRITE reply");
        assert_eq!(c, cookie, "cookie");
        err
    }
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, proto::CMD_READ, cookie, offset, len, &[])
            .expect("send READ");
        let (err, c) = self.reply().expect("READ reply");
        assert_eq!(c, cookie, "cookie");
        if err != 0 {
            return Err(err);
        }
        Ok(self.recv(len as usize).expect("READ payload"))
    }
    pub fn disconnect(mut self) {
        let _ = self.request(0, proto::CMD_DISC, 0, 0, 0, &[]);
    }
    /// Waits until the server closes the connection (EOF or reset), draining whatever it
    /// sends first; returns the bytes drained, or panics after `timeout`.
    pub fn expect_closed(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut drained = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "server did not close the connection within {timeout:?}"
            );
            self.s.set_read_timeout(Some(left)).expect("timeout");
            match self.s.read(&mut buf) {
                Ok(0) => return drained,
                Ok(n) => drained.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return drained,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("server did not close the connection within {timeout:?}")
                }
                Err(e) => panic!("unexpected error waiting for close: {e}"),
            }
        }
    }
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Runs a cryptvol command expected to fail; returns its stderr (which must not be a panic).
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// `cryptvol serve VOLUME` expected to fail at startup (bounded, so a wrong start cannot
/// hang); returns its stderr.
pub fn serve_fails(env: &Env, vol: &Path) -> String {
    let sock = env.path("fail.sock");
    let out = run(Command::new("timeout")
        .arg("30")
        .arg(bin())
        .env("CRYPTVOL_KEYSTORE", env.keystore())
        .arg("serve")
        .arg("--unix")
        .arg(&sock)
        .arg(vol));
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "serve {} should fail at startup ({})",
        vol.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------------
// moto: AWS KMS and S3 served locally (tests/keys_kms.rs, check_kms.rs, snapshots.rs).

/// A running moto_server; killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts it on a free loopback port; fails the test when `moto[server]` (or one of
    /// the extra Python `modules`, e.g. boto3) is not installed.
    pub fn start(log: &Path, modules: &[&str]) -> Moto {
        Moto::start_with(log, modules, &[])
    }

    /// Like [`Moto::start`], with extra environment variables for moto_server (e.g.
    /// `INITIAL_NO_AUTH_ACTION_COUNT`, which switches on its IAM enforcement).
    pub fn start_with(log: &Path, modules: &[&str], envs: &[(&str, &str)]) -> Moto {
        let import = [&["moto.server", "flask"][..], modules].concat().join(", ");
        let ok = Command::new("python3")
            .args(["-c", &format!("import {import}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "moto[server] is not installed for python3; run scripts/install-deps.sh \
             (pip install 'moto[server]')"
        );
        let port = free_port();
        let logf = std::fs::File::create(log).expect("moto log");
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn moto_server");
        let mut m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!(
                    "moto_server exited ({st}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Points every AWS client of this process and its children at moto.
/// (Each KMS test file has one test touching these variables.)
pub fn aws_env(endpoint: &str, home: &Path) {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_SESSION_TOKEN", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        std::env::set_var(k, v);
    }
    std::env::set_var("AWS_CONFIG_FILE", home.join("aws-config"));
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"));
    std::env::remove_var("AWS_PROFILE");
    std::env::remove_var("AWS_ENDPOINT_URL_KMS");
}

/// The environment of a cryptvol child acting as one AWS principal (an IAM user's access
/// key) against moto, without touching this process's environment: tests running in
/// parallel can act as different principals. Every variable the AWS chain reads is set
/// (an empty session token counts as none).
pub fn aws_user_env(
    endpoint: &str,
    home: &Path,
    access_key_id: &str,
    secret_access_key: &str,
) -> Vec<(String, String)> {
    // Empty config files: nothing from ~/.aws, and no warning about missing files.
    for f in ["aws-config", "aws-credentials"] {
        let p = home.join(f);
        if !p.exists() {
            std::fs::write(&p, b"").expect("empty AWS config file");
        }
    }
    [
        ("AWS_ACCESS_KEY_ID", access_key_id.to_string()),
        ("AWS_SECRET_ACCESS_KEY", secret_access_key.to_string()),
        ("AWS_SESSION_TOKEN", String::new()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ENDPOINT_URL_KMS", endpoint.to_string()),
        ("AWS_ENDPOINT_URL_STS", endpoint.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_PROFILE", "default".to_string()),
        (
            "AWS_CONFIG_FILE",
            home.join("aws-config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            home.join("aws-credentials").display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The unprivileged Unix user the permission tests run commands as (tests/keys_policy.rs,
/// tests/break_glass.rs).
pub const TEST_USER: &str = "cryptvol-test";

/// Creates [`TEST_USER`] (and its group) once; returns its uid and gid.
pub fn ensure_test_user() -> (u32, u32) {
    let euid = run_ok(Command::new("id").arg("-u"));
    assert_eq!(
        euid.trim(),
        "0",
        "the permission tests create the Unix user {TEST_USER}: run the test suite as root (CI does)"
    );
    if !run(Command::new("id").arg(TEST_USER)).status.success() {
        let out = run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            TEST_USER,
        ]));
        // 9: created concurrently by someone else.
        assert!(
            out.status.success() || out.status.code() == Some(9),
            "useradd {TEST_USER} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let id = |flag: &str| -> u32 {
        run_ok(Command::new("id").args([flag, TEST_USER]))
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

// ---------------------------------------------------------------------------------------------
// Waiting on progress, not on time (issue 17 item 5). Tests wait for something observable
// (a log line, a file's contents, a counter, a process state); the timeout is only the
// failure bound, generous because a debug build on a saturated 2-core machine can stall
// for many seconds. Nothing should ever wait for a timeout to expire.

/// The usual failure bound of a wait on a busy machine.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Polls `cond` until it holds; fails the test naming `what` when `timeout` passes first.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines in a file so far (0 when it does not exist yet).
pub fn line_count(p: &Path) -> usize {
    std::fs::read(p).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

/// Waits for a child process to exit; kills it and fails the test after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    /// Waits until the server's log holds `needle` at least `n` times; fails after `timeout`.
    pub fn wait_log(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_text().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "the daemon did not log {needle:?} {n} time(s) within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Server {
    /// The value of one sample (`name{labels}` exactly as exposed) of the daemon's
    /// Prometheus endpoint (`serve --metrics 127.0.0.1:0`); 0 when not exposed yet.
    pub fn metric(&self, sample: &str) -> f64 {
        use std::io::Write;
        const LISTENING: &str = "metrics endpoint listening on http://";
        self.wait_log(LISTENING, 1, PATIENCE);
        let log = self.log_text();
        let addr = log
            .lines()
            .find_map(|l| l.split(LISTENING).nth(1)?.split('/').next())
            .expect("metrics address in the log");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .expect("send the scrape");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read the scrape");
        out.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().expect("sample value"))
    }
}

/// The size that `nbdinfo --size URI` reports.
pub fn nbdinfo_size(uri: &str) -> u64 {
    require("nbdinfo");
    let out = run_ok(Command::new("nbdinfo").args(["--size", uri]));
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size said {out:?}: {e}"))
}

/// Runs an nbdsh script against `uri` and returns its stdout; fails the test if it fails.
pub fn nbdsh_ok(uri: &str, script: &str) -> String {
    let out = nbdsh(uri, script);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A grow killed at its fault points (`volume::crash_point`, armed by
/// `CRYPTVOL_FAULT_INJECTION=1 CRYPTVOL_TEST_CRASH_AT=STEP`), offline (tests/resize.rs) or
/// online (tests/resize_online.rs): from 1 GiB to 3 GiB, which also moves the allocation
/// map, with 64 KiB of `D` flushed at the old end.
pub mod grow_faults {
    use super::*;

    pub const FROM: u64 = 1 << 30;
    pub const TO: u64 = 3 << 30;
    /// The steps, and whether a kill there leaves the new size (once the first header
    /// copy is complete).
    pub const STEPS: [(&str, bool); 6] = [
        ("resize-after-extend", false),
        ("resize-before-header", false),
        ("header-copy-1-torn", false),
        ("header-copy-1", true),
        ("header-copy-2-torn", true),
        ("header-copy-2", true),
    ];

    /// The environment that kills a cryptvol process at `step`.
    pub fn env(step: &str) -> [(&'static str, &str); 2] {
        [
            ("CRYPTVOL_FAULT_INJECTION", "1"),
            ("CRYPTVOL_TEST_CRASH_AT", step),
        ]
    }

    /// The size a kill at `step` must leave.
    pub fn want(grown: bool) -> u64 {
        if grown {
            TO
        } else {
            FROM
        }
    }

    /// The volume every step starts from (made once; copy it with [`copy_for`]).
    pub fn base(env: &Env) -> PathBuf {
        let base = env.create("base.vol", &FROM.to_string(), &[]);
        let srv = env.serve(&[s(&base)], &[], false);
        nbdsh_ok(
            &srv.uri(""),
            &format!("h.pwrite(b'D' * 65536, {})\nh.flush()", FROM - 65536),
        );
        srv.stop();
        base
    }

    /// A sparse copy of `base` for `step`.
    pub fn copy_for(env: &Env, base: &Path, step: &str) -> PathBuf {
        let vol = env.path(&format!("{step}.vol"));
        run_ok(Command::new("cp").args(["--sparse=always", s(base), s(&vol)]));
        vol
    }

    /// After the kill at `step`, the volume not served: `info` shows `want`.
    pub fn assert_size(env: &Env, vol: &Path, step: &str, want: u64) {
        assert_eq!(info_json(env, vol)["size"], want, "{step}");
    }

    /// After the kill at `step`, the volume served again at `uri`: a new connection sees
    /// `want`, and the data written before reads back.
    pub fn assert_served(uri: &str, step: &str, want: u64) {
        assert_eq!(nbdinfo_size(uri), want, "{step}");
        nbdsh_ok(
            uri,
            &format!("assert h.pread(65536, {}) == b'D' * 65536", FROM - 65536),
        );
    }

    /// `cryptvol check` finds the volume clean.
    pub fn assert_check_clean(env: &Env, vol: &Path, step: &str) {
        let out = run(env.cmd().arg("check").arg(vol));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{step}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// fio's nbd engine on `uri` (tests of the file engines): verified random writes
/// (`--do_verify=1`) or a verify-only pass (`--verify_only`) over four 8 MiB regions,
/// with request sizes `bsrange`; asserts success, returns the output.
pub fn fio_engine_verify(
    env: &Env,
    uri: &str,
    name: &str,
    bsrange: &str,
    seed: u32,
    extra: &[&str],
) -> String {
    let out = run(Command::new("fio")
        .current_dir(env.dir.path())
        .arg(format!("--name={name}"))
        .args([
            "--ioengine=nbd",
            "--rw=randwrite",
            "--iodepth=32",
            "--numjobs=4",
            "--size=8M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--group_reporting",
        ])
        .arg(format!("--bsrange={bsrange}"))
        .arg(format!("--randseed={seed}"))
        .arg(format!("--uri={uri}"))
        .args(extra));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("verify:") && text.contains("err= 0"),
        "fio {extra:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The `engine` field of a server's "export opened" log line.
pub fn engine_in_log(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("export opened"))?;
    let rest = &line[line.find("engine=")? + "engine=".len()..];
    Some(
        rest.split_whitespace()
            .next()?
            .trim_matches('"')
            .to_string(),
    )
}
