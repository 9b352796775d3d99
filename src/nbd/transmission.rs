//! Transmission phase: request parsing, validation and reply encoding.

use super::ExportInfo;

pub const REQUEST_HEADER_LEN: usize = 28;
/// Largest READ/WRITE payload accepted (32 MiB); larger requests end the connection.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// NBD's portable error values: the only ones that go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdErrno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl NbdErrno {
    pub fn wire(self) -> u32 {
        todo!()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Bytes of payload following this header on the wire (WRITE only).
    pub fn payload_len(&self) -> u32 {
        todo!()
    }
}

/// A framing error: the connection must be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    #[error("request payload of {0} bytes exceeds the 32 MiB limit")]
    TooLarge(u32),
}

pub fn parse_request(_b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, FrameError> {
    todo!()
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidRequest {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    Disc,
}

/// A request refused with an error reply (the connection stays up; a WRITE's payload
/// must still be read and discarded by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: NbdErrno,
}

/// Checks flags, range and permissions of a request against an export.
pub fn validate(_req: &Request, _export: &ExportInfo) -> Result<ValidRequest, Rejection> {
    todo!()
}

/// Transmission flags advertised for an export.
pub fn transmission_flags(_export: &ExportInfo) -> u16 {
    todo!()
}

/// A 16-byte simple reply header (a READ's data follows it on success).
pub fn encode_simple_reply(_cookie: u64, _error: Option<NbdErrno>) -> [u8; 16] {
    todo!()
}
