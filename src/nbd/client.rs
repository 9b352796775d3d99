//! Client-side encoders and decoders for the handshake, for tests, fuzzers and tools.
//! The server itself never needs these.

use super::consts::*;
use super::handshake::ClientFlags;
use super::wire::Reader;

/// The client's 4-byte flags field.
pub fn encode_client_flags(flags: ClientFlags) -> [u8; 4] {
    let mut value = 0;
    if flags.fixed_newstyle {
        value |= FLAG_C_FIXED_NEWSTYLE;
    }
    if flags.no_zeroes {
        value |= FLAG_C_NO_ZEROES;
    }
    u32::to_be_bytes(value)
}

/// An option request: `IHAVEOPT`, option, length, data. `None` if `data` is longer than
/// `u32::MAX` bytes.
pub fn encode_option(option: u32, data: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(data.len()).ok()?;
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Some(out)
}

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO`: `u32 namelen, name, u16 n, n × u16`.
/// `None` if the name or the list is too long for its length field.
pub fn encode_info_data(name: &[u8], infos: &[u16]) -> Option<Vec<u8>> {
    let name_len = u32::try_from(name.len()).ok()?;
    let count = u16::try_from(infos.len()).ok()?;
    let mut out = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    out.extend_from_slice(&name_len.to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&count.to_be_bytes());
    for info in infos {
        out.extend_from_slice(&info.to_be_bytes());
    }
    Some(out)
}

/// One decoded option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub payload: Vec<u8>,
}

impl OptionReply {
    /// Whether this is an error reply (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// Why a byte stream is not a sequence of option replies.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionReplyError {
    #[error("option reply at byte {at} has bad magic {magic:#x}")]
    BadMagic { at: usize, magic: u64 },
    #[error("option reply at byte {at} is truncated")]
    Truncated { at: usize },
}

/// Splits a byte stream into option replies, checking each magic and length field.
pub fn decode_option_replies(mut bytes: &[u8]) -> Result<Vec<OptionReply>, OptionReplyError> {
    let total = bytes.len();
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        let at = total - bytes.len();
        let mut r = Reader(bytes);
        let truncated = || OptionReplyError::Truncated { at };
        let magic = r.u64().ok_or_else(truncated)?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(OptionReplyError::BadMagic { at, magic });
        }
        let option = r.u32().ok_or_else(truncated)?;
        let reply_type = r.u32().ok_or_else(truncated)?;
        let len = r.u32().ok_or_else(truncated)?;
        let payload = usize::try_from(len)
            .ok()
            .and_then(|n| r.take(n))
            .ok_or_else(truncated)?;
        replies.push(OptionReply {
            option,
            reply_type,
            payload: payload.to_vec(),
        });
        bytes = r.0;
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_flags_encode_both_bits() {
        let both = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        assert_eq!(encode_client_flags(both), [0, 0, 0, 3]);
        let fixed = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false,
        };
        assert_eq!(encode_client_flags(fixed), [0, 0, 0, 1]);
    }

    #[test]
    fn option_and_info_data_layout() {
        let data = encode_info_data(b"ab", &[INFO_NAME, INFO_BLOCK_SIZE]).unwrap();
        assert_eq!(data, [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 1, 0, 3]);
        let opt = encode_option(OPT_GO, &data).unwrap();
        assert_eq!(&opt[..8], b"IHAVEOPT");
        assert_eq!(&opt[8..16], &[0, 0, 0, 7, 0, 0, 0, 12]);
        assert_eq!(&opt[16..], &data[..]);
    }

    #[test]
    fn decodes_a_stream_and_rejects_damage() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        stream.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1, b'x']);
        stream.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        stream.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0]);
        let replies = decode_option_replies(&stream).unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].payload, b"x");
        assert_eq!(replies[1].reply_type, REP_ACK);
        assert!(!replies[1].is_error());

        assert_eq!(
            decode_option_replies(&stream[..stream.len() - 1]),
            Err(OptionReplyError::Truncated { at: 21 })
        );
        let mut bad = stream.clone();
        bad[21] ^= 1;
        assert!(matches!(
            decode_option_replies(&bad),
            Err(OptionReplyError::BadMagic { at: 21, .. })
        ));
    }
}
