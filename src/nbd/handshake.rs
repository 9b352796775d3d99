//! Fixed-newstyle handshake (server side).
//!
//! The caller reads the client flags and then, for each option, the 16-byte header and the
//! option data (or discards data longer than [`MAX_OPTION_LEN`]), hands them to a
//! [`Negotiation`] and writes the returned bytes. No I/O happens here.
//!
//! Every option reply this module produces has a payload of at most [`MAX_REPLY_PAYLOAD`]
//! bytes: nbd-client (since 2023) refuses option replies of 4096 bytes or more and then loses
//! sync with the stream.
//!
//! Modules: [`greeting`] (greeting, client flags, option headers), [`negotiation`] (the
//! state machine and its dispatch), [`options`] (the stateless option handlers),
//! [`outcome`] (what an option produces), [`parse`] (option data), [`lookup`] (exports
//! through the client's view of the catalog) and [`encode`] (option replies).

mod encode;
mod greeting;
mod lookup;
mod negotiation;
mod options;
mod outcome;
mod parse;

pub use greeting::{
    parse_client_flags, parse_option_header, server_greeting, ClientFlags, HandshakeError,
    OptionHeader,
};
pub use negotiation::{Negotiated, Negotiation, TlsMode};
pub use options::block_size_info;
pub use outcome::{Next, OptionOutcome, Refusal};

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

#[cfg(test)]
mod tests;
