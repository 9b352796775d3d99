//! The first bytes of the handshake: the server greeting, the client flags and the
//! 16-byte option header.

use crate::nbd::consts::*;
use crate::nbd::wire::Reader;

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
