//! Writing replies: one whole reply at a time under the write lock, error replies
//! (structured or simple, as negotiated) and their user-facing messages.

use std::io::{IoSlice, Write};
use std::net::Shutdown;
use std::sync::PoisonError;

use super::state::Conn;
use crate::nbd::{encode_simple_reply, structured, NbdErrno};

impl Conn {
    /// An error reply: a structured `ERROR` chunk (with a short message for the user) when
    /// structured replies were negotiated, as READ requires and the spec prefers for every
    /// command; a simple reply otherwise.
    pub(super) fn send_error(&self, cookie: u64, errno: NbdErrno, message: &str) -> bool {
        if self.negotiated.structured_replies {
            self.send(&structured::error(cookie, errno, message, true), &[])
        } else {
            self.send(&encode_simple_reply(cookie, Some(errno)), &[])
        }
    }

    /// Writes one whole reply under the write lock (replies never interleave).
    pub(super) fn send(&self, header: &[u8], data: &[u8]) -> bool {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        match write_all_vectored(&mut *w, header, data) {
            Ok(()) => true,
            Err(e) => {
                drop(w);
                self.close(&format!("reply could not be sent (client went away): {e}"));
                // Wake a thread blocked reading this dead connection.
                if let Ok(r) = self.reader.try_lock() {
                    r.get_ref().shutdown(Shutdown::Read);
                }
                false
            }
        }
    }
}

/// The message of a structured error reply to a request refused by validation.
pub(super) fn rejection_message(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::Perm => "the export is read-only",
        NbdErrno::NoSpc => "the request extends beyond the end of the export",
        NbdErrno::Inval => {
            "invalid request: unknown command or flag, range beyond the end of the export, \
             zero-length block status, or block status without a metadata context"
        }
        _ => "request refused by the server",
    }
}

/// The message of a structured error reply to a request that failed on the volume (the
/// details, which may name files, stay in the server log).
pub(super) fn failure_message(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::NoSpc => "no space left on the server's backing storage",
        NbdErrno::Perm => "the server may not write the backing file",
        NbdErrno::NoMem => "the server is out of memory",
        _ => "i/o error on the server's backing storage (details in the server log)",
    }
}

/// Writes `header` then `data` with as few system calls as possible.
pub(super) fn write_all_vectored<W: Write>(
    w: &mut W,
    header: &[u8],
    data: &[u8],
) -> std::io::Result<()> {
    let total = header.len() + data.len();
    let mut done = 0usize;
    while done < total {
        let n = if done < header.len() {
            w.write_vectored(&[IoSlice::new(&header[done..]), IoSlice::new(data)])
        } else {
            w.write(&data[done - header.len()..])
        };
        match n {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
