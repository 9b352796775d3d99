//! Fixed-newstyle handshake (server side).
//!
//! The caller reads the client flags and then, for each option, the 16-byte header and the
//! option data (or discards data longer than [`MAX_OPTION_LEN`]), hands them to a
//! [`Negotiation`] and writes the returned bytes. No I/O happens here.
//!
//! Every option reply this module produces has a payload of at most [`MAX_REPLY_PAYLOAD`]
//! bytes: nbd-client (since 2023) refuses option replies of 4096 bytes or more and then loses
//! sync with the stream.

use std::fmt::Write as _;

use super::consts::*;
use super::meta::{meta_context_payload, parse_meta_request, MetaContext, QueryMode};
use super::transmission::{transmission_flags, MAX_PAYLOAD};
use super::wire::Reader;
use super::{ExportCatalog, ExportInfo, LookupError};

/// Largest option payload the server reads; larger ones are skipped and answered with an error.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Largest payload of any option reply this server sends (nbd-client needs `< 4096`).
pub const MAX_REPLY_PAYLOAD: usize = 4095;

/// Longest human-readable string (error message, export description) this server sends.
/// The spec says strings SHOULD be at most 256 bytes.
pub const MAX_HUMAN_STRING: usize = 256;

/// Longest export name the spec allows (strings MUST be at most 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;

/// How much of a client-supplied name is echoed back in an error message.
const ECHOED_NAME_LEN: usize = 64;

/// Length of the zero padding after an `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
const EXPORT_NAME_PADDING: usize = 124;

/// Handshake failures that end the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent unknown or unadvertised client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client sent bad option magic {0:#x}")]
    BadOptionMagic(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// The 18 bytes the server sends first: NBDMAGIC, IHAVEOPT, handshake flags.
///
/// The handshake flags are `FIXED_NEWSTYLE | NO_ZEROES`.
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    let (magic, rest) = out.split_at_mut(8);
    magic.copy_from_slice(&NBDMAGIC.to_be_bytes());
    let (opt, flags) = rest.split_at_mut(8);
    opt.copy_from_slice(&IHAVEOPT.to_be_bytes());
    flags.copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Parses the client's 32-bit flags.
///
/// Any bit other than `C_FIXED_NEWSTYLE` and `C_NO_ZEROES` (both of which the server
/// advertises) is an error: the spec says the server MUST then drop the connection.
///
/// A client that does not set `C_FIXED_NEWSTYLE` is accepted as a plain (non-fixed)
/// newstyle client: [`Negotiation`] then allows only `NBD_OPT_EXPORT_NAME` and closes the
/// connection on any other option, because a non-fixed client cannot parse option replies.
/// Every current client (nbd-client, libnbd, qemu) sets the bit.
pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, HandshakeError> {
    let flags = u32::from_be_bytes(b);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Parses a 16-byte option header: `IHAVEOPT`, u32 option, u32 data length.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, HandshakeError> {
    let mut r = Reader(b);
    let magic = r.u64().unwrap_or_default();
    let option = r.u32().unwrap_or_default();
    let len = r.u32().unwrap_or_default();
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    Ok(OptionHeader { option, len })
}

/// Whether the server offers or insists on TLS (nbdkit's `--tls` meaning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP` (the spec's NOTLS mode).
    #[default]
    Off,
    /// TLS is offered: a client may send `NBD_OPT_STARTTLS`, or negotiate in plaintext.
    On,
    /// TLS is required (the spec's FORCEDTLS mode): until TLS is up, every option other
    /// than `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is answered `NBD_REP_ERR_TLS_REQD`, and
    /// `NBD_OPT_EXPORT_NAME` (which cannot carry an error) closes the connection.
    Require,
}

impl TlsMode {
    /// Parses `off`, `on` or `require`.
    pub fn parse(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!(
                "invalid TLS mode {s:?}: expected off, on or require"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

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
    fn cont(reply: Vec<u8>) -> OptionOutcome {
        OptionOutcome {
            reply,
            next: Next::Continue,
            refusal: None,
        }
    }

    fn close(reply: Vec<u8>) -> OptionOutcome {
        OptionOutcome {
            reply,
            next: Next::Close,
            refusal: None,
        }
    }

    /// The answer to a name that did not resolve: `NBD_REP_ERR_UNKNOWN` with the
    /// message, or `NBD_REP_ERR_POLICY` (recording the refusal); negotiation continues.
    fn not_resolved(option: u32, err: Unresolved) -> OptionOutcome {
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
    fn error(option: u32, reply_type: u32, message: &str) -> OptionOutcome {
        let mut reply = Vec::new();
        push_error(&mut reply, option, reply_type, message);
        OptionOutcome::cont(reply)
    }
}

/// What the handshake settled for the transmission phase (see
/// [`Negotiation::negotiated`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: READ must be answered with structured
    /// reply chunks.
    pub structured_replies: bool,
    /// The context id of `base:allocation`, when the client selected it with
    /// `NBD_OPT_SET_META_CONTEXT` for the export it entered transmission on.
    /// `NBD_CMD_BLOCK_STATUS` is valid only then.
    pub base_allocation: Option<u32>,
}

/// Metadata contexts selected by the last `NBD_OPT_SET_META_CONTEXT`, and for which export.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selection {
    /// The resolved export name (never `""` unless an export is really called that).
    export: String,
    /// Never empty (a SET that selects nothing leaves no selection).
    contexts: Vec<MetaContext>,
}

/// Negotiation state for one connection.
pub struct Negotiation {
    client: ClientFlags,
    /// Set once an outcome with `Next::Transmit` or `Next::Close` was returned; any later
    /// call answers `Next::Close` with nothing to send.
    finished: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// The current metadata context selection. When transmission starts on another export
    /// than the one it was made for, it is dropped (the spec requires the same name).
    selected: Option<Selection>,
    /// Whether TLS is offered or required.
    tls: TlsMode,
    /// The TLS handshake succeeded (after `Next::StartTls`).
    tls_active: bool,
    /// A `Next::StartTls` was returned and [`Negotiation::tls_started`] not yet called.
    tls_pending: bool,
    /// Options refused with `NBD_REP_ERR_TLS_REQD` (or closed for it) so far.
    tls_refusals: u32,
}

impl Negotiation {
    /// A negotiation without TLS (the spec's NOTLS mode).
    pub fn new(client: ClientFlags) -> Negotiation {
        Negotiation::with_tls(client, TlsMode::Off)
    }

    /// A negotiation in which TLS is offered ([`TlsMode::On`]) or required
    /// ([`TlsMode::Require`]).
    pub fn with_tls(client: ClientFlags, tls: TlsMode) -> Negotiation {
        Negotiation {
            client,
            finished: false,
            structured: false,
            selected: None,
            tls,
            tls_active: false,
            tls_pending: false,
            tls_refusals: 0,
        }
    }

    /// Records that the TLS handshake requested by `Next::StartTls` succeeded. Everything
    /// negotiated before it is forgotten, as the spec requires (a man in the middle could
    /// have chosen it).
    pub fn tls_started(&mut self) {
        if self.tls_pending {
            self.tls_pending = false;
            self.tls_active = true;
            self.structured = false;
            self.selected = None;
        }
    }

    /// Whether TLS is up on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// How many options were refused because TLS is required and was not started (the
    /// caller logs a plaintext client that gave up).
    pub fn tls_refusals(&self) -> u32 {
        self.tls_refusals
    }

    /// Whether options must be refused until TLS is up.
    fn tls_required(&self) -> bool {
        self.tls == TlsMode::Require && !self.tls_active
    }

    /// Handles one option whose full payload is `data` (`data.len() == hdr.len`).
    pub fn handle_option(
        &mut self,
        hdr: &OptionHeader,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> OptionOutcome {
        let outcome = self.dispatch(hdr.option, data, catalog);
        self.finish_if_final(outcome)
    }

    /// Handles an option whose payload exceeded [`MAX_OPTION_LEN`] (the caller discarded it).
    ///
    /// Replies `NBD_REP_ERR_TOO_BIG` and keeps negotiating, except: `NBD_OPT_EXPORT_NAME`
    /// cannot carry an error, so the connection closes; `NBD_OPT_ABORT` must be acknowledged
    /// whatever its (ignored) data; a non-fixed-newstyle client cannot parse replies, so the
    /// connection closes.
    pub fn handle_oversized(&mut self, hdr: &OptionHeader) -> OptionOutcome {
        if hdr.option == OPT_SET_META_CONTEXT {
            // A SET replaces the selection even when it fails.
            self.selected = None;
        }
        let outcome =
            if self.finished || hdr.option == OPT_EXPORT_NAME || !self.client.fixed_newstyle {
                if hdr.option == OPT_EXPORT_NAME && self.tls_required() {
                    self.tls_refusals += 1;
                }
                OptionOutcome::close(Vec::new())
            } else if hdr.option == OPT_ABORT {
                abort(hdr.option)
            } else if self.tls_required() && hdr.option != OPT_STARTTLS {
                self.tls_required_error(hdr.option)
            } else {
                let msg = format!(
                    "{} data of {} bytes exceeds this server's {MAX_OPTION_LEN}-byte limit",
                    option_name(hdr.option),
                    hdr.len
                );
                OptionOutcome::error(hdr.option, REP_ERR_TOO_BIG, &msg)
            };
        self.finish_if_final(outcome)
    }

    /// Whether the client negotiated structured replies.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The selected metadata contexts with their ids. After an outcome with
    /// `Next::Transmit`, only those valid for the export being entered.
    pub fn meta_contexts(&self) -> Vec<(u32, MetaContext)> {
        self.selected
            .iter()
            .flat_map(|s| s.contexts.iter().map(|&c| (c.id(), c)))
            .collect()
    }

    /// The id of `base:allocation` if it is selected (see [`Negotiation::meta_contexts`]).
    pub fn base_allocation_id(&self) -> Option<u32> {
        self.meta_contexts()
            .into_iter()
            .find(|&(_, c)| c == MetaContext::BaseAllocation)
            .map(|(id, _)| id)
    }

    /// What the transmission phase needs to know; meaningful after `Next::Transmit`.
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            structured_replies: self.structured,
            base_allocation: self.base_allocation_id(),
        }
    }

    fn dispatch(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
        if self.finished || self.tls_pending {
            return OptionOutcome::close(Vec::new());
        }
        if self.tls_required() && (option == OPT_EXPORT_NAME || !self.client.fixed_newstyle) {
            // EXPORT_NAME cannot carry an error, and a non-fixed-newstyle client can
            // neither parse replies nor start TLS: the spec says to end the session.
            self.tls_refusals += 1;
            return OptionOutcome::close(Vec::new());
        }
        if option == OPT_EXPORT_NAME {
            return export_name(data, self.client, catalog);
        }
        if !self.client.fixed_newstyle {
            // Plain newstyle knows only EXPORT_NAME and has no option replies.
            return OptionOutcome::close(Vec::new());
        }
        if self.tls_required() && option != OPT_STARTTLS && option != OPT_ABORT {
            return self.tls_required_error(option);
        }
        match option {
            OPT_ABORT => abort(option),
            OPT_LIST => list(data, catalog),
            OPT_INFO | OPT_GO => info_or_go(option, data, catalog),
            OPT_STRUCTURED_REPLY => self.structured_reply(data),
            OPT_LIST_META_CONTEXT => list_meta_context(data, catalog),
            OPT_SET_META_CONTEXT => self.set_meta_context(data, catalog),
            OPT_STARTTLS => self.starttls(data),
            _ => {
                let msg = format!(
                    "option {option} ({}) is not supported by this server",
                    option_name(option)
                );
                OptionOutcome::error(option, REP_ERR_UNSUP, &msg)
            }
        }
    }

    /// `NBD_REP_ERR_TLS_REQD` for an option sent in plaintext while TLS is required.
    fn tls_required_error(&mut self, option: u32) -> OptionOutcome {
        self.tls_refusals += 1;
        let msg = format!(
            "this server requires TLS: send NBD_OPT_STARTTLS before {} \
             (e.g. nbds:// URIs, nbd-client -certfile/-keyfile/-cacertfile)",
            option_name(option)
        );
        OptionOutcome::error(option, REP_ERR_TLS_REQD, &msg)
    }

    /// `NBD_OPT_STARTTLS`: no data allowed. Without TLS configured `NBD_REP_ERR_UNSUP`;
    /// once TLS is up `NBD_REP_ERR_INVALID`; otherwise `NBD_REP_ACK` and `Next::StartTls`.
    fn starttls(&mut self, data: &[u8]) -> OptionOutcome {
        const OPT: u32 = OPT_STARTTLS;
        if self.tls == TlsMode::Off {
            return OptionOutcome::error(
                OPT,
                REP_ERR_UNSUP,
                "TLS is not enabled on this server (cryptvol serve --tls on|require); \
                 use a Unix socket or a trusted network",
            );
        }
        if self.tls_active {
            return OptionOutcome::error(OPT, REP_ERR_INVALID, "TLS is already active");
        }
        if !data.is_empty() {
            let msg = format!(
                "NBD_OPT_STARTTLS takes no data, but {} bytes were sent",
                data.len()
            );
            return OptionOutcome::error(OPT, REP_ERR_INVALID, &msg);
        }
        self.tls_pending = true;
        let mut reply = Vec::new();
        push_reply(&mut reply, OPT, REP_ACK, &[]);
        OptionOutcome {
            reply,
            next: Next::StartTls,
            refusal: None,
        }
    }

    fn finish_if_final(&mut self, outcome: OptionOutcome) -> OptionOutcome {
        if outcome.next != Next::Continue && outcome.next != Next::StartTls {
            self.finished = true;
        }
        if let Next::Transmit { export, .. } = &outcome.next {
            if self
                .selected
                .as_ref()
                .is_some_and(|s| s.export != export.name)
            {
                self.selected = None;
            }
        }
        outcome
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: no data allowed; acknowledged (again, if repeated).
    fn structured_reply(&mut self, data: &[u8]) -> OptionOutcome {
        if !data.is_empty() {
            let msg = format!(
                "NBD_OPT_STRUCTURED_REPLY takes no data, but {} bytes were sent",
                data.len()
            );
            return OptionOutcome::error(OPT_STRUCTURED_REPLY, REP_ERR_INVALID, &msg);
        }
        self.structured = true;
        let mut reply = Vec::new();
        push_reply(&mut reply, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        OptionOutcome::cont(reply)
    }

    /// `NBD_OPT_SET_META_CONTEXT`: replaces the selection (also when it fails); one
    /// `NBD_REP_META_CONTEXT` per selected context, then `NBD_REP_ACK`. Needs structured
    /// replies first (`NBD_REP_ERR_INVALID` otherwise, as the spec recommends).
    fn set_meta_context(&mut self, data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
        const OPT: u32 = OPT_SET_META_CONTEXT;
        self.selected = None;
        if !self.structured {
            return OptionOutcome::error(
                OPT,
                REP_ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT needs structured replies: \
                 send NBD_OPT_STRUCTURED_REPLY first",
            );
        }
        let (export, contexts) = match meta_request(OPT, data, QueryMode::Set, catalog) {
            Ok(request) => request,
            Err(outcome) => return *outcome,
        };
        let mut reply = Vec::new();
        for &context in &contexts {
            let payload = meta_context_payload(context.id(), context);
            push_reply(&mut reply, OPT, REP_META_CONTEXT, &payload);
        }
        push_reply(&mut reply, OPT, REP_ACK, &[]);
        if !contexts.is_empty() {
            self.selected = Some(Selection {
                export: export.name,
                contexts,
            });
        }
        OptionOutcome::cont(reply)
    }
}

// ----- Option handlers -----

/// `NBD_OPT_EXPORT_NAME`: the whole payload is the name. No error reply is possible, so any
/// failure closes the connection without sending anything.
/// A refused export closes the connection the same way, recording the refusal.
fn export_name(data: &[u8], client: ClientFlags, catalog: &dyn ExportCatalog) -> OptionOutcome {
    let Ok(name) = check_name(data) else {
        return OptionOutcome::close(Vec::new());
    };
    let export = match resolve_export(name, catalog) {
        Ok(export) => export,
        Err(Unresolved::Unknown(_)) => return OptionOutcome::close(Vec::new()),
        Err(Unresolved::Denied(refusal)) => {
            return OptionOutcome {
                refusal: Some(refusal),
                ..OptionOutcome::close(Vec::new())
            }
        }
    };
    let flags = transmission_flags(&export);
    let mut reply = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    reply.extend_from_slice(&export.size.to_be_bytes());
    reply.extend_from_slice(&flags.to_be_bytes());
    if !client.no_zeroes {
        reply.resize(reply.len() + EXPORT_NAME_PADDING, 0);
    }
    OptionOutcome {
        reply,
        next: Next::Transmit { export, flags },
        refusal: None,
    }
}

/// `NBD_OPT_ABORT`: acknowledge (any data is ignored, as the spec recommends), then close.
fn abort(option: u32) -> OptionOutcome {
    let mut reply = Vec::new();
    push_reply(&mut reply, option, REP_ACK, &[]);
    OptionOutcome::close(reply)
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
///
/// An export whose name alone would not fit in a reply payload under 4096 bytes is left
/// out (names cannot be truncated); descriptions are truncated to [`MAX_HUMAN_STRING`].
fn list(data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    if !data.is_empty() {
        let msg = format!(
            "NBD_OPT_LIST takes no data, but {} bytes were sent",
            data.len()
        );
        return OptionOutcome::error(OPT_LIST, REP_ERR_INVALID, &msg);
    }
    let mut reply = Vec::new();
    for export in catalog.list() {
        let name = export.name.as_bytes();
        let Some(room) = MAX_REPLY_PAYLOAD.checked_sub(4 + name.len()) else {
            continue;
        };
        let Ok(name_len) = u32::try_from(name.len()) else {
            continue;
        };
        let desc = truncate_utf8(&export.description, room.min(MAX_HUMAN_STRING));
        let mut payload = Vec::with_capacity(4 + name.len() + desc.len());
        payload.extend_from_slice(&name_len.to_be_bytes());
        payload.extend_from_slice(name);
        payload.extend_from_slice(desc.as_bytes());
        push_reply(&mut reply, OPT_LIST, REP_SERVER, &payload);
    }
    push_reply(&mut reply, OPT_LIST, REP_ACK, &[]);
    OptionOutcome::cont(reply)
}

/// `NBD_OPT_LIST_META_CONTEXT`: one `NBD_REP_META_CONTEXT` (id 0, as the spec asks) per
/// matching context, then `NBD_REP_ACK`. Allowed without structured replies (the spec only
/// says a client SHOULD NOT ask first; answering is harmless).
fn list_meta_context(data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    const OPT: u32 = OPT_LIST_META_CONTEXT;
    let contexts = match meta_request(OPT, data, QueryMode::List, catalog) {
        Ok((_, contexts)) => contexts,
        Err(outcome) => return *outcome,
    };
    let mut reply = Vec::new();
    for context in contexts {
        push_reply(
            &mut reply,
            OPT,
            REP_META_CONTEXT,
            &meta_context_payload(0, context),
        );
    }
    push_reply(&mut reply, OPT, REP_ACK, &[]);
    OptionOutcome::cont(reply)
}

/// Parses a LIST/SET_META_CONTEXT payload and resolves its export: malformed data or a bad
/// name give `NBD_REP_ERR_INVALID`, an export not served `NBD_REP_ERR_UNKNOWN`, one the
/// client may not open `NBD_REP_ERR_POLICY`.
fn meta_request(
    option: u32,
    data: &[u8],
    mode: QueryMode,
    catalog: &dyn ExportCatalog,
) -> Result<(ExportInfo, Vec<MetaContext>), Box<OptionOutcome>> {
    let invalid = |msg: String| {
        let msg = format!("malformed {} request: {msg}", option_name(option));
        Box::new(OptionOutcome::error(option, REP_ERR_INVALID, &msg))
    };
    let request = parse_meta_request(data, mode).map_err(invalid)?;
    let name = check_name(request.export).map_err(invalid)?;
    let export = resolve_export(name, catalog)
        .map_err(|e| Box::new(OptionOutcome::not_resolved(option, e)))?;
    Ok((export, request.contexts))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`.
///
/// On success: `NBD_INFO_EXPORT`, `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` when requested
/// (the name is omitted if it would not fit; the description if it is empty),
/// `NBD_INFO_BLOCK_SIZE` always (see [`block_size_info`]), then `NBD_REP_ACK`. `GO` then
/// enters transmission. Malformed data gives `NBD_REP_ERR_INVALID`, an unknown export
/// `NBD_REP_ERR_UNKNOWN`, one the client may not open `NBD_REP_ERR_POLICY` (with nothing
/// about the export itself); negotiation continues in all cases. Block size negotiation is
/// never required (no `NBD_REP_ERR_BLOCK_SIZE_REQD`): nbd-client never asks for it.
fn info_or_go(option: u32, data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    let request = match parse_info_request(data) {
        Ok(request) => request,
        Err(msg) => {
            let msg = format!("malformed {} request: {msg}", option_name(option));
            return OptionOutcome::error(option, REP_ERR_INVALID, &msg);
        }
    };
    let export = match resolve_export(request.name, catalog) {
        Ok(export) => export,
        Err(e) => return OptionOutcome::not_resolved(option, e),
    };
    let flags = transmission_flags(&export);
    let wants = |info: u16| request.infos.contains(&info);
    let mut reply = Vec::new();

    let mut payload = Vec::with_capacity(12);
    payload.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    payload.extend_from_slice(&export.size.to_be_bytes());
    payload.extend_from_slice(&flags.to_be_bytes());
    push_reply(&mut reply, option, REP_INFO, &payload);

    if wants(INFO_NAME) && 2 + export.name.len() <= MAX_REPLY_PAYLOAD {
        push_info_string(&mut reply, option, INFO_NAME, &export.name);
    }
    if wants(INFO_DESCRIPTION) && !export.description.is_empty() {
        let desc = truncate_utf8(&export.description, MAX_HUMAN_STRING);
        push_info_string(&mut reply, option, INFO_DESCRIPTION, desc);
    }

    let (min, preferred, max) = block_size_info(&export, wants(INFO_BLOCK_SIZE));
    let mut payload = Vec::with_capacity(14);
    payload.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    payload.extend_from_slice(&min.to_be_bytes());
    payload.extend_from_slice(&preferred.to_be_bytes());
    payload.extend_from_slice(&max.to_be_bytes());
    push_reply(&mut reply, option, REP_INFO, &payload);

    push_reply(&mut reply, option, REP_ACK, &[]);
    let next = if option == OPT_GO {
        Next::Transmit { export, flags }
    } else {
        Next::Continue
    };
    OptionOutcome {
        reply,
        next,
        refusal: None,
    }
}

/// The `NBD_INFO_BLOCK_SIZE` values `(minimum, preferred, maximum payload)` for an export.
///
/// The spec ("Size constraints") lets a server assume its advertised constraints are
/// honoured only by a client that sent `NBD_OPT_GO` *with* an `NBD_INFO_BLOCK_SIZE` request.
/// Every other client must be served under the default constraints, whose minimum block
/// size is 1. This server serves unaligned requests correctly (read-modify-write), so:
///
/// - if the client requested `NBD_INFO_BLOCK_SIZE`, the minimum is the export's
///   `min_block` (its sector size), so cooperative clients (libnbd, qemu) align to it and
///   avoid read-modify-write;
/// - otherwise the minimum is 1: that is the constraint actually in force for that client,
///   and the spec says a server MUST NOT assume an unrequested info is understood.
///
/// The same rule applies to `NBD_OPT_INFO`, because the spec requires an `NBD_OPT_GO` with
/// the same parameters right after a successful `NBD_OPT_INFO` to get the same answer.
///
/// Preferred is the export's `preferred_block`, max its `max_block`, capped at
/// [`MAX_PAYLOAD`] (larger READ/WRITE requests end the connection). Values that break the
/// spec's rules (min a power of two ≤ 64 KiB; preferred a power of two ≥ max(min, 512);
/// max ≥ preferred) are replaced by safe ones rather than sent: libnbd ignores bogus
/// constraints entirely.
pub fn block_size_info(export: &ExportInfo, client_requested: bool) -> (u32, u32, u32) {
    let min = if client_requested
        && export.min_block.is_power_of_two()
        && export.min_block <= 64 * 1024
    {
        export.min_block
    } else {
        1
    };
    let floor = min.max(512);
    let preferred = if export.preferred_block.is_power_of_two()
        && export.preferred_block >= floor
        && export.preferred_block <= MAX_PAYLOAD
    {
        export.preferred_block
    } else {
        floor.max(4096)
    };
    let max = export.max_block.min(MAX_PAYLOAD).max(preferred);
    (min, preferred, max)
}

// ----- Parsing helpers -----

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug)]
struct InfoRequest<'a> {
    name: &'a str,
    infos: Vec<u16>,
}

/// Parses `u32 namelen, name, u16 n, n × u16`, requiring the lengths to add up exactly.
fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, String> {
    if data.len() < 6 {
        return Err(format!("{} bytes of data, need at least 6", data.len()));
    }
    let mut r = Reader(data);
    let name_len = r.u32().unwrap_or_default();
    let name = usize::try_from(name_len)
        .ok()
        .filter(|&n| n <= data.len() - 6)
        .and_then(|n| r.take(n))
        .ok_or_else(|| {
            format!(
                "export name length {name_len} does not fit in {} bytes of data",
                data.len()
            )
        })?;
    let count = r.u16().unwrap_or_default();
    if r.remaining() != usize::from(count) * 2 {
        return Err(format!(
            "{count} information requests announced but {} bytes follow",
            r.remaining()
        ));
    }
    let mut infos = Vec::with_capacity(usize::from(count));
    while let Some(info) = r.u16() {
        infos.push(info);
    }
    let name = check_name(name)?;
    Ok(InfoRequest { name, infos })
}

/// An export name must be UTF-8 without NUL and at most [`MAX_NAME_LEN`] bytes.
fn check_name(name: &[u8]) -> Result<&str, String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "export name is {} bytes, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let name = std::str::from_utf8(name).map_err(|_| "export name is not valid UTF-8")?;
    if name.contains('\0') {
        return Err("export name contains a NUL character".to_owned());
    }
    Ok(name)
}

/// Why [`resolve_export`] found no export to open.
enum Unresolved {
    /// No such export (or no default export): a message for the client.
    Unknown(String),
    /// The export exists but the catalog refuses this client.
    Denied(Refusal),
}

/// What a refused client is told: that policy refuses it, nothing about the export or
/// about what would be allowed.
fn denied_message(export: &str) -> String {
    let shown = truncate_utf8(export, ECHOED_NAME_LEN);
    format!(
        "access to export {shown:?} is not permitted for this client by the server's \
         policy; the refusal was logged on the server"
    )
}

/// Finds the export a client asked for; `""` is the default export, which exists only when
/// the server has exactly one export ([`ExportCatalog::default_export`]).
fn resolve_export(name: &str, catalog: &dyn ExportCatalog) -> Result<ExportInfo, Unresolved> {
    let resolved = if name.is_empty() {
        match catalog.default_export() {
            Some(only) => only,
            None => {
                let visible = catalog.list();
                let mut msg = format!(
                    "no export name given and there is no default export ({} exports); \
                     choose one by name (e.g. nbd-client -N NAME)",
                    visible.len()
                );
                append_available(&mut msg, &visible);
                return Err(Unresolved::Unknown(msg));
            }
        }
    } else {
        name.to_owned()
    };
    match catalog.lookup(&resolved) {
        Ok(export) => Ok(export),
        Err(LookupError::Denied(reason)) => Err(Unresolved::Denied(Refusal {
            export: resolved,
            reason,
        })),
        Err(LookupError::Unknown) => {
            let shown = truncate_utf8(&resolved, ECHOED_NAME_LEN);
            let mut msg = format!("unknown export {shown:?}");
            append_available(&mut msg, &catalog.list());
            Err(Unresolved::Unknown(msg))
        }
    }
}

/// Appends `"; available: a, b"` (or a note that there are none), stopping once the
/// message is longer than any reply will carry.
fn append_available(msg: &mut String, exports: &[ExportInfo]) {
    if exports.is_empty() {
        msg.push_str("; this server has no exports");
        return;
    }
    msg.push_str("; available: ");
    for (i, export) in exports.iter().enumerate() {
        if msg.len() > MAX_HUMAN_STRING {
            break;
        }
        if i > 0 {
            msg.push_str(", ");
        }
        let _ = write!(msg, "{}", truncate_utf8(&export.name, ECHOED_NAME_LEN));
    }
}

// ----- Encoding helpers -----

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Appends one option reply: magic, echoed option, type, length, payload. The payload is
/// cut to [`MAX_REPLY_PAYLOAD`] as a last line of defence; callers size it correctly.
fn push_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_REPLY_PAYLOAD);
    let payload = payload.get(..MAX_REPLY_PAYLOAD).unwrap_or(payload);
    let len = u32::try_from(payload.len()).unwrap_or(0);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an error reply carrying `message`, cut to [`MAX_HUMAN_STRING`] bytes.
fn push_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & REP_FLAG_ERROR != 0);
    let message = if message.len() > MAX_HUMAN_STRING {
        format!("{}...", truncate_utf8(message, MAX_HUMAN_STRING - 3))
    } else {
        message.to_owned()
    };
    push_reply(out, option, reply_type, message.as_bytes());
}

/// Appends an `NBD_REP_INFO` whose payload is an info type followed by a string.
fn push_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let mut payload = Vec::with_capacity(2 + s.len());
    payload.extend_from_slice(&info.to_be_bytes());
    payload.extend_from_slice(s.as_bytes());
    push_reply(out, option, REP_INFO, &payload);
}

#[cfg(test)]
mod tests;
