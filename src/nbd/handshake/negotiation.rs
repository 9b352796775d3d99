//! The negotiation state machine: the TLS mode, what has been negotiated so far
//! (structured replies, metadata contexts, TLS) and the dispatch of each option.

use super::encode::push_reply;
use super::greeting::{ClientFlags, OptionHeader};
use super::options::{abort, export_name, info_or_go, list, list_meta_context, meta_request};
use super::outcome::{Next, OptionOutcome};
use super::MAX_OPTION_LEN;
use crate::nbd::consts::*;
use crate::nbd::meta::{meta_context_payload, MetaContext, QueryMode};
use crate::nbd::ExportCatalog;

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
pub(super) struct Selection {
    /// The resolved export name (never `""` unless an export is really called that).
    export: String,
    /// Never empty (a SET that selects nothing leaves no selection).
    contexts: Vec<MetaContext>,
}

/// Negotiation state for one connection.
#[derive(Debug)]
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
    pub(super) fn tls_required(&self) -> bool {
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

    pub(super) fn dispatch(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> OptionOutcome {
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
    pub(super) fn tls_required_error(&mut self, option: u32) -> OptionOutcome {
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
    pub(super) fn starttls(&mut self, data: &[u8]) -> OptionOutcome {
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

    pub(super) fn finish_if_final(&mut self, outcome: OptionOutcome) -> OptionOutcome {
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
    pub(super) fn structured_reply(&mut self, data: &[u8]) -> OptionOutcome {
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
    pub(super) fn set_meta_context(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> OptionOutcome {
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
