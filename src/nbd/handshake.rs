//! Fixed-newstyle handshake (server side).

use super::{ExportCatalog, ExportInfo};

/// Largest option payload the server reads; larger ones are skipped and answered with an error.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

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
pub fn server_greeting() -> [u8; 18] {
    todo!()
}

pub fn parse_client_flags(_b: [u8; 4]) -> Result<ClientFlags, HandshakeError> {
    todo!()
}

pub fn parse_option_header(_b: &[u8; 16]) -> Result<OptionHeader, HandshakeError> {
    todo!()
}

/// What to do after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Keep negotiating.
    Continue,
    /// Enter transmission on this export with these transmission flags.
    Transmit { export: ExportInfo, flags: u16 },
    /// Close the connection (after sending `reply`, if any).
    Close,
}

/// Bytes to send and what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionOutcome {
    pub reply: Vec<u8>,
    pub next: Next,
}

/// Negotiation state for one connection.
pub struct Negotiation {
    _p: (),
}

impl Negotiation {
    pub fn new(_client: ClientFlags) -> Negotiation {
        todo!()
    }
    /// Handles one option whose full payload is `data` (`data.len() == hdr.len`).
    pub fn handle_option(
        &mut self,
        _hdr: &OptionHeader,
        _data: &[u8],
        _catalog: &dyn ExportCatalog,
    ) -> OptionOutcome {
        todo!()
    }
    /// Handles an option whose payload exceeded [`MAX_OPTION_LEN`] (the caller discarded it).
    pub fn handle_oversized(&mut self, _hdr: &OptionHeader) -> OptionOutcome {
        todo!()
    }
    /// Whether the client negotiated structured replies.
    pub fn structured_replies(&self) -> bool {
        todo!()
    }
}
