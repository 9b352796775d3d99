//! Performing a validated request on the [`BlockDevice`](crate::blockdev::BlockDevice)
//! and answering it: READ (simple or structured), WRITE, FLUSH, TRIM, WRITE_ZEROES and
//! BLOCK_STATUS.

use super::reply::{failure_message, rejection_message};
use super::state::Conn;
use crate::nbd::{encode_simple_reply, structured, NbdErrno, ValidRequest, STATE_HOLE, STATE_ZERO};
use crate::server::export::errno_for;
use crate::server::metrics::Command;
use std::time::Instant;

impl Conn {
    /// Performs a request and sends its reply, counting it in the export's metrics
    /// (command, bytes, time to the reply). Returns false once the connection is unusable.
    pub(super) fn serve(&self, cookie: u64, req: ValidRequest, buf: &mut Vec<u8>) -> bool {
        let started = Instant::now();
        let command = Command::of(&req);
        if let Some((command, bytes)) = command {
            self.metrics.started(command, bytes);
        }
        let ok = self.perform(cookie, req, buf);
        if let Some((command, _)) = command {
            self.metrics.finished(command, started.elapsed());
        }
        ok
    }

    /// Performs a request and sends its reply. Returns false once the connection is unusable.
    fn perform(&self, cookie: u64, req: ValidRequest, buf: &mut Vec<u8>) -> bool {
        let vol = &*self.device;
        let result = match req {
            ValidRequest::Read { offset, len } if self.negotiated.structured_replies => {
                return self.read_structured(cookie, offset, len, buf);
            }
            ValidRequest::Read { offset, len } => {
                let len = len as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                match vol.read_at(&mut buf[..len], offset) {
                    Ok(()) => return self.send(&encode_simple_reply(cookie, None), &buf[..len]),
                    Err(e) => Err(e),
                }
            }
            ValidRequest::Write { offset, len, fua } => {
                vol.write_at(&mut buf[..len as usize], offset, fua)
            }
            ValidRequest::Flush => vol.flush(),
            ValidRequest::Trim { offset, len, fua } => vol
                .discard(offset, u64::from(len))
                .and_then(|()| if fua { vol.flush() } else { Ok(()) }),
            ValidRequest::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: false,
            } => vol.write_zeroes(offset, u64::from(len), fua),
            ValidRequest::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: true,
            } => vol.write_zeroes_no_hole(offset, u64::from(len), fua),
            ValidRequest::BlockStatus {
                offset,
                len,
                req_one,
            } => return self.block_status(cookie, offset, len, req_one),
            ValidRequest::Cache { .. } | ValidRequest::Disc => Ok(()),
        };
        match result {
            Ok(()) => self.send(&encode_simple_reply(cookie, None), &[]),
            Err(e) => self.failed(cookie, &req, &e),
        }
    }

    /// Logs a failed request and sends its error reply.
    pub(super) fn failed(
        &self,
        cookie: u64,
        req: &ValidRequest,
        e: &crate::volume::VolumeError,
    ) -> bool {
        let errno = errno_for(e);
        self.metrics.error(errno);
        tracing::warn!(conn = self.id, "{req:?} failed ({errno:?}): {e}");
        self.send_error(cookie, errno, failure_message(errno))
    }

    /// READ with structured replies: one `OFFSET_HOLE` chunk when the whole range is
    /// unallocated (nothing is read or decrypted), else one `OFFSET_DATA` chunk sent
    /// straight from the thread's buffer; `NONE` for a zero-length read. All are final
    /// (`DONE`): the data is complete in memory before its chunk is sent.
    pub(super) fn read_structured(
        &self,
        cookie: u64,
        offset: u64,
        len: u32,
        buf: &mut Vec<u8>,
    ) -> bool {
        if len == 0 {
            return self.send(&structured::none(cookie), &[]);
        }
        if self.all_unallocated(offset, len) {
            if let Some(chunk) = structured::offset_hole(cookie, offset, len, true) {
                return self.send(&chunk, &[]);
            }
        }
        let n = len as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        if let Err(e) = self.device.read_at(&mut buf[..n], offset) {
            return self.failed(cookie, &ValidRequest::Read { offset, len }, &e);
        }
        match structured::offset_data_prefix(cookie, offset, len, true) {
            Some(prefix) => self.send(&prefix, &buf[..n]),
            // len is in 1..=MAX_PAYLOAD, so a prefix always exists.
            None => self.send_error(cookie, NbdErrno::Inval, "read length not representable"),
        }
    }

    /// Whether the allocation map reports `[offset, offset + len)` as entirely unallocated.
    /// A map error counts as "allocated": the read then reports its own error, if any.
    pub(super) fn all_unallocated(&self, offset: u64, len: u32) -> bool {
        match self.device.extents(offset, u64::from(len)) {
            Ok(extents) => !extents.is_empty() && extents.iter().all(|e| !e.allocated),
            Err(e) => {
                tracing::debug!(conn = self.id, "allocation lookup failed: {e}");
                false
            }
        }
    }

    /// BLOCK_STATUS for `base:allocation`: one `BLOCK_STATUS` chunk (the only selectable
    /// context) with allocated extents as status 0 and unallocated ones as `HOLE | ZERO`.
    pub(super) fn block_status(&self, cookie: u64, offset: u64, len: u32, req_one: bool) -> bool {
        let req = ValidRequest::BlockStatus {
            offset,
            len,
            req_one,
        };
        let Some(context) = self.negotiated.base_allocation else {
            // validate_negotiated refuses BLOCK_STATUS without a context.
            return self.send_error(cookie, NbdErrno::Inval, rejection_message(NbdErrno::Inval));
        };
        let extents = match self.device.extents(offset, u64::from(len)) {
            Ok(extents) => extents,
            Err(e) => return self.failed(cookie, &req, &e),
        };
        let status = |allocated: bool| {
            if allocated {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            }
        };
        let mut descriptors = structured::block_descriptors(
            extents.iter().map(|e| (e.len, status(e.allocated))),
            len,
            req_one,
        );
        if descriptors.is_empty() {
            // The map covered nothing: status 0 ("allocated, contents unknown") is always
            // a correct answer.
            tracing::warn!(conn = self.id, "{req:?}: allocation map returned no extent");
            descriptors.push(structured::BlockDescriptor { len, flags: 0 });
        }
        match structured::block_status(cookie, context, &descriptors, true) {
            Some(chunk) => self.send(&chunk, &[]),
            None => self.send_error(cookie, NbdErrno::Io, "block status could not be encoded"),
        }
    }
}
