//! The NBD protocol as pure code over bytes: no sockets, no crypto, no keys.
//! The server drives I/O and calls these functions to parse and encode.
//! Spec: ../shared/reference/nbd-proto.md (upstream doc/proto.md).
//!
//! What this server speaks: fixed newstyle (plain newstyle clients may only use
//! `NBD_OPT_EXPORT_NAME`), `NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`/`ABORT`,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT` with the
//! one context `base:allocation`, and `NBD_OPT_STARTTLS` (with the `--tls` modes off, on
//! and require: [`TlsMode`]; the codec only says when to upgrade, the server runs TLS);
//! every other option gets `NBD_REP_ERR_UNSUP`. No extended headers. Transmission uses compact requests; simple replies unless the client
//! negotiated structured replies, in which case READ (and BLOCK_STATUS) are answered with
//! structured chunks ([`structured`]) and the other commands still with simple replies
//! (which the spec allows for replies without payload). Option reply payloads always stay
//! below 4096 bytes (nbd-client refuses larger ones).
//!
//! Authorization is the server's: the [`ExportCatalog`] a negotiation consults is one
//! client's view, and an export it refuses ([`LookupError::Denied`]) is answered with
//! `NBD_REP_ERR_POLICY` and reported in [`OptionOutcome::refusal`].
//!
//! [`client`] holds client-side encoders/decoders for tests, fuzzers and tools.

pub mod client;
pub mod consts;
mod handshake;
mod meta;
pub mod structured;
mod transmission;
mod wire;

pub use handshake::{
    block_size_info, parse_client_flags, parse_option_header, server_greeting, ClientFlags,
    HandshakeError, Negotiated, Negotiation, Next, OptionHeader, OptionOutcome, Refusal, TlsMode,
    MAX_HUMAN_STRING, MAX_NAME_LEN, MAX_OPTION_LEN, MAX_REPLY_PAYLOAD,
};
pub use meta::{MetaContext, BASE_ALLOCATION, BASE_ALLOCATION_ID, STATE_HOLE, STATE_ZERO};
pub use transmission::{
    decode_simple_reply, encode_request, encode_simple_reply, parse_request, transmission_flags,
    validate, validate_negotiated, Command, FrameError, NbdErrno, Rejection, Request, SimpleReply,
    ValidRequest, MAX_PAYLOAD, REQUEST_HEADER_LEN, SIMPLE_REPLY_LEN,
};

/// What the protocol needs to know about an export. No keys, no files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Minimum block size: the smallest request alignment the device serves correctly
    /// (1 for a cryptvol volume, which does read-modify-write). Advertised only to
    /// clients that request `NBD_INFO_BLOCK_SIZE` (see [`block_size_info`]).
    pub min_block: u32,
    /// Preferred block size: the alignment that avoids a performance penalty (the
    /// volume's sector size: smaller or unaligned writes need a read-modify-write).
    pub preferred_block: u32,
    /// Maximum payload (32 MiB).
    pub max_block: u32,
}

/// Why an export name does not give an export this client may open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The server has no export of that name.
    Unknown,
    /// The export exists but this client may not open it (`NBD_REP_ERR_POLICY`). The
    /// reason is for the server's log and audit only; the client is never sent it.
    Denied(String),
}

/// The set of exports a server offers, as one client sees it: an implementation may
/// authorize per client, hiding from [`ExportCatalog::list`] the exports it refuses and
/// answering [`LookupError::Denied`] for them.
pub trait ExportCatalog {
    /// Looks an export up by name (`""` is resolved by the handshake code, not here).
    fn lookup(&self, name: &str) -> Result<ExportInfo, LookupError>;
    /// The exports this client may open, for `NBD_OPT_LIST` and error messages.
    fn list(&self) -> Vec<ExportInfo>;
    /// The name the empty export name stands for: the server's only export, if it has
    /// exactly one, whether or not this client may open it (so the rule does not depend
    /// on who asks). The default implementation suits a catalog that refuses nobody.
    fn default_export(&self) -> Option<String> {
        let mut all = self.list();
        match all.len() {
            1 => all.pop().map(|e| e.name),
            _ => None,
        }
    }
}
