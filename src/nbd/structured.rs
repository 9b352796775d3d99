//! Structured reply chunks (spec: "Structured reply chunk message" and "Structured reply
//! types"), for connections that negotiated `NBD_OPT_STRUCTURED_REPLY`.
//!
//! Every chunk is a 20-byte header (`u32 magic, u16 flags, u16 type, u64 cookie, u32
//! length`) and `length` bytes of payload. The encoders below never fail on valid
//! arguments and return `None` for arguments the spec forbids (an empty data or hole
//! chunk, an empty block status list, a zero-length descriptor), so a caller bug cannot put
//! an invalid chunk on the wire.
//!
//! An `OFFSET_DATA` chunk is returned as its fixed 28-byte prefix only: the caller writes
//! the data right after it (one `writev`, no copy).

use super::consts::*;
use super::handshake::MAX_HUMAN_STRING;
use super::transmission::NbdErrno;
use super::wire::Reader;

/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of an `OFFSET_DATA` chunk before its data: header and the 64-bit offset.
pub const OFFSET_DATA_PREFIX_LEN: usize = CHUNK_HEADER_LEN + 8;
/// Length of a whole `OFFSET_HOLE` chunk.
pub const OFFSET_HOLE_LEN: usize = CHUNK_HEADER_LEN + 12;
/// Most descriptors this server puts in one `BLOCK_STATUS` chunk (the spec: SHOULD NOT
/// send more than 2^20).
pub const MAX_DESCRIPTORS: usize = 1 << 20;

/// One `base:allocation` (or other context) descriptor: a nonzero extent length and its
/// status flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub len: u32,
    pub flags: u32,
}

/// The 20-byte header of a chunk with `len` bytes of payload.
pub fn chunk_header(cookie: u64, reply_type: u16, done: bool, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = [0u8; CHUNK_HEADER_LEN];
    let fields: [&[u8]; 5] = [
        &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
        &flags.to_be_bytes(),
        &reply_type.to_be_bytes(),
        &cookie.to_be_bytes(),
        &len.to_be_bytes(),
    ];
    fill(&mut out, &fields);
    out
}

/// `NBD_REPLY_TYPE_NONE` with `DONE`: the final chunk of a reply that carries nothing
/// else (e.g. a successful zero-length READ).
pub fn none(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(cookie, REPLY_TYPE_NONE, true, 0)
}

/// The prefix of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (header and offset) for `data_len`
/// bytes of data at `offset`, which the caller sends right after it. `None` if
/// `data_len` is 0 or does not fit the 32-bit length field with the offset.
pub fn offset_data_prefix(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> Option<[u8; OFFSET_DATA_PREFIX_LEN]> {
    if data_len == 0 {
        return None;
    }
    let len = data_len.checked_add(8)?;
    let mut out = [0u8; OFFSET_DATA_PREFIX_LEN];
    let header = chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, done, len);
    fill(&mut out, &[&header, &offset.to_be_bytes()]);
    Some(out)
}

/// A whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as
/// zeros. `None` if `hole_len` is 0.
pub fn offset_hole(
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) -> Option<[u8; OFFSET_HOLE_LEN]> {
    if hole_len == 0 {
        return None;
    }
    let mut out = [0u8; OFFSET_HOLE_LEN];
    let header = chunk_header(cookie, REPLY_TYPE_OFFSET_HOLE, done, 12);
    fill(
        &mut out,
        &[&header, &offset.to_be_bytes(), &hole_len.to_be_bytes()],
    );
    Some(out)
}

/// A whole `NBD_REPLY_TYPE_ERROR` chunk: `errno` and a message for a human (cut to
/// [`MAX_HUMAN_STRING`] bytes on a character boundary; may be empty).
pub fn error(cookie: u64, errno: NbdErrno, message: &str, done: bool) -> Vec<u8> {
    error_chunk(cookie, REPLY_TYPE_ERROR, errno, message, None, done)
}

/// A whole `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: like [`error`], plus the offset at which
/// the error happened (which must lie within the request).
pub fn error_offset(
    cookie: u64,
    errno: NbdErrno,
    message: &str,
    offset: u64,
    done: bool,
) -> Vec<u8> {
    error_chunk(
        cookie,
        REPLY_TYPE_ERROR_OFFSET,
        errno,
        message,
        Some(offset),
        done,
    )
}

fn error_chunk(
    cookie: u64,
    reply_type: u16,
    errno: NbdErrno,
    message: &str,
    offset: Option<u64>,
    done: bool,
) -> Vec<u8> {
    let message = truncate_utf8(message, MAX_HUMAN_STRING).as_bytes();
    // At most 256 bytes: both conversions always succeed.
    let message_len = u16::try_from(message.len()).unwrap_or(0);
    let message = message.get(..usize::from(message_len)).unwrap_or_default();
    let payload_len = 6 + message.len() + if offset.is_some() { 8 } else { 0 };
    let len = u32::try_from(payload_len).unwrap_or(6);
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload_len);
    out.extend_from_slice(&chunk_header(cookie, reply_type, done, len));
    out.extend_from_slice(&errno.wire().to_be_bytes());
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message);
    if let Some(offset) = offset {
        out.extend_from_slice(&offset.to_be_bytes());
    }
    out
}

/// A whole `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context. `None` if there
/// is no descriptor, more than [`MAX_DESCRIPTORS`], or one of length 0.
pub fn block_status(
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
    done: bool,
) -> Option<Vec<u8>> {
    if descriptors.is_empty()
        || descriptors.len() > MAX_DESCRIPTORS
        || descriptors.iter().any(|d| d.len == 0)
    {
        return None;
    }
    // At most 4 + 8 × 2^20 bytes: fits in u32.
    let len = u32::try_from(4 + 8 * descriptors.len()).ok()?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 4 + 8 * descriptors.len());
    out.extend_from_slice(&chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, done, len));
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.len.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    Some(out)
}

/// Turns consecutive extents (`(length, flags)`, in order from the request's offset) into
/// the descriptors of a reply to a BLOCK_STATUS request of `requested` bytes:
///
/// - zero-length extents are skipped and neighbours with equal flags merged;
/// - the descriptors never cover more than `requested` bytes in total (so every length fits
///   in 32 bits, and a `REQ_ONE` descriptor never exceeds the request);
/// - with `req_one`, only the first descriptor is kept;
/// - at most [`MAX_DESCRIPTORS`] are returned (the reply may then cover less than asked,
///   which the spec allows; the client asks again from where it stopped).
///
/// The result is empty only when the extents cover nothing or `requested` is 0.
pub fn block_descriptors<I>(extents: I, requested: u32, req_one: bool) -> Vec<BlockDescriptor>
where
    I: IntoIterator<Item = (u64, u32)>,
{
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut left = requested;
    let mut out: Vec<BlockDescriptor> = Vec::new();
    for (len, flags) in extents {
        if left == 0 {
            break;
        }
        let take = u32::try_from(len.min(u64::from(left))).unwrap_or(left);
        if take == 0 {
            continue;
        }
        left -= take;
        let full = out.len() == limit;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += take,
            _ if full => break,
            _ => out.push(BlockDescriptor { len: take, flags }),
        }
    }
    out
}

/// A decoded structured reply chunk header (client side; for tests and tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    /// Whether this is the last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Decodes a chunk header; `None` if the magic is wrong.
pub fn decode_chunk_header(b: &[u8; CHUNK_HEADER_LEN]) -> Option<ChunkHeader> {
    let mut r = Reader(b);
    let magic = r.u32()?;
    let header = ChunkHeader {
        flags: r.u16()?,
        reply_type: r.u16()?,
        cookie: r.u64()?,
        len: r.u32()?,
    };
    (magic == STRUCTURED_REPLY_MAGIC).then_some(header)
}

/// Copies `fields` one after another into `out` (whose length is their total).
fn fill(out: &mut [u8], fields: &[&[u8]]) {
    let mut rest = out;
    for field in fields {
        let Some((head, tail)) = rest.split_at_mut_checked(field.len()) else {
            return;
        };
        head.copy_from_slice(field);
        rest = tail;
    }
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests;
