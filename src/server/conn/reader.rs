//! Reading requests: the header, validation against the export and the negotiation,
//! and the payload of a WRITE (into the thread's buffer, under the byte budget).

use std::io::{BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::state::Conn;
use super::stream::BlockingStream;
use crate::nbd::{parse_request, validate_negotiated, NbdErrno, ValidRequest, REQUEST_HEADER_LEN};
use crate::server::budget::BudgetGuard;

/// What the reading thread got.
pub(super) enum Incoming {
    /// Serve this request; the payload (WRITE) is in the thread's buffer.
    Serve(u64, ValidRequest, Option<BudgetGuard>),
    /// Answer this error (the payload, if any, was discarded).
    Reject(u64, NbdErrno),
    /// Stop reading.
    Stop,
}

impl Conn {
    /// Reads the next request under the read lock. A WRITE's payload lands in `buf`.
    pub(super) fn next_request(&self, buf: &mut Vec<u8>) -> Incoming {
        let mut rd = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closing.load(Ordering::SeqCst) {
            return Incoming::Stop;
        }
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        if !self.read_header(&mut rd, &mut hdr) {
            return Incoming::Stop;
        }
        let req = match parse_request(&hdr) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(conn = self.id, "closing connection: {e}");
                self.close(&e.to_string());
                return Incoming::Stop;
            }
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let checked = validate_negotiated(&req, &self.bounds(), &self.negotiated);
        match checked {
            Ok(valid) => self.accept(&mut rd, req.cookie, valid, buf),
            Err(rej) => {
                if !self.discard_payload(&mut rd, u64::from(req.payload_len())) {
                    return Incoming::Stop;
                }
                tracing::debug!(conn = self.id, ?req, errno = ?rej.errno, "request rejected");
                Incoming::Reject(req.cookie, rej.errno)
            }
        }
    }

    /// Fills `hdr` with a request header. False (the connection closing, with its
    /// reason) on end of stream, a read error or the idle timeout.
    fn read_header(&self, rd: &mut BufReader<BlockingStream>, hdr: &mut [u8]) -> bool {
        let mut filled = 0;
        while filled < hdr.len() {
            match rd.read(&mut hdr[filled..]) {
                Ok(0) => {
                    self.close(if filled == 0 {
                        "client closed the connection without NBD_CMD_DISC"
                    } else {
                        "client closed the connection in the middle of a request"
                    });
                    return false;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    // The idle timeout: no request for that long. A request still being
                    // served (by another thread) means the client is not idle.
                    if self.busy() {
                        continue;
                    }
                    let secs = self.idle_timeout.map_or(0, |t| t.as_secs());
                    self.close(&format!(
                        "no request for {secs} s: idle timeout (--idle-timeout)"
                    ));
                    return false;
                }
                Err(e) => {
                    self.close(&format!("read error: {e}"));
                    return false;
                }
            }
        }
        true
    }

    /// Reads and drops the payload of a refused request. False (the connection closing)
    /// if the client went away in the middle of it.
    fn discard_payload(&self, rd: &mut BufReader<BlockingStream>, payload: u64) -> bool {
        if payload == 0 {
            return true;
        }
        match std::io::copy(&mut rd.take(payload), &mut std::io::sink()) {
            Ok(n) if n == payload => true,
            _ => {
                self.close("client closed during a write payload");
                false
            }
        }
    }

    /// A valid request: DISC closes, WRITE's payload is read into `buf` and READ's buffer
    /// readied, both under the byte budget.
    fn accept(
        &self,
        rd: &mut BufReader<BlockingStream>,
        cookie: u64,
        valid: ValidRequest,
        buf: &mut Vec<u8>,
    ) -> Incoming {
        match valid {
            ValidRequest::Disc => {
                self.close("client sent NBD_CMD_DISC");
                Incoming::Stop
            }
            ValidRequest::Write { len, .. } => {
                let guard = self.budget_for(len);
                let len = len as usize;
                self.payload_buffer(buf, len);
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                if let Err(e) = rd.read_exact(&mut buf[..len]) {
                    self.close(&format!("client closed during a write payload: {e}"));
                    return Incoming::Stop;
                }
                self.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                Incoming::Serve(cookie, valid, Some(guard))
            }
            ValidRequest::Read { len, .. } => {
                let guard = self.budget_for(len);
                self.payload_buffer(buf, len as usize);
                self.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
                Incoming::Serve(cookie, valid, Some(guard))
            }
            _ => Incoming::Serve(cookie, valid, None),
        }
    }

    /// Makes `buf` a buffer with room for `len` bytes, from the pool when it has one (a
    /// new one is allocated by the caller's resize otherwise).
    pub(super) fn payload_buffer(&self, buf: &mut Vec<u8>, len: usize) {
        if buf.capacity() < len {
            if let Some(b) = self.buffers.take(len) {
                *buf = b;
            }
        }
    }

    /// Whether a request is being served by some thread of this connection (called by
    /// the reading thread, which counts itself as waiting).
    pub(super) fn busy(&self) -> bool {
        self.threads.load(Ordering::SeqCst) > self.waiting.load(Ordering::SeqCst)
    }

    /// Takes `len` bytes of the server-wide budget (blocks while it is exhausted).
    pub(super) fn budget_for(&self, len: u32) -> BudgetGuard {
        self.budget.acquire(len as usize)
    }
}

/// Whether an I/O error is the expiry of `SO_RCVTIMEO`/`SO_SNDTIMEO`.
pub(super) fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
