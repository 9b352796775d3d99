//! The live export requests as pure types: `export-add`, `export-remove`, `export-list`
//! (parsing, validation, their wire form) and the listing they answer with.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::protocol::{ProtocolError, MAX_EXPORT_LEN};

/// Longest volume path in an `export-add` request.
pub const MAX_PATH_LEN: usize = 4096;
/// Most entries of one `allow_*` list in an `export-add` request.
pub const MAX_ALLOW_ENTRIES: usize = 64;
/// Longest entry of an `allow_*` list (a user, group, certificate subject or SAN).
pub const MAX_ALLOW_LEN: usize = 1024;

/// What an export line of the config file says, as `export-add` carries it. User and
/// group names are resolved by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportAdd {
    pub name: String,
    /// The volume file (absolute: the daemon's working directory is not the client's).
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub discard: bool,
    #[serde(default)]
    pub allow_uid: Vec<String>,
    #[serde(default)]
    pub allow_gid: Vec<String>,
    #[serde(default)]
    pub allow_tls_subject: Vec<String>,
    #[serde(default)]
    pub allow_tls_san: Vec<String>,
    #[serde(default)]
    pub allow_anyone: bool,
}

/// One of the live export requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportsRequest {
    /// Unlock a volume and serve it under a new name.
    Add(ExportAdd),
    /// Stop serving an export (`force`: even with clients connected).
    Remove { name: String, force: bool },
    /// The exports served now.
    List,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveFields {
    #[allow(dead_code)]
    op: String,
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListFields {
    #[allow(dead_code)]
    op: String,
}

impl ExportsRequest {
    /// The wire names of these operations.
    pub const OPS: [&'static str; 3] = ["export-add", "export-remove", "export-list"];

    /// The wire name of the operation.
    pub fn op(&self) -> &'static str {
        match self {
            ExportsRequest::Add(_) => "export-add",
            ExportsRequest::Remove { .. } => "export-remove",
            ExportsRequest::List => "export-list",
        }
    }

    /// The request as a JSON object (without a newline).
    pub fn to_value(&self) -> Value {
        match self {
            ExportsRequest::Add(a) => {
                let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("op".into(), "export-add".into());
                }
                v
            }
            ExportsRequest::Remove { name, force } => {
                serde_json::json!({ "op": "export-remove", "name": name, "force": force })
            }
            ExportsRequest::List => serde_json::json!({ "op": "export-list" }),
        }
    }

    /// Parses the fields of one of [`Self::OPS`]; `None` for another op.
    pub fn parse(op: &str, v: Value) -> Option<Result<ExportsRequest, ProtocolError>> {
        let bad = |e: serde_json::Error| ProtocolError::BadFields {
            op: op.to_string(),
            reason: e.to_string(),
        };
        let parsed = match op {
            "export-add" => serde_json::from_value::<ExportAdd>(without_op(v))
                .map(ExportsRequest::Add)
                .map_err(bad),
            "export-remove" => serde_json::from_value::<RemoveFields>(v)
                .map(|f| ExportsRequest::Remove {
                    name: f.name,
                    force: f.force,
                })
                .map_err(bad),
            "export-list" => serde_json::from_value::<ListFields>(v)
                .map(|_| ExportsRequest::List)
                .map_err(bad),
            _ => return None,
        };
        Some(parsed)
    }

    /// Checks lengths, counts and characters.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            ExportsRequest::List => Ok(()),
            ExportsRequest::Remove { name, .. } => check("name", name, MAX_EXPORT_LEN),
            ExportsRequest::Add(a) => validate_add(a),
        }
    }
}

/// The request object without its `op` (the fields `ExportAdd` knows are all the rest).
fn without_op(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.remove("op");
    }
    v
}

fn validate_add(a: &ExportAdd) -> Result<(), ProtocolError> {
    check("name", &a.name, MAX_EXPORT_LEN)?;
    check("path", &a.path, MAX_PATH_LEN)?;
    if !a.path.starts_with('/') {
        return Err(ProtocolError::BadValue {
            field: "path",
            reason: "it is not an absolute path (the daemon's working directory is not yours)"
                .into(),
        });
    }
    for (field, list) in [
        ("allow_uid", &a.allow_uid),
        ("allow_gid", &a.allow_gid),
        ("allow_tls_subject", &a.allow_tls_subject),
        ("allow_tls_san", &a.allow_tls_san),
    ] {
        if list.len() > MAX_ALLOW_ENTRIES {
            return Err(ProtocolError::BadValue {
                field,
                reason: format!("more than {MAX_ALLOW_ENTRIES} entries"),
            });
        }
        for entry in list {
            check(field, entry, MAX_ALLOW_LEN)?;
        }
    }
    Ok(())
}

fn check(field: &'static str, s: &str, max: usize) -> Result<(), ProtocolError> {
    let reason = if s.is_empty() {
        "it is empty".to_string()
    } else if s.len() > max {
        format!("it is longer than {max} bytes")
    } else if s.chars().any(char::is_control) {
        "it contains control characters".to_string()
    } else {
        return Ok(());
    };
    Err(ProtocolError::BadValue { field, reason })
}

/// One export in the `export-list` answer (`{"exports": [...]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportEntry {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub read_only: bool,
    /// NBD connections in transmission on this export.
    pub connections: usize,
}

/// The `export-list` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportList {
    pub exports: Vec<ExportEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(name: &str, path: &str) -> ExportsRequest {
        ExportsRequest::Add(ExportAdd {
            name: name.into(),
            path: path.into(),
            read_only: true,
            allow_uid: vec!["1000".into()],
            ..ExportAdd::default()
        })
    }

    #[test]
    fn requests_round_trip_through_their_wire_form() {
        for req in [
            add("b", "/srv/b.img"),
            ExportsRequest::Remove {
                name: "b".into(),
                force: true,
            },
            ExportsRequest::List,
        ] {
            let v = req.to_value();
            let op = v["op"].as_str().unwrap().to_string();
            assert_eq!(op, req.op());
            assert_eq!(ExportsRequest::parse(&op, v).unwrap().unwrap(), req);
        }
    }

    #[test]
    fn relative_paths_empty_names_and_long_lists_are_refused() {
        assert!(add("b", "b.img").validate().is_err());
        assert!(add("", "/b.img").validate().is_err());
        assert!(add("a\nb", "/b.img").validate().is_err());
        let mut long = ExportAdd {
            name: "b".into(),
            path: "/b.img".into(),
            ..ExportAdd::default()
        };
        long.allow_gid = vec!["g".into(); MAX_ALLOW_ENTRIES + 1];
        assert!(ExportsRequest::Add(long).validate().is_err());
        assert!(add("b", "/b.img").validate().is_ok());
    }

    #[test]
    fn unknown_fields_and_other_ops_are_told_apart() {
        let v = serde_json::json!({"op": "export-remove", "name": "b", "extra": 1});
        assert!(ExportsRequest::parse("export-remove", v).unwrap().is_err());
        assert!(ExportsRequest::parse("status", serde_json::json!({})).is_none());
    }
}
