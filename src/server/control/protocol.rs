//! The control protocol as pure types and functions: requests (parsing, validation,
//! their wire line), progress events, replies and the status document.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::exports_protocol::ExportsRequest;
use super::resize_protocol::ResizeRequest;

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
pub const OPS: [&str; 8] = [
    "status",
    "reencrypt",
    "reencrypt-status",
    "snapshot",
    "export-add",
    "export-remove",
    "export-list",
    "resize",
];

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
    /// Live export management: `export-add`, `export-remove`, `export-list`.
    Exports(ExportsRequest),
    /// Grow a served export (`resize`).
    Resize(ResizeRequest),
}

impl Request {
    /// The wire name of the operation.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reencrypt { .. } => "reencrypt",
            Request::ReencryptStatus { .. } => "reencrypt-status",
            Request::Snapshot { .. } => "snapshot",
            Request::Exports(r) => r.op(),
            Request::Resize(_) => ResizeRequest::OP,
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
            Request::Exports(r) => r.to_value(),
            Request::Resize(r) => r.to_value(),
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
        ResizeRequest::OP => Request::Resize(ResizeRequest::parse(v)?),
        other => match ExportsRequest::parse(other, v) {
            Some(r) => Request::Exports(r?),
            None => return Err(ProtocolError::UnknownOp(shorten(&op, 64))),
        },
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
        Request::Exports(r) => r.validate(),
        Request::Resize(r) => r.validate(),
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
pub(super) fn shorten(s: &str, max: usize) -> String {
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
