//! The `exec` backend: wrap and unwrap through an external program speaking a small
//! JSON protocol on stdin/stdout, so a site can plug in Vault, a TPM, an HSM or Tang
//! without recompiling cryptvol. The protocol is documented in `docs/keys.md`; an
//! example program is `scripts/exec-backend-example.py`.
//!
//! Programs are registered by name in the keystore (`exec-backends.json`, written by
//! `cryptvol key exec add`); a key reference `exec:NAME[:KEY]` and a keyslot with
//! `backend = "exec"`, `key_id = "NAME:KEY"` select one. A volume header can therefore
//! only choose among programs the operator registered, never run one of its own.
//!
//! One process runs per operation: cryptvol writes one JSON request to its stdin and
//! closes it, then reads one JSON response from its stdout (at most 64 KiB) within the
//! registered timeout, after which the program's process group is killed. The plaintext
//! data key travels only over these pipes, in locked, wiped buffers on our side.
//!
//! The program gets a cleared environment (an allow-list plus the names registered for
//! it) and no descriptors but its three pipes.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::audit::AuditEvent;
use super::keyref::{is_exec_name, EXEC};
use super::local::{done_but_unaudited, ks_err};
use super::seal;
use super::{
    EncryptionContext, KeyBackend, KeyDescription, KeyError, KeyState, LocalKeystore, Principal,
    WrappedDek,
};
use crate::crypto::{Dek, LockedBytes, DEK_LEN};

/// Version of the request/response protocol (the `protocol` field of requests).
pub const EXEC_PROTOCOL_VERSION: u32 = 1;
const REGISTRY_FILE: &str = "exec-backends.json";
const REGISTRY_VERSION: u32 = 1;
/// Largest response accepted on stdout.
const MAX_OUTPUT: usize = 64 * 1024;
/// Largest request written (its buffer is allocated in locked pages up front).
const MAX_REQUEST: usize = 48 * 1024;
/// Bytes of stderr kept for error messages.
const MAX_STDERR: usize = 2048;
/// Default and largest per-call timeout.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
pub const MAX_TIMEOUT_SECS: u64 = 300;
const MAX_KEY_ID_LEN: usize = 512;
const MAX_BLOB_LEN: usize = 8 * 1024;
const MAX_PARAMS: usize = 16;
const MAX_PARAM_LEN: usize = 1024;
const MAX_MESSAGE_LEN: usize = 400;

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

/// A registered program: absolute path, fixed arguments, per-call timeout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecSpec {
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Names of environment variables passed on to the program (from cryptvol's own
    /// environment, when set) besides the fixed allow-list [`BASE_ENV`]. Nothing else is:
    /// the program never sees AWS credentials, `CRYPTVOL_*` settings or anything else it
    /// was not registered with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

/// Variables every program gets when they are set in cryptvol's environment.
pub const BASE_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"];
/// `PATH` when cryptvol's own environment has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
const MAX_ENV: usize = 32;

/// A portable environment variable name: a letter or `_`, then letters, digits or `_`.
fn is_env_name(n: &str) -> bool {
    let mut c = n.chars();
    (1..=64).contains(&n.len())
        && c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

impl ExecSpec {
    fn validate(&self) -> Result<(), String> {
        if !self.program.is_absolute() {
            return Err(format!(
                "the program must be an absolute path, not {}",
                self.program.display()
            ));
        }
        if !(1..=MAX_TIMEOUT_SECS).contains(&self.timeout_secs) {
            return Err(format!(
                "the timeout must be 1 to {MAX_TIMEOUT_SECS} seconds, not {}",
                self.timeout_secs
            ));
        }
        if self.env.len() > MAX_ENV {
            return Err(format!(
                "at most {MAX_ENV} environment variables can be passed on, not {}",
                self.env.len()
            ));
        }
        if let Some(bad) = self.env.iter().find(|n| !is_env_name(n)) {
            return Err(format!(
                "{} is not an environment variable name (letters, digits and '_', not \
                 starting with a digit)",
                shown(bad)
            ));
        }
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Registry {
    version: u32,
    #[serde(default)]
    backends: BTreeMap<String, ExecSpec>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            version: REGISTRY_VERSION,
            backends: BTreeMap::new(),
        }
    }
}

fn exec_err(name: &str, reason: impl Into<String>) -> KeyError {
    KeyError::Exec {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// A string from the program, made safe to show (escaped, bounded).
fn shown(s: &str) -> String {
    let mut out: String = s.escape_debug().take(MAX_MESSAGE_LEN).collect();
    if s.len() > MAX_MESSAGE_LEN {
        out.push('…');
    }
    out
}

impl LocalKeystore {
    fn load_registry(&self) -> Result<Registry, KeyError> {
        let r: Registry = self
            .read_json(REGISTRY_FILE, "the exec backend registry")?
            .unwrap_or_default();
        if r.version > REGISTRY_VERSION {
            return Err(ks_err(
                &self.dir().join(REGISTRY_FILE),
                format!(
                    "written in version {}, newer than this cryptvol supports; upgrade cryptvol",
                    r.version
                ),
            ));
        }
        Ok(r)
    }

    /// The registered exec backends.
    pub fn exec_backends(&self) -> Result<BTreeMap<String, ExecSpec>, KeyError> {
        Ok(self.load_registry()?.backends)
    }

    /// The exec backend registered as `name`.
    pub fn exec_backend(&self, name: &str) -> Result<ExecBackend, KeyError> {
        let spec = self
            .exec_backends()?
            .remove(name)
            .ok_or_else(|| KeyError::NotFound {
                backend: EXEC.to_string(),
                key: format!(
                    "{} (no exec backend of that name is registered in {}; register one with \
                     `cryptvol key exec add NAME -- PROGRAM [ARGS...]`)",
                    shown(name),
                    self.dir().display()
                ),
            })?;
        Ok(ExecBackend::new(name, spec, self.principal().clone()))
    }

    /// Registers (or replaces) an exec backend.
    pub fn exec_add(&self, name: &str, spec: ExecSpec) -> Result<(), KeyError> {
        let detail = format!(
            "program={} timeout_secs={}",
            spec.program.display(),
            spec.timeout_secs
        );
        self.registry_change("exec-add", name, &detail, |r| {
            if !is_exec_name(name) {
                return Err(KeyError::Unsupported(format!(
                    "invalid exec backend name {}: use 1 to 64 letters, digits, '_' or '-'",
                    shown(name)
                )));
            }
            spec.validate().map_err(|e| exec_err(name, e))?;
            r.backends.insert(name.to_string(), spec);
            Ok(())
        })
    }

    /// Unregisters an exec backend (volumes wrapped by it cannot be unwrapped until it is
    /// registered again).
    pub fn exec_remove(&self, name: &str) -> Result<(), KeyError> {
        self.registry_change("exec-remove", name, "", |r| {
            r.backends
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| KeyError::NotFound {
                    backend: EXEC.to_string(),
                    key: shown(name),
                })
        })
    }

    fn registry_change(
        &self,
        operation: &str,
        name: &str,
        detail: &str,
        change: impl FnOnce(&mut Registry) -> Result<(), KeyError>,
    ) -> Result<(), KeyError> {
        let writer = self.audit_log().open()?;
        let result = (|| {
            let _lock = self.lock()?;
            let mut r = self.load_registry()?;
            change(&mut r)?;
            self.write_json(REGISTRY_FILE, &r)
        })();
        let event = |outcome| AuditEvent {
            operation,
            backend: EXEC,
            key_id: name,
            context: None,
            principal: self.principal(),
            outcome,
            detail: Some(detail).filter(|d| !d.is_empty()),
        };
        match &result {
            Ok(()) => writer
                .write(&event(Ok(())))
                .map_err(|e| done_but_unaudited(operation, name, e))?,
            Err(e) => {
                let _ = writer.write(&event(Err(e)));
            }
        }
        result
    }
}

/// A registered external program used as a key backend.
#[derive(Debug, Clone)]
pub struct ExecBackend {
    name: String,
    spec: ExecSpec,
    principal: Principal,
}

#[derive(serde::Serialize)]
struct Request<'a> {
    protocol: u32,
    op: &'a str,
    key_id: Option<&'a str>,
    principal: String,
    uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext_b64: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a BTreeMap<String, String>>,
}

#[derive(serde::Deserialize)]
struct Response<'a> {
    ok: bool,
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    blob_b64: Option<String>,
    /// Borrowed from the zeroizing output buffer, never copied.
    #[serde(default, borrow)]
    plaintext_b64: Option<&'a str>,
    #[serde(default)]
    params: BTreeMap<String, String>,
    #[serde(default)]
    state: Option<KeyState>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// What a finished program produced.
struct Output {
    /// In locked pages: an unwrap answer carries the plaintext DEK.
    stdout: LockedBytes,
    stderr: String,
    status: std::process::ExitStatus,
}

impl ExecBackend {
    pub fn new(name: &str, spec: ExecSpec, principal: Principal) -> ExecBackend {
        ExecBackend {
            name: name.to_string(),
            spec,
            principal,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The program's whole environment: the allow-list [`BASE_ENV`] and the variables
    /// named at registration, each only if set in ours (`PATH` has a default).
    fn child_env(&self) -> Vec<(String, std::ffi::OsString)> {
        let mut env: Vec<(String, std::ffi::OsString)> = Vec::new();
        let names = BASE_ENV
            .iter()
            .map(|n| n.to_string())
            .chain(self.spec.env.iter().cloned());
        for n in names {
            if env.iter().any(|(k, _)| *k == n) {
                continue;
            }
            if let Some(v) = std::env::var_os(&n) {
                env.push((n, v));
            }
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env
    }

    /// `NAME:KEY`, as stored in keyslots.
    fn slot_key_id(&self, key: &str) -> String {
        format!("{}:{key}", self.name)
    }

    /// Builds, sends and parses one request; maps `{"ok":false}` answers to errors.
    async fn call(
        &self,
        op: &'static str,
        key: Option<&str>,
        plaintext_b64: Option<&str>,
        wrapped: Option<&WrappedDek>,
        context: Option<&EncryptionContext>,
    ) -> Result<LockedBytes, KeyError> {
        let request = Request {
            protocol: EXEC_PROTOCOL_VERSION,
            op,
            key_id: key,
            principal: self.principal.short(),
            uid: self.principal.uid,
            plaintext_b64,
            blob_b64: wrapped.map(|w| STANDARD.encode(&w.blob)),
            context: context.map(|c| &c.0),
            params: wrapped.map(|w| &w.params),
        };
        // Encoded straight into locked pages: a wrap request carries the plaintext DEK.
        let mut buf = LockedBytes::zeroed(MAX_REQUEST)?;
        let len = {
            let mut w = std::io::Cursor::new(&mut buf[..]);
            serde_json::to_writer(&mut w, &request)
                .and_then(|()| w.write_all(b"\n").map_err(serde_json::Error::io))
                .map_err(|e| {
                    if e.is_io() {
                        exec_err(&self.name, "the request is too large")
                    } else {
                        exec_err(&self.name, format!("cannot encode the request: {e}"))
                    }
                })?;
            w.position() as usize
        };
        buf.truncate(len);
        let this = self.clone();
        seal::blocking(move || this.run(buf)).await
    }

    /// Runs the program once with `request` on stdin (blocking).
    fn run(&self, request: LockedBytes) -> Result<LockedBytes, KeyError> {
        let name = &self.name;
        let program = self.spec.program.display().to_string();
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .env_clear()
            .envs(self.child_env())
            .env("CRYPTVOL_EXEC_PROTOCOL", EXEC_PROTOCOL_VERSION.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // Descriptors we were given (a --passphrase-fd, a systemd socket, whatever our
        // parent left open without FD_CLOEXEC) must not reach the program: in the child,
        // between fork and exec, mark every descriptor from 3 up close-on-exec, so that
        // only the three pipes (dup2-ed onto 0, 1, 2 before this runs) survive the exec.
        // Marking rather than closing keeps std's own close-on-exec error pipe working,
        // so a program that cannot be executed is still reported as such.
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // close_range(2) and fcntl(2) system calls, which are async-signal-safe; it does
        // not allocate, lock or touch memory shared with other threads.
        unsafe {
            cmd.pre_exec(cloexec_from_3);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| exec_err(name, format!("cannot run {program}: {e}")))?;
        let out = self.collect(&mut child, request);
        if out.is_err() {
            kill_group(&mut child);
        }
        let out = out?;
        if out.stdout.is_empty() {
            return Err(exec_err(
                name,
                format!(
                    "{program} exited with {} without an answer on stdout{}",
                    out.status,
                    stderr_suffix(&out.stderr)
                ),
            ));
        }
        if !out.status.success() {
            // A structured error answer still says best what went wrong.
            if let Ok(r) = serde_json::from_slice::<Response<'_>>(&out.stdout) {
                if !r.ok {
                    return Err(self.answer_error(&r, None, "its operation"));
                }
            }
            return Err(exec_err(
                name,
                format!(
                    "{program} exited with {}{}",
                    out.status,
                    stderr_suffix(&out.stderr)
                ),
            ));
        }
        Ok(out.stdout)
    }

    /// Writes the request, reads both outputs within the deadline and reaps the child.
    fn collect(&self, child: &mut Child, request: LockedBytes) -> Result<Output, KeyError> {
        let name = &self.name;
        let timeout = Duration::from_secs(self.spec.timeout_secs);
        let deadline = Instant::now() + timeout;
        let too_slow = || {
            KeyError::Transient(format!(
                "exec backend {name} did not answer within {} s (its timeout); it was killed",
                self.spec.timeout_secs
            ))
        };
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| exec_err(name, "no stdin pipe"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| exec_err(name, "no stdout pipe"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| exec_err(name, "no stderr pipe"))?;
        let (out_tx, out_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = out_tx.send(read_bounded(stdout));
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = err_tx.send(read_stderr(stderr));
        });
        // The request is written by its own thread, so the deadline covers a program that
        // never reads its stdin: a pipe buffer can be as small as one page (when the
        // user's pipe quota is used up), and a write into a full pipe blocks until the
        // reader reads or dies. When the deadline passes, the caller kills the program's
        // group, which closes the pipe and ends the write with EPIPE. A program that
        // answers and exits without reading everything also gives EPIPE: fine.
        let (in_tx, in_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = match stdin.write_all(&request) {
                Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(e),
                _ => Ok(()),
            };
            drop(stdin);
            let _ = in_tx.send(r);
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let stdout = match out_rx.recv_timeout(left) {
            Ok(Ok(buf)) => buf,
            Ok(Err(e)) => return Err(exec_err(name, e)),
            Err(_) => return Err(too_slow()),
        };
        // Its stdout is closed: it has read what it wanted (or exited).
        if let Ok(Err(e)) = in_rx.try_recv() {
            return Err(exec_err(name, format!("cannot write the request: {e}")));
        }
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => return Err(too_slow()),
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(exec_err(name, format!("cannot wait for the program: {e}"))),
            }
        };
        let stderr = err_rx
            .recv_timeout(Duration::from_millis(200))
            .unwrap_or_default();
        Ok(Output {
            stdout,
            stderr,
            status,
        })
    }

    /// Parses an answer; an error answer (`"ok": false`) becomes the matching error,
    /// naming `key` (the key asked for).
    fn parse<'a>(
        &self,
        out: &'a [u8],
        op: &str,
        key: Option<&str>,
    ) -> Result<Response<'a>, KeyError> {
        let r: Response<'a> = serde_json::from_slice(out).map_err(|e| {
            exec_err(
                &self.name,
                format!(
                    "its answer to {op} is not a valid protocol response ({:?} error at line {} \
                     column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            )
        })?;
        if !r.ok {
            return Err(self.answer_error(&r, key, op));
        }
        Ok(r)
    }

    /// Maps an `{"ok": false, "error": KIND, "message": ...}` answer to a typed error.
    fn answer_error(&self, r: &Response<'_>, key: Option<&str>, op: &str) -> KeyError {
        let message = r.message.as_deref().map(shown).unwrap_or_default();
        let key = self.slot_key_id(&shown(key.or(r.key_id.as_deref()).unwrap_or("(default)")));
        let kind = r.error.as_deref().unwrap_or("");
        match kind {
            "not_found" => KeyError::NotFound {
                backend: EXEC.to_string(),
                key: if message.is_empty() {
                    key
                } else {
                    format!("{key} ({message})")
                },
            },
            "access_denied" => KeyError::AccessDenied {
                key,
                operation: if message.is_empty() {
                    op.to_string()
                } else {
                    format!("{op} (exec backend {}: {message})", self.name)
                },
                principal: self.principal.to_string(),
            },
            "disabled" | "pending_deletion" | "unusable" => KeyError::KeyUnusable {
                key,
                state: format!(
                    "{} according to exec backend {}{}",
                    kind.replace('_', " "),
                    self.name,
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(": {message}")
                    }
                ),
            },
            "wrong_key" | "context_mismatch" => KeyError::WrongKey { key },
            "transient" => KeyError::Transient(format!("exec backend {}: {message}", self.name)),
            "unsupported" => {
                KeyError::Unsupported(format!("exec backend {}: {message}", self.name))
            }
            "invalid" => KeyError::Malformed(format!("exec backend {}: {message}", self.name)),
            other => exec_err(
                &self.name,
                format!("it failed ({}): {message}", shown(other)),
            ),
        }
    }

    /// The key a `describe` answer describes.
    fn describe_reply(&self, out: &[u8], key: Option<&str>) -> Result<KeyDescription, KeyError> {
        let r = self.parse(out, "describe", key)?;
        let id = self.check_key_id(r.key_id.as_deref(), "describe")?;
        Ok(KeyDescription {
            backend: EXEC.to_string(),
            key_id: self.slot_key_id(&id),
            aliases: r.aliases.iter().map(|a| shown(a)).collect(),
            state: r.state.clone().unwrap_or(KeyState::Enabled),
            created_at: r.created_at.as_deref().map(shown).unwrap_or_default(),
        })
    }

    /// The keyslot a `wrap` answer gives for a data key wrapped under `ctx`.
    fn wrap_reply(
        &self,
        out: &[u8],
        key: Option<&str>,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        let r = self.parse(out, "wrap", key)?;
        let id = self.check_key_id(r.key_id.as_deref(), "wrap")?;
        let blob = r
            .blob_b64
            .as_deref()
            .and_then(|b| STANDARD.decode(b).ok())
            .filter(|b| !b.is_empty() && b.len() <= MAX_BLOB_LEN)
            .ok_or_else(|| {
                exec_err(
                    &self.name,
                    format!(
                        "its answer to wrap lacks blob_b64 (base64 of 1 to {MAX_BLOB_LEN} bytes)"
                    ),
                )
            })?;
        check_params(&self.name, &r.params)?;
        Ok(WrappedDek {
            backend: EXEC.to_string(),
            key_id: self.slot_key_id(&id),
            blob,
            context: ctx.clone(),
            params: r.params,
        })
    }

    /// The data key an `unwrap` answer for `key` carries.
    fn unwrap_reply(&self, out: &[u8], key: &str) -> Result<Dek, KeyError> {
        let r = self.parse(out, "unwrap", Some(key))?;
        if r.key_id.as_deref().is_some_and(|id| id != key) {
            return Err(exec_err(
                &self.name,
                "its answer to unwrap names another key than the one asked",
            ));
        }
        let b64 = r
            .plaintext_b64
            .ok_or_else(|| exec_err(&self.name, "its answer to unwrap lacks plaintext_b64"))?;
        let mut raw = Zeroizing::new([0u8; DEK_LEN + 3]);
        let n = STANDARD
            .decode_slice(b64.as_bytes(), &mut raw[..])
            .map_err(|_| exec_err(&self.name, "its plaintext_b64 is not base64 of 64 bytes"))?;
        if n != DEK_LEN {
            return Err(exec_err(
                &self.name,
                format!("its plaintext_b64 holds {n} bytes, not {DEK_LEN}"),
            ));
        }
        Ok(Dek::from_slice(&raw[..DEK_LEN])?)
    }

    /// Checks a key id the program returned.
    fn check_key_id(&self, id: Option<&str>, op: &str) -> Result<String, KeyError> {
        let id = id.unwrap_or("");
        if id.is_empty() || id.len() > MAX_KEY_ID_LEN || id.chars().any(char::is_control) {
            return Err(exec_err(
                &self.name,
                format!("its answer to {op} lacks a valid key_id (1 to {MAX_KEY_ID_LEN} printable characters)"),
            ));
        }
        Ok(id.to_string())
    }
}

/// Reads stdout to EOF into a preallocated buffer in locked pages (wiped on drop),
/// refusing more than `MAX_OUTPUT` bytes.
fn read_bounded(mut r: impl Read) -> Result<LockedBytes, String> {
    let mut buf = LockedBytes::zeroed(MAX_OUTPUT + 1)
        .map_err(|e| format!("cannot allocate a buffer for its answer: {e}"))?;
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(format!("it wrote more than {MAX_OUTPUT} bytes on stdout"));
        }
        match r.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read its stdout: {e}")),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Keeps the first `MAX_STDERR` bytes of stderr and drains the rest.
fn read_stderr(mut r: impl Read) -> String {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                let room = MAX_STDERR.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; its stderr: {}", shown(stderr))
    }
}

/// The descriptors covered when `close_range` is unavailable (kernels before 5.11):
/// 3 up to this bound, one `fcntl` each (a few milliseconds at most).
const FALLBACK_FD_LIMIT: i32 = 1 << 16;

/// In the child between fork and exec: every descriptor from 3 up becomes close-on-exec.
/// Only async-signal-safe system calls, no allocation.
fn cloexec_from_3() -> std::io::Result<()> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags on descriptors of
    // this process; it takes no pointers.
    let r = unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if r == 0 {
        return Ok(());
    }
    // Kernels before 5.11: one fcntl per descriptor (EBADF for those not open).
    for fd in 3..FALLBACK_FD_LIMIT {
        // SAFETY: fcntl(2) F_SETFD on an integer descriptor; no pointers, and a
        // descriptor that is not open only yields EBADF.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// Kills the program's whole process group (it was started as a group leader) and
/// reaps it.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.wait();
}

fn check_params(name: &str, params: &BTreeMap<String, String>) -> Result<(), KeyError> {
    if params.len() > MAX_PARAMS
        || params
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > MAX_PARAM_LEN)
    {
        return Err(exec_err(
            name,
            format!(
                "its params must be at most {MAX_PARAMS} entries with names of 1 to 64 and values \
                 of at most {MAX_PARAM_LEN} characters"
            ),
        ));
    }
    Ok(())
}

#[async_trait::async_trait]
impl KeyBackend for ExecBackend {
    fn kind(&self) -> &'static str {
        EXEC
    }

    async fn describe_key(&self, key: Option<&str>) -> Result<KeyDescription, KeyError> {
        let out = self.call("describe", key, None, None, None).await?;
        self.describe_reply(&out, key)
    }

    async fn wrap(
        &self,
        key: Option<&str>,
        dek: &Dek,
        ctx: &EncryptionContext,
    ) -> Result<WrappedDek, KeyError> {
        let mut b64 = Zeroizing::new([0u8; 4 * DEK_LEN.div_ceil(3)]);
        let n = STANDARD
            .encode_slice(dek.expose(), &mut b64[..])
            .map_err(|e| exec_err(&self.name, format!("cannot encode the data key: {e}")))?;
        let plaintext = std::str::from_utf8(&b64[..n])
            .map_err(|e| exec_err(&self.name, format!("cannot encode the data key: {e}")))?;
        let out = self
            .call("wrap", key, Some(plaintext), None, Some(ctx))
            .await?;
        self.wrap_reply(&out, key, ctx)
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedDek,
        expected: &EncryptionContext,
    ) -> Result<Dek, KeyError> {
        if wrapped.backend != EXEC {
            return Err(KeyError::Malformed(format!(
                "keyslot belongs to the {:?} backend, not \"exec\"",
                wrapped.backend
            )));
        }
        seal::check_context(wrapped, expected)?;
        let key = match wrapped.key_id.split_once(':') {
            Some((name, key)) if name == self.name && !key.is_empty() => key,
            _ => {
                return Err(KeyError::Malformed(format!(
                    "exec keyslot key id {} does not belong to exec backend {}",
                    shown(&wrapped.key_id),
                    self.name
                )))
            }
        };
        let out = self
            .call(
                "unwrap",
                Some(key),
                None,
                Some(wrapped),
                Some(&wrapped.context),
            )
            .await?;
        self.unwrap_reply(&out, key)
    }
}

#[doc(hidden)]
pub(crate) mod fuzz_hooks;

#[cfg(test)]
mod tests;
