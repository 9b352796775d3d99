//! A small blocking NBD client, for `cryptvol import` (reading any NBD export, e.g. a qcow2
//! image served by `qemu-nbd`) and `cryptvol export` (writing to one).
//!
//! It speaks fixed newstyle, `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` when the
//! server does not know GO) with an `NBD_INFO_BLOCK_SIZE` request, and then simple replies
//! only: structured replies are never negotiated, so every server must answer with simple
//! replies. One request is in flight at a time; READ and WRITE are split into requests of
//! at most [`REQUEST_SIZE`] bytes (less when the server's maximum block size is smaller).
//!
//! The wire encoding comes from the pure codec in [`crate::nbd`]; this module owns the
//! sockets. Every length a server sends is bounded before anything is allocated.

mod uri;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub use uri::{NbdAddr, NbdUri, DEFAULT_PORT};

use crate::nbd::client::{
    decode_option_replies, encode_client_flags, encode_info_data, encode_option, OptionReply,
};
use crate::nbd::consts::*;
use crate::nbd::{
    decode_simple_reply, encode_request, ClientFlags, Command, NbdErrno, Request, MAX_NAME_LEN,
    SIMPLE_REPLY_LEN,
};

/// Largest READ/WRITE request this client sends.
pub const REQUEST_SIZE: u32 = 4 << 20;
/// Maximum payload assumed when the server does not advertise one (the spec's 32 MiB).
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;
/// Largest option reply payload accepted (servers send a few hundred bytes).
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// A server that does not answer for this long is treated as dead.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// The oldstyle magic (after NBDMAGIC): servers that only speak oldstyle are refused.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Padding after an `NBD_OPT_EXPORT_NAME` reply when `NO_ZEROES` is not in effect.
const EXPORT_NAME_PADDING: usize = 124;
/// How much of a server's error message is shown.
const MAX_MESSAGE: usize = 256;

/// Errors of the NBD client. Each names the server (as a URI) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error("bad NBD URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("cannot connect to the NBD server {server}: {err}")]
    Connect { server: String, err: io::Error },
    #[error("NBD server {server}: {context}: {err}")]
    Io {
        server: String,
        context: String,
        err: io::Error,
    },
    #[error("NBD server {server}: protocol error: {detail}")]
    Protocol { server: String, detail: String },
    #[error("the NBD server {server} has no export named {export:?}{message} (nbdinfo --list shows the exports)")]
    NoSuchExport {
        server: String,
        export: String,
        message: String,
    },
    #[error("the NBD server {server} refused export {export:?}: {reason}{message}")]
    Refused {
        server: String,
        export: String,
        reason: String,
        message: String,
    },
    #[error("NBD server {server}: {op} of {len} bytes at offset {offset} failed: {error}")]
    Request {
        server: String,
        op: &'static str,
        offset: u64,
        len: u64,
        error: String,
    },
    #[error("the NBD export {server} is read-only")]
    ReadOnly { server: String },
    #[error(
        "request [{offset}, +{len}) lies beyond the end of the NBD export {server} ({size} bytes)"
    )]
    OutOfRange {
        server: String,
        offset: u64,
        len: u64,
        size: u64,
    },
}

/// The socket: TCP or Unix.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &NbdAddr) -> io::Result<Stream> {
        let s = match addr {
            NbdAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Tcp(s)
            }
            NbdAddr::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Unix(s)
            }
        };
        Ok(s)
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the server said about the export during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportDetails {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints `(minimum, preferred, maximum)`, when the server sent valid ones.
    pub block_size: Option<(u32, u32, u32)>,
}

/// A connection to one export, in the transmission phase.
pub struct NbdClient {
    stream: Stream,
    server: String,
    details: ExportDetails,
    next_cookie: u64,
    /// False once the stream may be out of sync (an I/O or protocol error): no more
    /// requests are sent, not even `NBD_CMD_DISC`.
    healthy: bool,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("server", &self.server)
            .field("details", &self.details)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connects and negotiates the export named in `uri`.
    pub fn connect(uri: &NbdUri) -> Result<NbdClient, NbdClientError> {
        let server = uri.to_string();
        let stream = Stream::connect(&uri.addr).map_err(|err| NbdClientError::Connect {
            server: server.clone(),
            err,
        })?;
        let mut hs = Handshake {
            stream,
            server,
            export: uri.export.clone(),
        };
        let details = hs.negotiate()?;
        tracing::debug!(server = %hs.server, ?details, "NBD export opened");
        Ok(NbdClient {
            stream: hs.stream,
            server: hs.server,
            details,
            next_cookie: 1,
            healthy: true,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.details.size
    }
    /// Whether the server marked the export read-only.
    pub fn read_only(&self) -> bool {
        self.details.flags & FLAG_READ_ONLY != 0
    }
    /// The server's URI, for messages.
    pub fn server(&self) -> &str {
        &self.server
    }
    /// Everything the handshake learned.
    pub fn details(&self) -> ExportDetails {
        self.details
    }

    /// Bytes per READ/WRITE request: [`REQUEST_SIZE`], or the server's maximum if smaller,
    /// rounded down to a multiple of its minimum block size.
    pub fn request_size(&self) -> u32 {
        let (min, max) = match self.details.block_size {
            Some((min, _, max)) => (min.max(1), max),
            None => (1, DEFAULT_MAX_BLOCK),
        };
        let n = REQUEST_SIZE.min(max);
        (n - n % min).max(min)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdClientError> {
        self.check_range(offset, buf.len() as u64)?;
        let step = self.request_size() as usize;
        let mut pos = offset;
        for chunk in buf.chunks_mut(step) {
            let len = chunk.len() as u32; // ≤ step ≤ u32::MAX
            let cookie = self.send(Command::Read, pos, len, None)?;
            self.reply(cookie, "READ", pos, u64::from(len))?;
            let ctx = "reading READ data";
            self.stream.read_exact(chunk).map_err(|e| self.io(ctx, e))?;
            pos += u64::from(len);
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), NbdClientError> {
        self.check_writable(offset, buf.len() as u64)?;
        let step = self.request_size() as usize;
        let mut pos = offset;
        for chunk in buf.chunks(step) {
            let len = chunk.len() as u32; // ≤ step
            let cookie = self.send(Command::Write, pos, len, Some(chunk))?;
            self.reply(cookie, "WRITE", pos, u64::from(len))?;
            pos += u64::from(len);
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: `NBD_CMD_WRITE_ZEROES` when the server
    /// supports it, else WRITEs of zeros.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        self.check_writable(offset, len)?;
        let step = u64::from(self.request_size());
        let zeros = if self.details.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            Some(vec![0u8; step.min(len) as usize])
        } else {
            None
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = step.min(end - pos);
            match &zeros {
                Some(z) => self.write_at(&z[..n as usize], pos)?,
                None => {
                    let cookie = self.send(Command::WriteZeroes, pos, n as u32, None)?;
                    self.reply(cookie, "WRITE_ZEROES", pos, n)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// `NBD_CMD_FLUSH` when the server supports it (otherwise its writes are durable once
    /// acknowledged, or it offers no way to make them so).
    pub fn flush(&mut self) -> Result<(), NbdClientError> {
        if self.details.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let cookie = self.send(Command::Flush, 0, 0, None)?;
        self.reply(cookie, "FLUSH", 0, 0)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection.
    pub fn disconnect(mut self) {
        self.close();
    }

    fn close(&mut self) {
        if self.healthy {
            self.healthy = false;
            let _ = self.send(Command::Disc, 0, 0, None);
        }
        self.stream.shutdown();
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.details.size => Ok(()),
            _ => Err(NbdClientError::OutOfRange {
                server: self.server.clone(),
                offset,
                len,
                size: self.details.size,
            }),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), NbdClientError> {
        if self.read_only() {
            return Err(NbdClientError::ReadOnly {
                server: self.server.clone(),
            });
        }
        self.check_range(offset, len)
    }

    fn io(&mut self, context: &str, err: io::Error) -> NbdClientError {
        self.healthy = false;
        NbdClientError::Io {
            server: self.server.clone(),
            context: context.to_string(),
            err,
        }
    }

    /// Sends one request (and its payload); returns its cookie.
    fn send(
        &mut self,
        command: Command,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<u64, NbdClientError> {
        if !self.healthy && command != Command::Disc {
            return Err(NbdClientError::Protocol {
                server: self.server.clone(),
                detail: "the connection is out of sync after an earlier error".into(),
            });
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let header = encode_request(&Request {
            flags: 0,
            command,
            cookie,
            offset,
            len,
        });
        let ctx = "sending a request";
        self.stream
            .write_all(&header)
            .map_err(|e| self.io(ctx, e))?;
        if let Some(p) = payload {
            self.stream.write_all(p).map_err(|e| self.io(ctx, e))?;
        }
        Ok(cookie)
    }

    /// Reads the simple reply to request `cookie`; an error reply becomes
    /// [`NbdClientError::Request`] (the connection stays usable).
    fn reply(
        &mut self,
        cookie: u64,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdClientError> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        let ctx = "reading a reply";
        self.stream
            .read_exact(&mut h)
            .map_err(|e| self.io(ctx, e))?;
        let Some(reply) = decode_simple_reply(&h) else {
            self.healthy = false;
            let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let detail = if magic == STRUCTURED_REPLY_MAGIC {
                "the server sent a structured reply although none was negotiated".to_string()
            } else {
                format!("bad reply magic {magic:#x}")
            };
            return Err(NbdClientError::Protocol {
                server: self.server.clone(),
                detail,
            });
        };
        if reply.cookie != cookie {
            self.healthy = false;
            return Err(NbdClientError::Protocol {
                server: self.server.clone(),
                detail: format!(
                    "reply for cookie {} while waiting for {cookie}",
                    reply.cookie
                ),
            });
        }
        if reply.error != 0 {
            let error = match NbdErrno::from_wire(reply.error) {
                Some(e) => e.name().to_string(),
                None => format!("error {}", reply.error),
            };
            return Err(NbdClientError::Request {
                server: self.server.clone(),
                op,
                offset,
                len,
                error,
            });
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// The handshake phase of a connection.
struct Handshake {
    stream: Stream,
    server: String,
    export: String,
}

impl Handshake {
    fn io(&self, context: &str, err: io::Error) -> NbdClientError {
        NbdClientError::Io {
            server: self.server.clone(),
            context: context.to_string(),
            err,
        }
    }

    fn protocol(&self, detail: impl Into<String>) -> NbdClientError {
        NbdClientError::Protocol {
            server: self.server.clone(),
            detail: detail.into(),
        }
    }

    fn read_array<const N: usize>(&mut self, context: &str) -> Result<[u8; N], NbdClientError> {
        let mut b = [0u8; N];
        self.stream
            .read_exact(&mut b)
            .map_err(|e| self.io(context, e))?;
        Ok(b)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), NbdClientError> {
        self.stream
            .write_all(bytes)
            .map_err(|e| self.io("sending the handshake", e))
    }

    /// Greeting, client flags, then GO (or EXPORT_NAME).
    fn negotiate(&mut self) -> Result<ExportDetails, NbdClientError> {
        let g: [u8; 18] = self.read_array("reading the greeting")?;
        let greeting = parse_greeting(&g).map_err(|d| self.protocol(d))?;
        let flags = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: greeting & FLAG_NO_ZEROES != 0,
        };
        self.send(&encode_client_flags(flags))?;
        if self.export.len() > MAX_NAME_LEN {
            return Err(self.protocol("export name too long"));
        }
        match self.go()? {
            Some(d) => Ok(d),
            None => self.export_name(flags.no_zeroes),
        }
    }

    /// `NBD_OPT_GO`; `None` when the server does not support it.
    fn go(&mut self) -> Result<Option<ExportDetails>, NbdClientError> {
        let data = encode_info_data(self.export.as_bytes(), &[INFO_BLOCK_SIZE])
            .ok_or_else(|| self.protocol("export name too long"))?;
        let opt = encode_option(OPT_GO, &data).ok_or_else(|| self.protocol("option too long"))?;
        self.send(&opt)?;
        let mut export: Option<(u64, u16)> = None;
        let mut block_size = None;
        loop {
            let r = self.option_reply()?;
            if r.option != OPT_GO {
                return Err(self.protocol(format!(
                    "reply to option {} while waiting for NBD_OPT_GO",
                    r.option
                )));
            }
            match r.reply_type {
                REP_INFO => match parse_info(&r.payload) {
                    Some(Info::Export { size, flags }) => export = Some((size, flags)),
                    Some(Info::BlockSize(min, pref, max)) => {
                        block_size = valid_block_size(min, pref, max)
                    }
                    None => {}
                },
                REP_ACK => {
                    let (size, flags) = export.ok_or_else(|| {
                        self.protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                    })?;
                    return Ok(Some(ExportDetails {
                        size,
                        flags,
                        block_size,
                    }));
                }
                REP_ERR_UNSUP => return Ok(None),
                t if t & REP_FLAG_ERROR != 0 => {
                    let e = self.refused(t, &r.payload);
                    self.abort();
                    return Err(e);
                }
                t => {
                    return Err(self.protocol(format!("unexpected reply type {t:#x} to NBD_OPT_GO")))
                }
            }
        }
    }

    /// Ends the handshake politely (`NBD_OPT_ABORT`), best effort: the server may close.
    fn abort(&mut self) {
        if let Some(opt) = encode_option(OPT_ABORT, &[]) {
            let _ = self.stream.write_all(&opt);
        }
        self.stream.shutdown();
    }

    fn refused(&self, reply_type: u32, payload: &[u8]) -> NbdClientError {
        let message = server_message(payload);
        let (server, export) = (self.server.clone(), self.export.clone());
        let reason = match reply_type {
            REP_ERR_UNKNOWN => {
                return NbdClientError::NoSuchExport {
                    server,
                    export,
                    message,
                }
            }
            REP_ERR_POLICY => "denied by the server's policy",
            REP_ERR_TLS_REQD => "the server requires TLS, which cryptvol does not speak",
            REP_ERR_SHUTDOWN => "the server is shutting down",
            REP_ERR_PLATFORM => "not supported on the server's platform",
            REP_ERR_INVALID => "the server called the request invalid",
            REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
            _ => "error reply",
        };
        NbdClientError::Refused {
            server,
            export,
            reason: format!("{reason} ({reply_type:#x})"),
            message,
        }
    }

    /// One option reply: a 20-byte header, then at most [`MAX_OPTION_REPLY`] bytes.
    fn option_reply(&mut self) -> Result<OptionReply, NbdClientError> {
        let h: [u8; 20] = self.read_array("reading an option reply")?;
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        if len > MAX_OPTION_REPLY {
            return Err(self.protocol(format!("option reply of {len} bytes")));
        }
        let mut bytes = h.to_vec();
        bytes.resize(h.len() + len as usize, 0);
        self.stream
            .read_exact(&mut bytes[h.len()..])
            .map_err(|e| self.io("reading an option reply", e))?;
        let mut replies =
            decode_option_replies(&bytes).map_err(|e| self.protocol(e.to_string()))?;
        replies
            .pop()
            .ok_or_else(|| self.protocol("empty option reply"))
    }

    /// `NBD_OPT_EXPORT_NAME`, for servers without `NBD_OPT_GO`. The server closes the
    /// connection when it has no such export.
    fn export_name(&mut self, no_zeroes: bool) -> Result<ExportDetails, NbdClientError> {
        let opt = encode_option(OPT_EXPORT_NAME, self.export.as_bytes())
            .ok_or_else(|| self.protocol("export name too long"))?;
        self.send(&opt)?;
        let r: Result<[u8; 10], _> = self.read_array("reading the NBD_OPT_EXPORT_NAME reply");
        let b = match r {
            Ok(b) => b,
            Err(NbdClientError::Io { err, .. }) if err.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(NbdClientError::Refused {
                    server: self.server.clone(),
                    export: self.export.clone(),
                    reason: "the server closed the connection (no such export?)".into(),
                    message: String::new(),
                })
            }
            Err(e) => return Err(e),
        };
        let size = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let flags = u16::from_be_bytes([b[8], b[9]]);
        if !no_zeroes {
            let _: [u8; EXPORT_NAME_PADDING] = self.read_array("reading the padding")?;
        }
        Ok(ExportDetails {
            size,
            flags,
            block_size: None,
        })
    }
}

/// Checks the 18-byte greeting; returns the handshake flags.
fn parse_greeting(g: &[u8; 18]) -> Result<u16, String> {
    let magic = u64::from_be_bytes([g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]]);
    if magic != NBDMAGIC {
        return Err(format!("not an NBD server (greeting magic {magic:#x})"));
    }
    let second = u64::from_be_bytes([g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]]);
    if second == OLDSTYLE_MAGIC {
        return Err("the server speaks only the oldstyle handshake, which is not supported".into());
    }
    if second != IHAVEOPT {
        return Err(format!("bad handshake magic {second:#x}"));
    }
    let flags = u16::from_be_bytes([g[16], g[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle".into());
    }
    Ok(flags)
}

/// The `NBD_REP_INFO` payloads this client understands.
#[derive(Debug, PartialEq, Eq)]
enum Info {
    Export { size: u64, flags: u16 },
    BlockSize(u32, u32, u32),
}

/// Parses an `NBD_REP_INFO` payload; `None` for other info types or wrong lengths.
fn parse_info(p: &[u8]) -> Option<Info> {
    let (kind, rest) = p.split_first_chunk::<2>()?;
    let be32 = |b: &[u8]| -> Option<u32> { Some(u32::from_be_bytes(b.try_into().ok()?)) };
    match u16::from_be_bytes(*kind) {
        INFO_EXPORT if rest.len() == 10 => Some(Info::Export {
            size: u64::from_be_bytes(rest.get(..8)?.try_into().ok()?),
            flags: u16::from_be_bytes(rest.get(8..10)?.try_into().ok()?),
        }),
        INFO_BLOCK_SIZE if rest.len() == 12 => Some(Info::BlockSize(
            be32(rest.get(..4)?)?,
            be32(rest.get(4..8)?)?,
            be32(rest.get(8..12)?)?,
        )),
        _ => None,
    }
}

/// Block size constraints as the spec requires them (min a power of two ≤ 64 KiB,
/// preferred a power of two ≥ min, max ≥ preferred and a multiple of min); bogus ones are
/// ignored, as libnbd does.
fn valid_block_size(min: u32, pref: u32, max: u32) -> Option<(u32, u32, u32)> {
    let ok = min.is_power_of_two()
        && min <= 64 << 10
        && pref.is_power_of_two()
        && pref >= min
        && max >= pref
        && max.is_multiple_of(min);
    ok.then_some((min, pref, max))
}

/// A server's error message, sanitised for a terminal and bounded.
fn server_message(payload: &[u8]) -> String {
    if payload.is_empty() {
        return String::new();
    }
    let text = String::from_utf8_lossy(payload);
    let clean: String = text
        .chars()
        .take(MAX_MESSAGE)
        .flat_map(char::escape_debug)
        .collect();
    format!(" (server said: {clean})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_checks() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g), Ok(3));
        let mut plain = g;
        plain[17] = 2;
        assert!(parse_greeting(&plain)
            .unwrap_err()
            .contains("fixed newstyle"));
        let mut old = g;
        old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(parse_greeting(&old).unwrap_err().contains("oldstyle"));
        let mut junk = g;
        junk[0] = b'X';
        assert!(parse_greeting(&junk)
            .unwrap_err()
            .contains("not an NBD server"));
    }

    #[test]
    fn info_payloads() {
        let mut e = vec![0, 0];
        e.extend_from_slice(&4096u64.to_be_bytes());
        e.extend_from_slice(&5u16.to_be_bytes());
        assert_eq!(
            parse_info(&e),
            Some(Info::Export {
                size: 4096,
                flags: 5
            })
        );
        assert_eq!(parse_info(&e[..11]), None, "short INFO_EXPORT");
        let mut b = vec![0, 3];
        for v in [512u32, 4096, 1 << 25] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(parse_info(&b), Some(Info::BlockSize(512, 4096, 1 << 25)));
        assert_eq!(
            parse_info(&[0, 1, b'x']),
            None,
            "other info types are ignored"
        );
        assert_eq!(parse_info(&[0]), None);
    }

    #[test]
    fn block_size_validation() {
        assert_eq!(valid_block_size(1, 4096, 1 << 25), Some((1, 4096, 1 << 25)));
        assert_eq!(valid_block_size(3, 4096, 1 << 25), None);
        assert_eq!(valid_block_size(4096, 512, 1 << 25), None);
        assert_eq!(valid_block_size(512, 4096, 1024), None);
        assert_eq!(valid_block_size(1 << 17, 1 << 17, 1 << 20), None);
    }

    /// A scripted server: no `NBD_OPT_GO` (so the client falls back to EXPORT_NAME), then
    /// one failed and one successful READ, then DISC.
    fn fake_server(listener: std::os::unix::net::UnixListener) {
        let (mut c, _) = listener.accept().unwrap();
        let mut g = Vec::new();
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes()); // no NO_ZEROES
        c.write_all(&g).unwrap();
        let mut flags = [0u8; 4];
        c.read_exact(&mut flags).unwrap();
        assert_eq!(flags, [0, 0, 0, 1]);
        // NBD_OPT_GO → ERR_UNSUP.
        let mut h = [0u8; 16];
        c.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), OPT_GO);
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data).unwrap();
        let mut rep = Vec::new();
        rep.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        rep.extend_from_slice(&OPT_GO.to_be_bytes());
        rep.extend_from_slice(&REP_ERR_UNSUP.to_be_bytes());
        rep.extend_from_slice(&0u32.to_be_bytes());
        c.write_all(&rep).unwrap();
        // NBD_OPT_EXPORT_NAME "e" → size, flags, 124 zero bytes.
        c.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            OPT_EXPORT_NAME
        );
        let mut name = [0u8; 1];
        c.read_exact(&mut name).unwrap();
        assert_eq!(&name, b"e");
        let mut info = Vec::new();
        info.extend_from_slice(&8192u64.to_be_bytes());
        info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
        info.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
        c.write_all(&info).unwrap();
        for error in [EIO, 0] {
            let mut req = [0u8; 28];
            c.read_exact(&mut req).unwrap();
            let cookie: [u8; 8] = req[8..16].try_into().unwrap();
            let mut reply = Vec::new();
            reply.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            reply.extend_from_slice(&error.to_be_bytes());
            reply.extend_from_slice(&cookie);
            if error == 0 {
                reply.extend_from_slice(&[7u8; 512]);
            }
            c.write_all(&reply).unwrap();
        }
        let mut disc = [0u8; 28];
        c.read_exact(&mut disc).unwrap();
        assert_eq!(u16::from_be_bytes([disc[6], disc[7]]), CMD_DISC);
    }

    #[test]
    fn export_name_fallback_and_error_replies() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || fake_server(listener));
        let uri = NbdUri {
            addr: NbdAddr::Unix(sock),
            export: "e".into(),
        };
        let mut c = NbdClient::connect(&uri).unwrap();
        assert_eq!(c.size(), 8192);
        assert!(c.read_only());
        assert_eq!(c.request_size(), REQUEST_SIZE);
        let mut buf = [0u8; 512];
        let e = c.read_at(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("NBD_EIO"), "{e}");
        c.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [7u8; 512]);
        let e = c.write_at(&buf, 0).unwrap_err();
        assert!(matches!(e, NbdClientError::ReadOnly { .. }), "{e}");
        let e = c.read_at(&mut buf, 8000).unwrap_err();
        assert!(matches!(e, NbdClientError::OutOfRange { .. }), "{e}");
        c.disconnect();
        server.join().unwrap();
    }

    #[test]
    fn server_messages_are_bounded_and_escaped() {
        assert_eq!(server_message(b""), "");
        assert_eq!(server_message(b"no\n"), " (server said: no\\n)");
        let long = vec![b'a'; 10_000];
        assert!(server_message(&long).len() < 300);
    }
}
