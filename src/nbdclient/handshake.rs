//! The client side of the fixed-newstyle handshake: greeting, client flags, `NBD_OPT_GO`
//! (or `NBD_OPT_EXPORT_NAME` for servers without it), and the replies' payloads.

use std::io::{self, Read, Write};

use super::{ExportDetails, NbdClientError, Stream};
use crate::nbd::client::{
    decode_option_replies, encode_client_flags, encode_info_data, encode_option, OptionReply,
};
use crate::nbd::consts::*;
use crate::nbd::{ClientFlags, MAX_NAME_LEN};

/// Largest option reply payload accepted (servers send a few hundred bytes).
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The oldstyle magic (after NBDMAGIC): servers that only speak oldstyle are refused.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Padding after an `NBD_OPT_EXPORT_NAME` reply when `NO_ZEROES` is not in effect.
pub(super) const EXPORT_NAME_PADDING: usize = 124;
/// How much of a server's error message is shown.
const MAX_MESSAGE: usize = 256;

/// The handshake phase of a connection.
pub(super) struct Handshake {
    pub(super) stream: Stream,
    pub(super) server: String,
    pub(super) export: String,
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
    pub(super) fn negotiate(&mut self) -> Result<ExportDetails, NbdClientError> {
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
            REP_ERR_TLS_REQD => return NbdClientError::TlsRequired { server, export },
            REP_ERR_UNKNOWN => {
                return NbdClientError::NoSuchExport {
                    server,
                    export,
                    message,
                }
            }
            REP_ERR_POLICY => "denied by the server's policy",
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

    #[test]
    fn server_messages_are_bounded_and_escaped() {
        assert_eq!(server_message(b""), "");
        assert_eq!(server_message(b"no\n"), " (server said: no\\n)");
        let long = vec![b'a'; 10_000];
        assert!(server_message(&long).len() < 300);
    }
}
