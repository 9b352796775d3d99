//! Transmission phase: request parsing, validation and simple reply encoding.
//!
//! Only compact (28-byte) requests: extended headers are not negotiated. Structured reply
//! chunks (when negotiated) are encoded by [`super::structured`].

use std::io;

use super::consts::*;
use super::handshake::Negotiated;
use super::wire::Reader;
use super::ExportInfo;

pub const REQUEST_HEADER_LEN: usize = 28;
/// Largest READ/WRITE payload accepted (32 MiB); larger requests end the connection.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

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
    /// Every value, for tests and exhaustive tables.
    pub const ALL: [NbdErrno; 8] = [
        NbdErrno::Perm,
        NbdErrno::Io,
        NbdErrno::NoMem,
        NbdErrno::Inval,
        NbdErrno::NoSpc,
        NbdErrno::Overflow,
        NbdErrno::NotSup,
        NbdErrno::Shutdown,
    ];

    /// The value of the reply's error field.
    pub fn wire(self) -> u32 {
        match self {
            NbdErrno::Perm => EPERM,
            NbdErrno::Io => EIO,
            NbdErrno::NoMem => ENOMEM,
            NbdErrno::Inval => EINVAL,
            NbdErrno::NoSpc => ENOSPC,
            NbdErrno::Overflow => EOVERFLOW,
            NbdErrno::NotSup => ENOTSUP,
            NbdErrno::Shutdown => ESHUTDOWN,
        }
    }

    /// The error for a wire value; `None` for 0 and for values the spec does not define.
    pub fn from_wire(value: u32) -> Option<NbdErrno> {
        NbdErrno::ALL.into_iter().find(|e| e.wire() == value)
    }

    /// The spec's name, e.g. `"NBD_EINVAL"`, for logs.
    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::Perm => "NBD_EPERM",
            NbdErrno::Io => "NBD_EIO",
            NbdErrno::NoMem => "NBD_ENOMEM",
            NbdErrno::Inval => "NBD_EINVAL",
            NbdErrno::NoSpc => "NBD_ENOSPC",
            NbdErrno::Overflow => "NBD_EOVERFLOW",
            NbdErrno::NotSup => "NBD_ENOTSUP",
            NbdErrno::Shutdown => "NBD_ESHUTDOWN",
        }
    }

    /// Maps a host I/O error to a portable value, as the spec asks (never pass raw errno
    /// through). `EDQUOT`/`EFBIG` become `ENOSPC`; `EACCES`/`EROFS` become `EPERM`.
    /// `EOVERFLOW` and `ENOTSUP` are reserved by the spec for specific cases, so a host
    /// error with those codes becomes `EINVAL` / `EIO`. Anything unrecognised is `EIO`.
    pub fn from_io_error(err: &io::Error) -> NbdErrno {
        if let Some(code) = err.raw_os_error() {
            match code {
                libc::EPERM | libc::EACCES | libc::EROFS => return NbdErrno::Perm,
                libc::ENOMEM => return NbdErrno::NoMem,
                libc::EINVAL | libc::EOVERFLOW => return NbdErrno::Inval,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => return NbdErrno::NoSpc,
                libc::ESHUTDOWN => return NbdErrno::Shutdown,
                _ => {}
            }
        }
        match err.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NbdErrno::Perm,
            io::ErrorKind::OutOfMemory => NbdErrno::NoMem,
            io::ErrorKind::InvalidInput => NbdErrno::Inval,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => NbdErrno::NoSpc,
            io::ErrorKind::FileTooLarge => NbdErrno::NoSpc,
            _ => NbdErrno::Io,
        }
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

impl Command {
    /// The command for a wire `type` value.
    pub fn from_wire(value: u16) -> Command {
        match value {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The wire `type` value. `Unknown(n)` gives `n` back, so an `Unknown` holding a
    /// known number encodes as that known command.
    pub fn wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(other) => other,
        }
    }
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
        match self.command {
            Command::Write => self.len,
            _ => 0,
        }
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

/// Parses a 28-byte request header.
///
/// A READ or WRITE longer than [`MAX_PAYLOAD`] is a framing error (a WRITE's payload could
/// not be skipped without reading it, and the spec lets a server treat payloads over 32 MiB
/// as denial of service). Payload-less commands (TRIM, WRITE_ZEROES, CACHE, ...) may have
/// any 32-bit length.
pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, FrameError> {
    let mut r = Reader(b);
    // The header has a fixed size, so none of these reads can fail.
    let magic = r.u32().unwrap_or_default();
    let flags = r.u16().unwrap_or_default();
    let kind = r.u16().unwrap_or_default();
    let cookie = r.u64().unwrap_or_default();
    let offset = r.u64().unwrap_or_default();
    let len = r.u32().unwrap_or_default();
    if magic != REQUEST_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let request = Request {
        flags,
        command: Command::from_wire(kind),
        cookie,
        offset,
        len,
    };
    if matches!(request.command, Command::Read | Command::Write) && len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    Ok(request)
}

/// Encodes a request header (client side; for tests, fuzzers and tools).
pub fn encode_request(req: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    let fields: [&[u8]; 6] = [
        &REQUEST_MAGIC.to_be_bytes(),
        &req.flags.to_be_bytes(),
        &req.command.wire().to_be_bytes(),
        &req.cookie.to_be_bytes(),
        &req.offset.to_be_bytes(),
        &req.len.to_be_bytes(),
    ];
    let mut rest: &mut [u8] = &mut out;
    for field in fields {
        let (head, tail) = rest.split_at_mut(field.len());
        head.copy_from_slice(field);
        rest = tail;
    }
    out
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
    /// Only with a negotiated metadata context; `len > 0`.
    BlockStatus {
        offset: u64,
        len: u32,
        /// `NBD_CMD_FLAG_REQ_ONE`: exactly one descriptor per context, within the request.
        req_one: bool,
    },
    Disc,
}

/// A request refused with an error reply (the connection stays up; a WRITE's payload
/// must still be read and discarded by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: NbdErrno,
}

/// Checks flags, range and permissions of a request against an export, for a connection
/// that negotiated nothing beyond the baseline (no structured replies, no metadata
/// context): [`validate_negotiated`] with [`Negotiated::default`].
pub fn validate(req: &Request, export: &ExportInfo) -> Result<ValidRequest, Rejection> {
    validate_negotiated(req, export, &Negotiated::default())
}

/// Checks flags, range and permissions of a request against an export and what the
/// handshake negotiated.
///
/// Checks, in this order (the spec fixes the error values but not the order):
///
/// 1. `DISC` is always accepted, whatever its flags/offset/length: it has no reply, so an
///    error could not be reported anyway.
/// 2. Unknown commands, and `BLOCK_STATUS` without a negotiated metadata context (the
///    spec: SHOULD reply `NBD_EINVAL`) → `EINVAL`.
/// 3. Flags: `FUA` is accepted on every command (the spec says a server advertising
///    `SEND_FUA` MUST accept it on all commands, since clients set it on non-writes);
///    `NO_HOLE` only on `WRITE_ZEROES`; `REQ_ONE` only on `BLOCK_STATUS`; `FAST_ZERO` is
///    refused with `EINVAL` because `SEND_FAST_ZERO` is not advertised (the spec: SHOULD
///    fail with `NBD_EINVAL`, SHOULD NOT use `ENOTSUP`); `DF` needs `SEND_DF`, which is not
///    advertised; any other bit is unknown → `EINVAL`.
/// 4. WRITE, TRIM, WRITE_ZEROES on a read-only export → `EPERM`.
/// 5. `FLUSH` with a nonzero offset or length (reserved, MUST be zero) → `EINVAL`.
/// 6. Range: `offset + len` overflowing or past the export size → `ENOSPC` for WRITE and
///    WRITE_ZEROES, `EINVAL` for READ, TRIM, CACHE and BLOCK_STATUS. A zero length is valid
///    when `offset <= size` (the server replies success), except for `BLOCK_STATUS`: its
///    reply needs at least one descriptor of nonzero length, so a zero length → `EINVAL`.
/// 7. A READ or WRITE longer than [`MAX_PAYLOAD`] → `EINVAL` (cannot come from
///    [`parse_request`], which rejects it as a framing error).
///
/// Alignment to the export's minimum block size is *not* checked: unaligned requests are
/// served by read-modify-write, which the spec allows.
pub fn validate_negotiated(
    req: &Request,
    export: &ExportInfo,
    negotiated: &Negotiated,
) -> Result<ValidRequest, Rejection> {
    let reject = |errno| Err(Rejection { errno });
    let allowed_flags = match req.command {
        Command::Disc => return Ok(ValidRequest::Disc),
        Command::Unknown(_) => return reject(NbdErrno::Inval),
        Command::BlockStatus if negotiated.base_allocation.is_none() => {
            return reject(NbdErrno::Inval)
        }
        Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::Cache => {
            CMD_FLAG_FUA
        }
    };
    if req.flags & !allowed_flags != 0 {
        return reject(NbdErrno::Inval);
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && export.read_only {
        return reject(NbdErrno::Perm);
    }
    if req.command == Command::Flush {
        return if req.offset == 0 && req.len == 0 {
            Ok(ValidRequest::Flush)
        } else {
            reject(NbdErrno::Inval)
        };
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= export.size);
    if !in_range {
        return match req.command {
            Command::Write | Command::WriteZeroes => reject(NbdErrno::NoSpc),
            _ => reject(NbdErrno::Inval),
        };
    }
    let (offset, len) = (req.offset, req.len);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.command {
        Command::Read | Command::Write if len > MAX_PAYLOAD => reject(NbdErrno::Inval),
        Command::BlockStatus if len == 0 => reject(NbdErrno::Inval),
        Command::BlockStatus => Ok(ValidRequest::BlockStatus {
            offset,
            len,
            req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
        }),
        Command::Read => Ok(ValidRequest::Read { offset, len }),
        Command::Write => Ok(ValidRequest::Write { offset, len, fua }),
        Command::Trim => Ok(ValidRequest::Trim { offset, len, fua }),
        Command::Cache => Ok(ValidRequest::Cache { offset, len }),
        Command::WriteZeroes => Ok(ValidRequest::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
        }),
        // Handled above; kept total without a panic.
        Command::Disc => Ok(ValidRequest::Disc),
        Command::Flush => Ok(ValidRequest::Flush),
        Command::Unknown(_) => reject(NbdErrno::Inval),
    }
}

/// Transmission flags advertised for an export.
///
/// `HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_CACHE | CAN_MULTI_CONN`, plus `SEND_TRIM |
/// SEND_WRITE_ZEROES` when writable, or `READ_ONLY` when read-only: the spec says a server
/// MUST NOT advertise features it does not support, and on a read-only export TRIM and
/// WRITE_ZEROES can only fail. FLUSH and FUA stay advertised on read-only exports (they
/// are harmless no-ops there). `CAN_MULTI_CONN` assumes the server keeps no
/// per-connection write cache (one shared backing file), which the server layer must
/// uphold. `SEND_DF` needs structured replies and `SEND_FAST_ZERO` is not offered.
pub fn transmission_flags(export: &ExportInfo) -> u16 {
    let base = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    let base = base | FLAG_CAN_MULTI_CONN;
    if export.read_only {
        base | FLAG_READ_ONLY
    } else {
        base | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    }
}

/// A 16-byte simple reply header (a READ's data follows it on success).
pub fn encode_simple_reply(cookie: u64, error: Option<NbdErrno>) -> [u8; 16] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    let (magic, rest) = out.split_at_mut(4);
    magic.copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    let (err, handle) = rest.split_at_mut(4);
    err.copy_from_slice(&error.map_or(0, NbdErrno::wire).to_be_bytes());
    handle.copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A decoded simple reply header (client side; for tests and tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// The raw error field (0 on success).
    pub error: u32,
    pub cookie: u64,
}

/// Decodes a simple reply header; `None` if the magic is wrong.
pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Option<SimpleReply> {
    let mut r = Reader(b);
    let magic = r.u32()?;
    let error = r.u32()?;
    let cookie = r.u64()?;
    (magic == SIMPLE_REPLY_MAGIC).then_some(SimpleReply { error, cookie })
}

#[cfg(test)]
mod tests;
