//! The daemon's control channel: a Unix socket (`cryptvol serve --control PATH`, mode
//! 0600) through which `cryptvol status`, `cryptvol reencrypt EXPORT` and `cryptvol
//! snapshot create EXPORT` talk to a running server.
//!
//! Protocol: newline-delimited JSON, one request per connection. The client sends one
//! line `{"op": "...", ...}` (at most [`MAX_REQUEST_BYTES`]); the daemon answers with
//! zero or more `{"event":"progress",...}` lines and ends with `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`, then closes the connection.
//!
//! | op | fields | answer |
//! |---|---|---|
//! | `status` | | `exports` (see [`ExportStatus`]), `connections`, `pid` |
//! | `reencrypt` | `export`, `wait` (default true) | progress events, then `export`, `done` |
//! | `reencrypt-status` | `export` | `export`, `in_progress`, `reencrypt` |
//! | `snapshot` | `export`, `store`, `description`, `parent` (optional) | progress events, then `export`, `snapshot` |
//!
//! The first half of this file is the protocol as pure types and functions (parsing
//! and validation, unit-tested); the second half is the I/O: the listener, the
//! per-connection handler and a small blocking client for the CLI.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::reencrypt::{JobState, Jobs};
use super::{Listener, ListenerSpec, ServerError, Shared};
use crate::crypto::Dek;
use crate::keys::WrappedDek;
use crate::progress::Progress;
use crate::volume::{SnapshotView, Volume};

// ---------------------------------------------------------------------------------------
// Protocol (pure)

/// Longest request line accepted (the newline included): room for the longest export
/// name, store and description below, even with every character escaped.
pub const MAX_REQUEST_BYTES: usize = 32 * 1024;
/// Longest export name (the NBD limit).
pub const MAX_EXPORT_LEN: usize = 4096;
/// Longest snapshot store specification.
pub const MAX_STORE_LEN: usize = 4096;
/// Longest snapshot description (as in a snapshot manifest).
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// Longest parent snapshot id.
pub const MAX_PARENT_LEN: usize = 256;
/// Chunk size of snapshot views taken through the daemon (as EBS: 512 KiB).
pub const SNAPSHOT_CHUNK_SIZE: u64 = 512 * 1024;
/// The default control socket of a daemon running as root.
pub const DEFAULT_CONTROL_PATH: &str = "/run/cryptvol/control.sock";
/// The operations, as named on the wire.
pub const OPS: [&str; 4] = ["status", "reencrypt", "reencrypt-status", "snapshot"];

/// One control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The exports being served and their state.
    Status,
    /// Start (or resume) an online re-encryption of `export` under a new data key;
    /// `wait`: stream progress until it is done (else answer once it has started).
    Reencrypt { export: String, wait: bool },
    /// Progress of a re-encryption.
    ReencryptStatus { export: String },
    /// A crash-consistent snapshot of `export` into `store`.
    Snapshot {
        export: String,
        store: String,
        description: String,
        parent: Option<String>,
    },
}

impl Request {
    /// The wire name of the operation.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reencrypt { .. } => "reencrypt",
            Request::ReencryptStatus { .. } => "reencrypt-status",
            Request::Snapshot { .. } => "snapshot",
        }
    }

    /// The request as one JSON line (with its newline), as the client sends it.
    pub fn to_line(&self) -> String {
        let v = match self {
            Request::Status => serde_json::json!({ "op": "status" }),
            Request::Reencrypt { export, wait } => {
                serde_json::json!({ "op": "reencrypt", "export": export, "wait": wait })
            }
            Request::ReencryptStatus { export } => {
                serde_json::json!({ "op": "reencrypt-status", "export": export })
            }
            Request::Snapshot {
                export,
                store,
                description,
                parent,
            } => serde_json::json!({
                "op": "snapshot",
                "export": export,
                "store": store,
                "description": description,
                "parent": parent,
            }),
        };
        format!("{v}\n")
    }
}

/// Why a request was refused before anything was done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("request too large: a request is one JSON line of at most {limit} bytes")]
    TooLarge { limit: usize },
    #[error("empty request: send one JSON object on one line, e.g. {{\"op\":\"status\"}}")]
    Empty,
    #[error("request is not valid JSON ({0}); send one JSON object on one line, e.g. {{\"op\":\"status\"}}")]
    BadJson(String),
    #[error("request is not a JSON object; send e.g. {{\"op\":\"status\"}}")]
    NotAnObject,
    #[error("request has no \"op\" string; known ops: {}", OPS.join(", "))]
    MissingOp,
    #[error("unknown op {0:?}; known ops: {ops}", ops = OPS.join(", "))]
    UnknownOp(String),
    #[error("invalid {op} request: {reason}")]
    BadFields { op: String, reason: String },
    #[error("invalid {field}: {reason}")]
    BadValue { field: &'static str, reason: String },
    #[error("invalid reply from the daemon: {0}")]
    BadReply(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusFields {
    #[allow(dead_code)]
    op: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReencryptFields {
    #[allow(dead_code)]
    op: String,
    export: String,
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportFields {
    #[allow(dead_code)]
    op: String,
    export: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotFields {
    #[allow(dead_code)]
    op: String,
    export: String,
    store: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parent: Option<String>,
}

fn fields<T: serde::de::DeserializeOwned>(op: &str, v: Value) -> Result<T, ProtocolError> {
    serde_json::from_value(v).map_err(|e| ProtocolError::BadFields {
        op: op.to_string(),
        reason: e.to_string(),
    })
}

/// Parses and validates one request line (the trailing newline is optional).
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ProtocolError::TooLarge {
            limit: MAX_REQUEST_BYTES,
        });
    }
    let text = std::str::from_utf8(line)
        .map_err(|_| ProtocolError::BadJson("not UTF-8".into()))?
        .trim();
    if text.is_empty() {
        return Err(ProtocolError::Empty);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
    let Value::Object(obj) = &v else {
        return Err(ProtocolError::NotAnObject);
    };
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.clone(),
        _ => return Err(ProtocolError::MissingOp),
    };
    let req = match op.as_str() {
        "status" => {
            let _: StatusFields = fields(&op, v)?;
            Request::Status
        }
        "reencrypt" => {
            let f: ReencryptFields = fields(&op, v)?;
            Request::Reencrypt {
                export: f.export,
                wait: f.wait,
            }
        }
        "reencrypt-status" => {
            let f: ExportFields = fields(&op, v)?;
            Request::ReencryptStatus { export: f.export }
        }
        "snapshot" => {
            let f: SnapshotFields = fields(&op, v)?;
            Request::Snapshot {
                export: f.export,
                store: f.store,
                description: f.description,
                parent: f.parent,
            }
        }
        _ => return Err(ProtocolError::UnknownOp(shorten(&op, 64))),
    };
    validate(&req)?;
    Ok(req)
}

/// Checks the fields of a request (lengths, no control characters).
pub fn validate(req: &Request) -> Result<(), ProtocolError> {
    match req {
        Request::Status => Ok(()),
        Request::Reencrypt { export, .. } | Request::ReencryptStatus { export } => {
            check_text("export", export, MAX_EXPORT_LEN, false)
        }
        Request::Snapshot {
            export,
            store,
            description,
            parent,
        } => {
            check_text("export", export, MAX_EXPORT_LEN, false)?;
            check_text("store", store, MAX_STORE_LEN, false)?;
            check_text("description", description, MAX_DESCRIPTION_LEN, true)?;
            if let Some(p) = parent {
                check_text("parent", p, MAX_PARENT_LEN, false)?;
            }
            Ok(())
        }
    }
}

fn check_text(
    field: &'static str,
    s: &str,
    max: usize,
    may_be_empty: bool,
) -> Result<(), ProtocolError> {
    let bad = |reason: String| Err(ProtocolError::BadValue { field, reason });
    if s.is_empty() && !may_be_empty {
        return bad("it is empty".into());
    }
    if s.len() > max {
        return bad(format!("it is longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return bad("it contains control characters".into());
    }
    Ok(())
}

/// At most `max` characters of `s`, for echoing untrusted input in messages.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

/// A progress line streamed before the final answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// Always `"progress"`.
    pub event: String,
    /// The operation reporting (`reencrypt`, `snapshot`).
    pub op: String,
    pub export: String,
    /// Bytes done (for re-encryption: the watermark).
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
    /// The last error (a failed step being retried), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProgressEvent {
    pub fn new(op: &str, export: &str, done: u64, total: u64, error: Option<String>) -> Self {
        ProgressEvent {
            event: "progress".into(),
            op: op.into(),
            export: export.into(),
            done,
            total,
            error,
        }
    }
}

/// One line from the daemon, as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Progress(ProgressEvent),
    /// `{"ok":true,...}`: the other fields.
    Ok(Map<String, Value>),
    /// `{"ok":false,"error":...}`.
    Err(String),
}

/// Parses one line of the daemon's answer.
pub fn parse_reply(line: &str) -> Result<Reply, ProtocolError> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| ProtocolError::BadReply(format!("not JSON ({e})")))?;
    let Value::Object(mut obj) = v else {
        return Err(ProtocolError::BadReply("not a JSON object".into()));
    };
    if obj.get("event").and_then(Value::as_str) == Some("progress") {
        return serde_json::from_value(Value::Object(obj))
            .map(Reply::Progress)
            .map_err(|e| ProtocolError::BadReply(format!("bad progress event ({e})")));
    }
    match obj.remove("ok") {
        Some(Value::Bool(true)) => Ok(Reply::Ok(obj)),
        Some(Value::Bool(false)) => Ok(Reply::Err(
            obj.get("error")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_string(),
        )),
        _ => Err(ProtocolError::BadReply(
            "neither a progress event nor an answer".into(),
        )),
    }
}

/// The final success line: `{"ok":true}` plus the fields of `body` (an object).
pub fn ok_line(body: Value) -> String {
    let mut obj = Map::new();
    obj.insert("ok".into(), Value::Bool(true));
    if let Value::Object(m) = body {
        for (k, v) in m {
            if k != "ok" {
                obj.insert(k, v);
            }
        }
    }
    format!("{}\n", Value::Object(obj))
}

/// The final failure line.
pub fn err_line(error: &str) -> String {
    format!("{}\n", serde_json::json!({ "ok": false, "error": error }))
}

/// One export in the `status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStatus {
    pub name: String,
    pub path: String,
    pub uuid: String,
    pub size: u64,
    pub sector_size: u32,
    pub read_only: bool,
    /// NBD connections in transmission on this export.
    pub connections: usize,
    /// Thin volumes: bytes allocated; others: the size.
    pub allocated_bytes: u64,
    pub thin: bool,
    /// `null` unless a re-encryption is in progress (or just finished in this daemon).
    pub reencrypt: Option<ReencryptInfo>,
}

/// Re-encryption state of one export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReencryptInfo {
    /// Bytes already under the new key.
    pub watermark: u64,
    pub size: u64,
    /// A background task of this daemon is working on it.
    pub running: bool,
    /// Finished in this daemon (the old data key is destroyed).
    pub finished: bool,
    /// The last failure of a step (retried), if any.
    pub last_error: Option<String>,
}

/// The `status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub pid: u32,
    /// NBD connections in all (including those still negotiating).
    pub connections: usize,
    pub exports: Vec<ExportStatus>,
}

/// The control socket path in effect: the one given, else [`DEFAULT_CONTROL_PATH`] when
/// running as root and its directory exists or could be created (`dir_ready`), else none.
pub fn choose_control_path(
    given: Option<PathBuf>,
    is_root: bool,
    dir_ready: impl FnOnce() -> bool,
) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p),
        None if is_root && dir_ready() => Some(PathBuf::from(DEFAULT_CONTROL_PATH)),
        None => None,
    }
}

/// [`choose_control_path`] for this process: creates `/run/cryptvol` (0700) for root
/// when missing.
pub fn control_path(given: Option<PathBuf>) -> Option<PathBuf> {
    choose_control_path(given, nix::unistd::geteuid().is_root(), || {
        let dir = Path::new(DEFAULT_CONTROL_PATH)
            .parent()
            .unwrap_or(Path::new("/run"));
        if dir.is_dir() {
            return true;
        }
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().mode(0o700).create(dir).is_ok()
    })
}

// ---------------------------------------------------------------------------------------
// Hooks the CLI plugs in (keys and snapshot store live outside the server layer)

/// An error from a hook, shown to the client as it is.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Makes the new data key of an online re-encryption: a fresh DEK, wrapped for every
/// keyslot of the volume (same order), bound to the volume's encryption context. Refuses
/// what the daemon cannot do (e.g. passphrase keyslots) before generating anything.
#[async_trait::async_trait]
pub trait DataKeyMaker: Send + Sync {
    async fn new_data_key(&self, volume: &Volume) -> Result<(Dek, Vec<WrappedDek>), HookError>;
}

/// What a snapshot through the daemon works on.
pub struct SnapshotJob {
    pub export: String,
    pub volume: Arc<Volume>,
    /// The point-in-time view (copy-before-write until it is dropped).
    pub view: SnapshotView,
    /// The store as the client gave it (`file:///DIR`, an absolute directory, `s3://…`).
    pub store: String,
    pub description: String,
    /// Parent snapshot id (`None`: the store's default choice).
    pub parent: Option<String>,
}

/// Takes a snapshot from a view into a store (connected to `crate::snapshot` by the CLI).
/// Reports bytes through `progress` (created hidden by the daemon, total = volume size;
/// the daemon streams its position to the client). Returns what to tell the client (a
/// JSON value, e.g. the snapshot id and counts).
#[async_trait::async_trait]
pub trait SnapshotTaker: Send + Sync {
    async fn take(&self, job: SnapshotJob, progress: &Progress) -> Result<Value, HookError>;
}

/// The hooks of a daemon (`None`: that op answers that it is not available).
#[derive(Clone, Default)]
pub struct ControlHooks {
    pub keys: Option<Arc<dyn DataKeyMaker>>,
    pub snapshots: Option<Arc<dyn SnapshotTaker>>,
}

// ---------------------------------------------------------------------------------------
// Server side (I/O)

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Progress lines are sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A bound control socket.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds the control socket (mode 0600). A stale socket file is replaced; one a live
    /// server answers on is refused ([`ServerError::SocketInUse`]).
    pub async fn bind(path: &Path) -> Result<ControlSocket, ServerError> {
        let spec = ListenerSpec::Unix {
            path: path.to_path_buf(),
            mode: 0o600,
        };
        match Listener::bind(&spec).await? {
            Listener::Unix { listener, path, .. } => Ok(ControlSocket { listener, path }),
            Listener::Tcp(_) => Err(ServerError::NoListeners),
        }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a control connection works with.
pub(crate) struct ControlState {
    pub shared: Arc<Shared>,
    pub jobs: Arc<Jobs>,
    pub hooks: ControlHooks,
}

/// Accepts control connections until shutdown, then removes the socket file and waits
/// for the open connections (each ends promptly at shutdown).
pub(crate) async fn control_loop(sock: ControlSocket, state: Arc<ControlState>) {
    let mut shutdown = state.shared.shutdown.clone();
    let mut conns = tokio::task::JoinSet::new();
    tracing::info!("control socket on {}", sock.path.display());
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = sock.listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                if conns.len() >= 64 {
                    tracing::warn!("too many control connections; closing a new one");
                    continue;
                }
                let st = state.clone();
                conns.spawn(async move { handle(stream, st).await });
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&sock.path);
    drop(sock);
    while conns.join_next().await.is_some() {}
}

/// Reads one line of at most [`MAX_REQUEST_BYTES`]; `Err` with a ready-made message.
async fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, ProtocolError> {
    let (r, _) = stream.split();
    let mut reader = tokio::io::BufReader::new(r).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    match read {
        Err(_) => Err(ProtocolError::BadJson(format!(
            "no complete request line within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(ProtocolError::BadJson(format!("cannot read: {e}"))),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Err(ProtocolError::TooLarge {
            limit: MAX_REQUEST_BYTES,
        }),
        Ok(Ok(_)) => Ok(line),
    }
}

/// Writes one line; `false` when the client is gone.
async fn send(stream: &mut UnixStream, line: &str) -> bool {
    stream.write_all(line.as_bytes()).await.is_ok()
}

async fn handle(mut stream: UnixStream, st: Arc<ControlState>) {
    let req = match read_request(&mut stream)
        .await
        .and_then(|l| parse_request(&l))
    {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("control: refused request: {e}");
            // Drain a little of what is left so the client sees the answer, not a reset.
            let _ = send(&mut stream, &err_line(&e.to_string())).await;
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            return;
        }
    };
    tracing::debug!(op = req.op(), "control request");
    let end = match req {
        Request::Status => Ok(status_body(&st)),
        Request::ReencryptStatus { export } => reencrypt_status(&st, &export),
        Request::Reencrypt { export, wait } => reencrypt(&mut stream, &st, &export, wait).await,
        Request::Snapshot {
            export,
            store,
            description,
            parent,
        } => snapshot(&mut stream, &st, export, store, description, parent).await,
    };
    let line = match end {
        Ok(body) => ok_line(body),
        Err(e) => err_line(&e),
    };
    let _ = send(&mut stream, &line).await;
    let _ = stream.shutdown().await;
}

fn unknown_export(st: &ControlState, name: &str) -> String {
    let names: Vec<String> = st
        .shared
        .exports
        .iter()
        .map(|e| format!("{:?}", e.info.name))
        .collect();
    format!(
        "no export named {:?}; this daemon serves {}",
        shorten(name, 64),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

fn reencrypt_info(volume: &Volume, job: Option<&JobState>) -> Option<ReencryptInfo> {
    let status = volume.reencrypt_status();
    match (status, job) {
        (Some(s), j) => Some(ReencryptInfo {
            watermark: s.watermark,
            size: s.size,
            running: j.is_some_and(|j| j.running),
            finished: false,
            last_error: j.and_then(|j| j.last_error.clone()),
        }),
        (None, Some(j)) if j.finished => Some(ReencryptInfo {
            watermark: j.total,
            size: j.total,
            running: false,
            finished: true,
            last_error: None,
        }),
        (None, _) => None,
    }
}

fn status_body(st: &ControlState) -> Value {
    let exports = st
        .shared
        .exports
        .iter()
        .map(|e| {
            let v = &e.volume;
            let job = st.jobs.state(&e.info.name);
            ExportStatus {
                name: e.info.name.clone(),
                path: v.path().to_string(),
                uuid: v.uuid().to_string(),
                size: v.size(),
                sector_size: v.sector_size(),
                read_only: v.read_only(),
                connections: e.connections(),
                allocated_bytes: v.allocated_bytes(),
                thin: v.is_thin(),
                reencrypt: reencrypt_info(v, job.as_ref()),
            }
        })
        .collect();
    let reply = StatusReply {
        pid: std::process::id(),
        connections: st
            .shared
            .open_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        exports,
    };
    serde_json::to_value(reply).unwrap_or(Value::Null)
}

fn reencrypt_status(st: &ControlState, export: &str) -> Result<Value, String> {
    let e = st
        .shared
        .exports
        .get(export)
        .ok_or_else(|| unknown_export(st, export))?;
    let info = reencrypt_info(&e.volume, st.jobs.state(export).as_ref());
    Ok(serde_json::json!({
        "export": export,
        "in_progress": e.volume.reencrypt_status().is_some(),
        "reencrypt": info,
    }))
}

async fn reencrypt(
    stream: &mut UnixStream,
    st: &Arc<ControlState>,
    export: &str,
    wait: bool,
) -> Result<Value, String> {
    let e = st
        .shared
        .exports
        .get(export)
        .ok_or_else(|| unknown_export(st, export))?;
    let volume = e.volume.clone();
    if volume.read_only() {
        return Err(format!(
            "export {export:?} is served read-only; re-encryption rewrites every block: \
             serve it read-write to re-encrypt it{}",
            if volume.reencrypt_status().is_some() {
                " (a re-encryption is in progress: it resumes by itself then)"
            } else {
                ""
            }
        ));
    }
    let mut rx = match st.jobs.follow(export) {
        Some(rx) => {
            // One re-encryption at a time: a second request is refused (not queued, not
            // silently merged into the running one, which uses a data key generated
            // before this request).
            let s = rx.borrow().clone();
            tracing::info!(
                export,
                "control: re-encryption request refused: one is already running"
            );
            let pct = if s.total == 0 {
                100.0
            } else {
                s.done as f64 * 100.0 / s.total as f64
            };
            return Err(format!(
                "export {export:?} is already being re-encrypted under a new data key \
                 ({pct:.1}% done, {} of {} bytes); one re-encryption at a time: follow it with \
                 `cryptvol reencrypt --status {export}`, and request another one after it \
                 finishes",
                s.done, s.total
            ));
        }
        None if volume.reencrypt_status().is_some() => {
            st.jobs
                .start(export, volume.clone(), st.shared.shutdown.clone())
        }
        None => {
            let keys = st.hooks.keys.clone().ok_or_else(|| {
                "online re-encryption is not available in this daemon".to_string()
            })?;
            let (dek, slots) = keys
                .new_data_key(&volume)
                .await
                .map_err(|e| format!("cannot make the new data key for {export:?}: {e}"))?;
            let vol = volume.clone();
            let name = export.to_string();
            tokio::task::spawn_blocking(move || {
                // The volume layer refuses this while a snapshot is being taken (and a
                // snapshot while a re-encryption runs), atomically.
                vol.reencrypt_begin(dek, slots)
                    .map_err(|e| format!("cannot start re-encrypting {name:?}: {e}"))
            })
            .await
            .map_err(|e| format!("re-encryption start task failed: {e}"))??;
            tracing::info!(export, "online re-encryption started under a new data key");
            st.jobs
                .start(export, volume.clone(), st.shared.shutdown.clone())
        }
    };
    if !wait {
        let s = rx.borrow().clone();
        return Ok(serde_json::json!({
            "export": export,
            "started": true,
            "done": s.finished,
            "watermark": s.done,
            "size": s.total,
        }));
    }
    follow(stream, st, export, &mut rx).await
}

/// Streams the progress of a re-encryption job until it finishes.
async fn follow(
    stream: &mut UnixStream,
    st: &ControlState,
    export: &str,
    rx: &mut watch::Receiver<JobState>,
) -> Result<Value, String> {
    let mut shutdown = st.shared.shutdown.clone();
    loop {
        let s = rx.borrow_and_update().clone();
        if s.finished {
            return Ok(serde_json::json!({ "export": export, "done": true, "size": s.total }));
        }
        if !s.running {
            return Err(format!(
                "the re-encryption of {export:?} stopped at {} of {} bytes (daemon shutting \
                 down); it resumes when the daemon starts again",
                s.done, s.total
            ));
        }
        let ev = ProgressEvent::new("reencrypt", export, s.done, s.total, s.last_error);
        let line = format!("{}\n", serde_json::to_string(&ev).unwrap_or_default());
        if !send(stream, &line).await {
            // The client left; the job goes on.
            return Err("client disconnected".into());
        }
        let stopping = tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return Err(format!("the re-encryption task of {export:?} ended unexpectedly"));
                }
                false
            }
            r = shutdown.wait_for(|s| *s) => r.is_ok(),
        };
        if stopping {
            // The worker stops between steps; report where it got to.
            let _ =
                tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| !s.running)).await;
            continue;
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    }
}

async fn snapshot(
    stream: &mut UnixStream,
    st: &Arc<ControlState>,
    export: String,
    store: String,
    description: String,
    parent: Option<String>,
) -> Result<Value, String> {
    let e = st
        .shared
        .exports
        .get(&export)
        .ok_or_else(|| unknown_export(st, &export))?;
    let taker = st.hooks.snapshots.clone().ok_or_else(|| {
        "snapshots through the daemon are not available in this daemon (no snapshot store \
         support)"
            .to_string()
    })?;
    let volume = e.volume.clone();
    let vol = volume.clone();
    let view = tokio::task::spawn_blocking(move || vol.snapshot_view(SNAPSHOT_CHUNK_SIZE))
        .await
        .map_err(|e| format!("snapshot view task failed: {e}"))?
        .map_err(|e| format!("cannot start a snapshot of {export:?}: {e}"))?;
    tracing::info!(export = %export, store = %store, "snapshot started");
    let total = volume.size();
    let progress = Progress::hidden(total);
    let job = SnapshotJob {
        export: export.clone(),
        volume,
        view,
        store,
        description,
        parent,
    };
    let work = taker.take(job, &progress);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut client_gone = false;
    let mut shutdown = st.shared.shutdown.clone();
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            // Shutdown does not wait for a snapshot (it may take hours to a remote
            // store): it is abandoned, its view dropped (the changed-chunk bits go back
            // to the tracking); no manifest was written, so it does not exist.
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => {
                break Err(HookError::from(
                    "the daemon is shutting down; the snapshot was abandoned (take it again: \
                     chunks already uploaded are not uploaded twice)",
                ));
            }
            _ = tick.tick() => {
                if !client_gone {
                    let ev = ProgressEvent::new("snapshot", &export, progress.done(), total, None);
                    let line = format!("{}\n", serde_json::to_string(&ev).unwrap_or_default());
                    // A client that leaves does not stop the snapshot.
                    client_gone = !send(stream, &line).await;
                }
            }
        }
    };
    match result {
        Ok(v) => {
            tracing::info!(export = %export, "snapshot completed");
            Ok(serde_json::json!({ "export": export, "snapshot": v }))
        }
        Err(e) => {
            tracing::error!(export = %export, "snapshot failed: {e}");
            Err(format!("snapshot of {export:?} failed: {e}"))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client side (blocking; used by the CLI)

/// Errors talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the cryptvol daemon at {path}: {source}. Is `cryptvol serve` running with this control socket (--control PATH, default {DEFAULT_CONTROL_PATH} for root)?")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the daemon closed the connection without an answer")]
    NoAnswer,
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Sends `req` to the daemon at `path`, calls `on_progress` for each progress line, and
/// returns the fields of the final `{"ok":true,...}` line.
pub fn request(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&ProgressEvent),
) -> Result<Map<String, Value>, ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    s.write_all(req.to_line().as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(s);
    loop {
        let mut line = String::new();
        // Bounded: one line of the answer is at most 1 MiB.
        let n = (&mut reader)
            .take(1 << 20)
            .read_line(&mut line)
            .map_err(io)?;
        if n == 0 {
            return Err(ControlError::NoAnswer);
        }
        match parse_reply(&line)? {
            Reply::Progress(ev) => on_progress(&ev),
            Reply::Ok(m) => return Ok(m),
            Reply::Err(e) => return Err(ControlError::Refused(e)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse_request(br#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            parse_request(b"{\"op\":\"reencrypt\",\"export\":\"vol\"}\n").unwrap(),
            Request::Reencrypt {
                export: "vol".into(),
                wait: true
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"reencrypt","export":"vol","wait":false}"#).unwrap(),
            Request::Reencrypt {
                export: "vol".into(),
                wait: false
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"reencrypt-status","export":"a b"}"#).unwrap(),
            Request::ReencryptStatus {
                export: "a b".into()
            }
        );
        assert_eq!(
            parse_request(
                br#"{"op":"snapshot","export":"v","store":"file:///s","description":"nightly","parent":"snap-1"}"#
            )
            .unwrap(),
            Request::Snapshot {
                export: "v".into(),
                store: "file:///s".into(),
                description: "nightly".into(),
                parent: Some("snap-1".into())
            }
        );
        assert_eq!(
            parse_request(br#"{"op":"snapshot","export":"v","store":"/s"}"#).unwrap(),
            Request::Snapshot {
                export: "v".into(),
                store: "/s".into(),
                description: String::new(),
                parent: None
            }
        );
    }

    #[test]
    fn requests_round_trip_through_their_line() {
        let reqs = [
            Request::Status,
            Request::Reencrypt {
                export: "x\"y".into(),
                wait: false,
            },
            Request::ReencryptStatus {
                export: "vol".into(),
            },
            Request::Snapshot {
                export: "v".into(),
                store: "s3://b/p".into(),
                description: "d é".into(),
                parent: None,
            },
        ];
        for r in reqs {
            let line = r.to_line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(parse_request(line.as_bytes()).unwrap(), r);
        }
    }

    #[test]
    fn refuses_malformed_requests_with_clear_errors() {
        let e = |b: &[u8]| parse_request(b).unwrap_err();
        assert_eq!(e(b""), ProtocolError::Empty);
        assert_eq!(e(b"  \n"), ProtocolError::Empty);
        assert!(matches!(e(b"{not json"), ProtocolError::BadJson(_)));
        assert!(matches!(e(&[0xff, 0xfe]), ProtocolError::BadJson(_)));
        assert_eq!(e(b"[1,2]"), ProtocolError::NotAnObject);
        assert_eq!(e(b"\"status\""), ProtocolError::NotAnObject);
        assert_eq!(e(b"{}"), ProtocolError::MissingOp);
        assert_eq!(e(br#"{"op":5}"#), ProtocolError::MissingOp);
        let unknown = e(br#"{"op":"format-disk"}"#);
        assert_eq!(unknown, ProtocolError::UnknownOp("format-disk".into()));
        assert!(unknown.to_string().contains("known ops: status, reencrypt"));
        // Missing and unknown fields, wrong types.
        for bad in [
            &br#"{"op":"reencrypt"}"#[..],
            br#"{"op":"reencrypt","export":"v","force":true}"#,
            br#"{"op":"reencrypt","export":7}"#,
            br#"{"op":"status","export":"v"}"#,
            br#"{"op":"snapshot","export":"v"}"#,
            br#"{"op":"reencrypt","export":"v","wait":"yes"}"#,
        ] {
            assert!(
                matches!(e(bad), ProtocolError::BadFields { .. }),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Field values.
        for (bad, field) in [
            (&br#"{"op":"reencrypt","export":""}"#[..], "export"),
            (br#"{"op":"reencrypt","export":"a\nb"}"#, "export"),
            (br#"{"op":"snapshot","export":"v","store":""}"#, "store"),
            (
                br#"{"op":"snapshot","export":"v","store":"s","parent":""}"#,
                "parent",
            ),
        ] {
            match e(bad) {
                ProtocolError::BadValue { field: f, .. } => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
        let long = format!(
            r#"{{"op":"snapshot","export":"v","store":"s","description":"{}"}}"#,
            "d".repeat(MAX_DESCRIPTION_LEN + 1)
        );
        assert!(matches!(
            e(long.as_bytes()),
            ProtocolError::BadValue {
                field: "description",
                ..
            }
        ));
        // An unknown op is echoed shortened.
        let op = "x".repeat(1000);
        let msg = e(format!(r#"{{"op":"{op}"}}"#).as_bytes()).to_string();
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn refuses_oversized_requests() {
        let big = format!(
            r#"{{"op":"status","pad":"{}"}}"#,
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(
            parse_request(big.as_bytes()).unwrap_err(),
            ProtocolError::TooLarge {
                limit: MAX_REQUEST_BYTES
            }
        );
        let export = "e".repeat(MAX_EXPORT_LEN + 1);
        let r = Request::ReencryptStatus { export };
        assert!(matches!(
            validate(&r),
            Err(ProtocolError::BadValue {
                field: "export",
                ..
            })
        ));
    }

    #[test]
    fn replies_parse() {
        let ev = ProgressEvent::new("reencrypt", "vol", 10, 100, None);
        let line = serde_json::to_string(&ev).unwrap();
        assert!(!line.contains("error"), "{line}");
        assert_eq!(parse_reply(&line).unwrap(), Reply::Progress(ev));
        let ok = ok_line(serde_json::json!({"export": "vol", "ok": false, "done": true}));
        match parse_reply(&ok).unwrap() {
            Reply::Ok(m) => {
                assert_eq!(m["export"], "vol");
                assert_eq!(m["done"], true);
                assert!(!m.contains_key("ok"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_reply(&err_line("no export named \"x\"")).unwrap(),
            Reply::Err("no export named \"x\"".into())
        );
        for bad in [
            "",
            "nope",
            "[]",
            r#"{"event":"progress"}"#,
            r#"{"ok":"yes"}"#,
        ] {
            assert!(
                matches!(parse_reply(bad), Err(ProtocolError::BadReply(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn control_path_defaults_only_for_root_with_a_usable_directory() {
        let given = PathBuf::from("/tmp/x.sock");
        assert_eq!(
            choose_control_path(Some(given.clone()), false, || false),
            Some(given.clone())
        );
        assert_eq!(
            choose_control_path(Some(given.clone()), true, || panic!("not consulted")),
            Some(given)
        );
        assert_eq!(
            choose_control_path(None, true, || true),
            Some(PathBuf::from(DEFAULT_CONTROL_PATH))
        );
        assert_eq!(choose_control_path(None, true, || false), None);
        assert_eq!(choose_control_path(None, false, || true), None);
    }

    #[test]
    fn status_reply_serializes_as_documented() {
        let r = StatusReply {
            pid: 1,
            connections: 2,
            exports: vec![ExportStatus {
                name: "vol".into(),
                path: "/v.img".into(),
                uuid: "u".into(),
                size: 4096,
                sector_size: 4096,
                read_only: false,
                connections: 1,
                allocated_bytes: 0,
                thin: true,
                reencrypt: None,
            }],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["exports"][0]["name"], "vol");
        assert!(v["exports"][0]["reencrypt"].is_null());
        let back: StatusReply = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    // --- The server side, with fakes for the hooks --------------------------------------

    use crate::server::{serve_with, shutdown_handle, Control, Export, Exports, ServerConfig};
    use crate::volume::{OpenOptions, VolumeSpec};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A thin volume in `dir` with one (fake) keyslot and its first sector written (7s).
    pub(crate) fn volume(dir: &Path, size: u64) -> Volume {
        let path = dir.join("vol.img");
        let uuid = uuid::Uuid::new_v4();
        let dek = Dek::generate().unwrap();
        let slot = WrappedDek {
            backend: "local".into(),
            key_id: "mk-test".into(),
            blob: vec![1; 60],
            context: crate::keys::EncryptionContext::for_volume(&uuid),
            params: Default::default(),
        };
        let spec = VolumeSpec {
            size,
            sector_size: 4096,
        };
        let h = crate::volume::create(&path, &spec, uuid, vec![slot], &dek).unwrap();
        let v = Volume::open(&path, &h, dek, OpenOptions::default()).unwrap();
        v.write_at(&[7u8; 4096], 0, false).unwrap();
        v
    }

    struct FakeKeys {
        calls: AtomicUsize,
        refuse: bool,
    }

    #[async_trait::async_trait]
    impl DataKeyMaker for FakeKeys {
        async fn new_data_key(&self, volume: &Volume) -> Result<(Dek, Vec<WrappedDek>), HookError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.refuse {
                return Err("fake: keyslot 1 is a passphrase keyslot".into());
            }
            let _ = volume.uuid();
            Ok((Dek::generate()?, Vec::new()))
        }
    }

    /// Reads every chunk of the view, like the snapshot store will.
    struct FakeTaker;

    #[async_trait::async_trait]
    impl SnapshotTaker for FakeTaker {
        async fn take(&self, job: SnapshotJob, progress: &Progress) -> Result<Value, HookError> {
            let cs = job.view.chunk_size();
            let n = job.view.size().div_ceil(cs);
            let mut first = vec![0u8; cs as usize];
            for i in 0..n {
                let mut buf = vec![0u8; cs as usize];
                job.view.read_chunk(i, &mut buf)?;
                if i == 0 {
                    first = buf;
                }
                progress.advance(cs.min(job.view.size() - i * cs));
            }
            Ok(serde_json::json!({
                "id": "snap-fake",
                "chunks": n,
                "first_byte": first[0],
                "store": job.store,
                "description": job.description,
                "parent": job.parent,
            }))
        }
    }

    fn raw(path: &Path, bytes: &[u8]) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn daemon_answers_requests_and_survives_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = volume(tmp.path(), 3 * SNAPSHOT_CHUNK_SIZE + 4096);
        let exports = Exports::new(vec![Export::new("vol".into(), vol)]);
        let nbd = Listener::bind(&ListenerSpec::Unix {
            path: tmp.path().join("nbd.sock"),
            mode: 0o600,
        })
        .await
        .unwrap();
        let ctl_path = tmp.path().join("ctl.sock");
        let socket = ControlSocket::bind(&ctl_path).await.unwrap();
        // A second daemon cannot take a live control socket.
        assert!(matches!(
            ControlSocket::bind(&ctl_path).await,
            Err(ServerError::SocketInUse(_))
        ));
        let keys = Arc::new(FakeKeys {
            calls: AtomicUsize::new(0),
            refuse: false,
        });
        let control = Control {
            socket: Some(socket),
            hooks: ControlHooks {
                keys: Some(keys.clone()),
                snapshots: Some(Arc::new(FakeTaker)),
            },
        };
        let shutdown = shutdown_handle();
        let server = tokio::spawn(serve_with(
            exports,
            vec![nbd],
            ServerConfig::default(),
            shutdown.clone(),
            control,
        ));
        let p = ctl_path.clone();
        let k = keys.clone();
        tokio::task::spawn_blocking(move || {
            let call = |r: &Request| request(&p, r, |_| {});
            // Garbage first: each gets a clear error, the daemon keeps serving.
            let out = raw(&p, b"{nope\n");
            assert!(
                out.contains("\"ok\":false") && out.contains("not valid JSON"),
                "{out}"
            );
            let out = raw(&p, b"{\"op\":\"frobnicate\"}\n");
            assert!(out.contains("unknown op"), "{out}");
            let big = vec![b'x'; 1 << 20];
            let out = raw(&p, &big);
            assert!(out.contains("too large"), "{out}");
            // Status.
            let m = call(&Request::Status).unwrap();
            let st: StatusReply = serde_json::from_value(Value::Object(m)).unwrap();
            assert_eq!(st.exports.len(), 1);
            assert_eq!(st.exports[0].name, "vol");
            assert_eq!(st.exports[0].connections, 0);
            assert!(st.exports[0].thin && st.exports[0].allocated_bytes > 0);
            assert_eq!(st.exports[0].reencrypt, None);
            // Unknown export.
            let e = call(&Request::ReencryptStatus {
                export: "nope".into(),
            })
            .unwrap_err();
            assert!(
                e.to_string()
                    .contains("no export named \"nope\"; this daemon serves \"vol\""),
                "{e}"
            );
            let m = call(&Request::ReencryptStatus {
                export: "vol".into(),
            })
            .unwrap();
            assert_eq!(m["in_progress"], false);
            // Re-encryption reaches the hook, then the volume (whose stub refuses).
            let e = call(&Request::Reencrypt {
                export: "vol".into(),
                wait: true,
            })
            .unwrap_err();
            assert!(
                e.to_string().contains("cannot start re-encrypting \"vol\""),
                "{e}"
            );
            assert_eq!(k.calls.load(Ordering::SeqCst), 1);
            // Snapshot through the fake store, with progress events.
            let mut events = Vec::new();
            let m = request(
                &p,
                &Request::Snapshot {
                    export: "vol".into(),
                    store: "/tmp/store".into(),
                    description: "nightly".into(),
                    parent: None,
                },
                |ev| events.push(ev.clone()),
            )
            .unwrap();
            assert_eq!(m["export"], "vol");
            assert_eq!(m["snapshot"]["id"], "snap-fake");
            assert_eq!(m["snapshot"]["chunks"], 4);
            assert_eq!(m["snapshot"]["first_byte"], 7);
            assert_eq!(m["snapshot"]["description"], "nightly");
            assert!(events
                .iter()
                .all(|e| e.op == "snapshot" && e.total == 3 * SNAPSHOT_CHUNK_SIZE + 4096));
            // Still serving.
            assert!(call(&Request::Status).is_ok());
        })
        .await
        .unwrap();
        shutdown.shutdown();
        server.await.unwrap().unwrap();
        assert!(!ctl_path.exists(), "control socket removed at shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_of_the_key_hook_reach_the_client() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = volume(tmp.path(), 1 << 20);
        let exports = Exports::new(vec![Export::new("v".into(), vol)]);
        let nbd = Listener::bind(&ListenerSpec::Unix {
            path: tmp.path().join("nbd.sock"),
            mode: 0o600,
        })
        .await
        .unwrap();
        let ctl_path = tmp.path().join("ctl.sock");
        let control = Control {
            socket: Some(ControlSocket::bind(&ctl_path).await.unwrap()),
            hooks: ControlHooks {
                keys: Some(Arc::new(FakeKeys {
                    calls: AtomicUsize::new(0),
                    refuse: true,
                })),
                snapshots: None,
            },
        };
        let shutdown = shutdown_handle();
        let server = tokio::spawn(serve_with(
            exports,
            vec![nbd],
            ServerConfig::default(),
            shutdown.clone(),
            control,
        ));
        let p = ctl_path.clone();
        tokio::task::spawn_blocking(move || {
            let e = request(
                &p,
                &Request::Reencrypt {
                    export: "v".into(),
                    wait: false,
                },
                |_| {},
            )
            .unwrap_err();
            assert!(e.to_string().contains("passphrase keyslot"), "{e}");
            let e = request(
                &p,
                &Request::Snapshot {
                    export: "v".into(),
                    store: "/s".into(),
                    description: String::new(),
                    parent: None,
                },
                |_| {},
            )
            .unwrap_err();
            assert!(e.to_string().contains("not available"), "{e}");
        })
        .await
        .unwrap();
        shutdown.shutdown();
        server.await.unwrap().unwrap();
    }
}
