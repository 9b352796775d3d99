//! What handling one option produces: the reply bytes, what happens next, and any
//! refused export.

use super::encode::push_error;
use super::lookup::{denied_message, Unresolved};
use crate::nbd::consts::*;
use crate::nbd::ExportInfo;

/// What to do after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Keep negotiating.
    Continue,
    /// Send `reply` (the `NBD_REP_ACK` to `NBD_OPT_STARTTLS`) in plaintext, then run the
    /// TLS handshake as the server; on success call [`Negotiation::tls_started`] and keep
    /// negotiating over TLS. A failed TLS handshake must end the connection.
    StartTls,
    /// Enter transmission on this export with these transmission flags.
    Transmit { export: ExportInfo, flags: u16 },
    /// Close the connection (after sending `reply`, if any).
    Close,
}

/// An export the client asked for and was refused by the catalog's policy
/// ([`LookupError::Denied`]), for the server to log and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The export's name as resolved (never `""` unless an export is really called that).
    pub export: String,
    /// The catalog's reason (never sent to the client).
    pub reason: String,
}

/// Bytes to send and what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionOutcome {
    pub reply: Vec<u8>,
    pub next: Next,
    /// Set when this option asked for an export the client may not open.
    pub refusal: Option<Refusal>,
}

impl OptionOutcome {
    pub(super) fn cont(reply: Vec<u8>) -> OptionOutcome {
        OptionOutcome {
            reply,
            next: Next::Continue,
            refusal: None,
        }
    }

    pub(super) fn close(reply: Vec<u8>) -> OptionOutcome {
        OptionOutcome {
            reply,
            next: Next::Close,
            refusal: None,
        }
    }

    /// The answer to a name that did not resolve: `NBD_REP_ERR_UNKNOWN` with the
    /// message, or `NBD_REP_ERR_POLICY` (recording the refusal); negotiation continues.
    pub(super) fn not_resolved(option: u32, err: Unresolved) -> OptionOutcome {
        match err {
            Unresolved::Unknown(msg) => OptionOutcome::error(option, REP_ERR_UNKNOWN, &msg),
            Unresolved::Denied(refusal) => {
                let msg = denied_message(&refusal.export);
                OptionOutcome {
                    refusal: Some(refusal),
                    ..OptionOutcome::error(option, REP_ERR_POLICY, &msg)
                }
            }
        }
    }

    /// One error reply, then keep negotiating.
    pub(super) fn error(option: u32, reply_type: u32, message: &str) -> OptionOutcome {
        let mut reply = Vec::new();
        push_error(&mut reply, option, reply_type, message);
        OptionOutcome::cont(reply)
    }
}
