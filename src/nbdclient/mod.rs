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

mod handshake;
mod uri;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub use uri::{NbdAddr, NbdUri, DEFAULT_PORT};

use handshake::Handshake;

use crate::nbd::consts::*;
use crate::nbd::{
    decode_simple_reply, encode_request, Command, NbdErrno, Request, SIMPLE_REPLY_LEN,
};

/// Largest READ/WRITE request this client sends.
pub const REQUEST_SIZE: u32 = 4 << 20;
/// Maximum payload assumed when the server does not advertise one (the spec's 32 MiB).
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;
/// A server that does not answer for this long is treated as dead.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

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
    #[error("the NBD server {server} requires TLS for export {export:?}, which this client does not speak (NBD_REP_ERR_TLS_REQD)")]
    TlsRequired { server: String, export: String },
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

    /// The socket, in blocking mode with no timeouts (for a new owner such as the kernel).
    fn into_fd(self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                s.into()
            }
            Stream::Unix(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                s.into()
            }
        })
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
        NbdClient::negotiate(stream, server, uri.export.clone())
    }

    /// Negotiates `export` over a connected Unix stream socket whose peer `server` names
    /// in errors (the fuzz targets play the server's part this way).
    pub(crate) fn over_unix_stream(
        stream: UnixStream,
        server: String,
        export: String,
    ) -> Result<NbdClient, NbdClientError> {
        NbdClient::negotiate(Stream::Unix(stream), server, export)
    }

    fn negotiate(
        stream: Stream,
        server: String,
        export: String,
    ) -> Result<NbdClient, NbdClientError> {
        let mut hs = Handshake {
            stream,
            server,
            export,
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

    /// Ends this client without `NBD_CMD_DISC` and returns its socket, in the transmission
    /// phase and with no timeouts, for another user of the connection (the kernel's nbd
    /// driver, `cryptvol attach`). Fails for a connection already out of sync.
    pub fn into_socket(mut self) -> Result<std::os::fd::OwnedFd, NbdClientError> {
        if !self.healthy {
            return Err(NbdClientError::Protocol {
                server: self.server.clone(),
                detail: "the connection is out of sync after an earlier error".into(),
            });
        }
        self.healthy = false; // Drop must not send NBD_CMD_DISC nor shut the socket down
        let placeholder = Stream::Unix(
            UnixStream::pair()
                .map_err(|e| self.io("handing the socket over", e))?
                .0,
        );
        let stream = std::mem::replace(&mut self.stream, placeholder);
        stream
            .into_fd()
            .map_err(|e| self.io("clearing the socket's timeouts", e))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: no `NBD_OPT_GO` (so the client falls back to EXPORT_NAME), then
    /// one failed and one successful READ, then DISC.
    fn fake_server(listener: std::os::unix::net::UnixListener) {
        let (mut c, _) = listener.accept().unwrap();
        fake_handshake(&mut c);
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

    /// The handshake of [`fake_server`]: GO refused, EXPORT_NAME "e" of 8192 bytes.
    fn fake_handshake(c: &mut UnixStream) {
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
        info.extend_from_slice(&[0u8; handshake::EXPORT_NAME_PADDING]);
        c.write_all(&info).unwrap();
    }

    #[test]
    fn into_socket_hands_over_the_transmission_phase() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            fake_handshake(&mut c);
            // The next bytes are the new owner's request, not NBD_CMD_DISC; then EOF.
            let mut req = [0u8; 28];
            c.read_exact(&mut req).unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            (req, rest)
        });
        let uri = NbdUri {
            addr: NbdAddr::Unix(sock),
            export: "e".into(),
        };
        let fd = NbdClient::connect(&uri).unwrap().into_socket().unwrap();
        let mut s = UnixStream::from(fd);
        assert_eq!(
            s.read_timeout().unwrap(),
            None,
            "no timeout left for the new owner"
        );
        let read = encode_request(&Request {
            flags: 0,
            command: Command::Read,
            cookie: 42,
            offset: 4096,
            len: 512,
        });
        s.write_all(&read).unwrap();
        drop(s);
        let (req, rest) = server.join().unwrap();
        assert_eq!(req, read);
        assert!(rest.is_empty(), "nothing after the request: {rest:?}");
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
}
