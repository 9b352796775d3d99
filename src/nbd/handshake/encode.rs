//! Encoding option replies: the reply header, error replies with a bounded message,
//! `NBD_INFO_*` strings.

use super::{MAX_HUMAN_STRING, MAX_REPLY_PAYLOAD};
use crate::nbd::consts::*;

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
pub(super) fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Appends one option reply: magic, echoed option, type, length, payload. The payload is
/// cut to [`MAX_REPLY_PAYLOAD`] as a last line of defence; callers size it correctly.
pub(super) fn push_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_REPLY_PAYLOAD);
    let payload = payload.get(..MAX_REPLY_PAYLOAD).unwrap_or(payload);
    let len = u32::try_from(payload.len()).unwrap_or(0);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an error reply carrying `message`, cut to [`MAX_HUMAN_STRING`] bytes.
pub(super) fn push_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & REP_FLAG_ERROR != 0);
    let message = if message.len() > MAX_HUMAN_STRING {
        format!("{}...", truncate_utf8(message, MAX_HUMAN_STRING - 3))
    } else {
        message.to_owned()
    };
    push_reply(out, option, reply_type, message.as_bytes());
}

/// Appends an `NBD_REP_INFO` whose payload is an info type followed by a string.
pub(super) fn push_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let mut payload = Vec::with_capacity(2 + s.len());
    payload.extend_from_slice(&info.to_be_bytes());
    payload.extend_from_slice(s.as_bytes());
    push_reply(out, option, REP_INFO, &payload);
}
