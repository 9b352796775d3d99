//! The `resize` request as pure types: grow a served export to a size, or by a number
//! of bytes (resolved by the daemon against the size at that instant), and its answer.
//!
//! Wire form: `{"op":"resize","export":NAME,"size":BYTES}` or
//! `{"op":"resize","export":NAME,"add":BYTES}` (exactly one of the two, positive).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::protocol::{ProtocolError, MAX_EXPORT_LEN};

/// The size a `resize` request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The size of the data area afterwards.
    Size(u64),
    /// Bytes to add to the size the export has when the grow runs.
    Add(u64),
}

impl ResizeTo {
    /// The new size of a volume of `current` bytes (`None` on overflow).
    pub fn resolve(self, current: u64) -> Option<u64> {
        match self {
            ResizeTo::Size(s) => Some(s),
            ResizeTo::Add(d) => current.checked_add(d),
        }
    }
}

/// Grow a served export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeRequest {
    pub export: String,
    pub to: ResizeTo,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    #[allow(dead_code)]
    op: String,
    export: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    add: Option<u64>,
}

impl ResizeRequest {
    /// The wire name of the operation.
    pub const OP: &'static str = "resize";

    /// The request as a JSON object (without a newline).
    pub fn to_value(&self) -> Value {
        match self.to {
            ResizeTo::Size(n) => {
                serde_json::json!({ "op": Self::OP, "export": self.export, "size": n })
            }
            ResizeTo::Add(n) => {
                serde_json::json!({ "op": Self::OP, "export": self.export, "add": n })
            }
        }
    }

    /// Parses the fields of a `resize` request.
    pub fn parse(v: Value) -> Result<ResizeRequest, ProtocolError> {
        let bad = |reason: String| ProtocolError::BadFields {
            op: Self::OP.to_string(),
            reason,
        };
        let f: Fields = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        let to = match (f.size, f.add) {
            (Some(s), None) => ResizeTo::Size(s),
            (None, Some(a)) => ResizeTo::Add(a),
            _ => return Err(bad(
                "give exactly one of \"size\" (the new size in bytes) and \"add\" (bytes to add)"
                    .into(),
            )),
        };
        Ok(ResizeRequest {
            export: f.export,
            to,
        })
    }

    /// Checks the export name and that the size is positive.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |field, reason: &str| {
            Err(ProtocolError::BadValue {
                field,
                reason: reason.into(),
            })
        };
        if self.export.is_empty() {
            return bad("export", "it is empty");
        }
        if self.export.len() > MAX_EXPORT_LEN {
            return bad("export", "it is too long");
        }
        if self.export.chars().any(char::is_control) {
            return bad("export", "it contains control characters");
        }
        match self.to {
            ResizeTo::Size(0) => bad("size", "it is zero"),
            ResizeTo::Add(0) => bad("add", "it is zero"),
            _ => Ok(()),
        }
    }
}

/// The answer to a `resize` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeReply {
    pub export: String,
    pub old_size: u64,
    pub new_size: u64,
    /// The allocation map was moved to a larger place.
    pub map_relocated: bool,
    /// NBD connections open when it grew: they keep the size of their handshake.
    pub connections: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_their_wire_form() {
        for to in [ResizeTo::Size(1 << 30), ResizeTo::Add(4096)] {
            let req = ResizeRequest {
                export: "vol".into(),
                to,
            };
            assert_eq!(ResizeRequest::parse(req.to_value()).unwrap(), req);
        }
    }

    #[test]
    fn both_or_neither_size_zero_and_unknown_fields_are_refused() {
        for v in [
            serde_json::json!({"op": "resize", "export": "v", "size": 1, "add": 1}),
            serde_json::json!({"op": "resize", "export": "v"}),
            serde_json::json!({"op": "resize", "export": "v", "size": 1, "force": true}),
            serde_json::json!({"op": "resize", "export": "v", "size": -1}),
        ] {
            assert!(ResizeRequest::parse(v.clone()).is_err(), "{v}");
        }
        let zero =
            ResizeRequest::parse(serde_json::json!({"op": "resize", "export": "v", "add": 0}));
        assert!(zero.unwrap().validate().is_err());
        let ok = ResizeRequest::parse(serde_json::json!({"op": "resize", "export": "v", "add": 1}));
        assert!(ok.unwrap().validate().is_ok());
    }

    #[test]
    fn relative_sizes_resolve_against_the_current_size() {
        assert_eq!(ResizeTo::Add(10).resolve(5), Some(15));
        assert_eq!(ResizeTo::Size(10).resolve(50), Some(10));
        assert_eq!(ResizeTo::Add(u64::MAX).resolve(1), None);
    }
}
