//! The kernel's nbd generic-netlink interface (`include/uapi/linux/nbd-netlink.h`) as pure
//! functions over bytes: request encoders for `NBD_CMD_CONNECT`, `RECONFIGURE`,
//! `DISCONNECT` and `STATUS`, the controller's `CTRL_CMD_GETFAMILY` (to resolve the family
//! "nbd" and its multicast group), and a parser for what the kernel sends back.
//!
//! Hand-written rather than with `neli`: the handful of fixed messages below are about 200
//! lines, every byte is unit-tested, and the crate's typed builders would not remove the
//! need to know each attribute's layout (the nbd attributes are not in any crate).
//! Netlink headers are in the host's byte order; attribute payloads are padded to 4 bytes.

/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`: the kernel answers every request with an `NLMSG_ERROR` (0 = success).
const NLM_F_ACK: u16 = 4;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
const NLMSG_DONE: u16 = 3;
/// `NLA_F_NESTED`: set on nested attributes (the kernel masks it off).
const NLA_F_NESTED: u16 = 0x8000;
/// Flags in an attribute's type field.
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);
/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Length of `struct genlmsghdr`.
const GENL_HDRLEN: usize = 4;

/// The generic netlink controller's family id (`GENL_ID_CTRL`).
pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

/// `NBD_GENL_FAMILY_NAME`.
pub const NBD_FAMILY: &str = "nbd";
/// `NBD_GENL_MCAST_GROUP_NAME`: where the kernel announces `NBD_CMD_LINK_DEAD`.
pub const NBD_MCAST_GROUP: &str = "nbd_mc_group";
/// `NBD_GENL_VERSION`.
const NBD_GENL_VERSION: u8 = 1;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;
pub const NBD_CMD_STATUS: u8 = 5;

const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;

/// What `NBD_CMD_CONNECT` configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// The device index (`/dev/nbdN`), or `None` for the first free one.
    pub index: Option<u32>,
    pub size_bytes: u64,
    pub block_size: u64,
    /// Request timeout in seconds (0: the kernel's default).
    pub timeout: u64,
    /// How long I/O waits for a reconnect when every connection is dead, in seconds.
    pub dead_conn_timeout: u64,
    /// The export's transmission flags (`NBD_FLAG_*`).
    pub server_flags: u64,
    /// `NBD_CFLAG_*`.
    pub client_flags: u64,
    /// The connected sockets handed to the kernel.
    pub fds: Vec<u32>,
}

/// What `NBD_CMD_RECONFIGURE` changes on a configured device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconfigure {
    pub index: u32,
    /// New sockets replacing dead ones.
    pub fds: Vec<u32>,
    /// A new size (an export that grew).
    pub size_bytes: Option<u64>,
}

/// One attribute: its type (flags masked off) and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// One message from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `NLMSG_ERROR`: `errno` 0 is the acknowledgement of request `seq`.
    Ack {
        seq: u32,
        errno: i32,
    },
    Done {
        seq: u32,
    },
    /// A generic netlink message of family `family`.
    Generic {
        family: u16,
        seq: u32,
        cmd: u8,
        attrs: Vec<Attr>,
    },
}

/// A malformed netlink message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct ParseError(pub String);

fn bad(what: impl Into<String>) -> ParseError {
    ParseError(what.into())
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one attribute (header, payload, padding).
fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

fn put_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    put_attr(buf, kind, &v.to_ne_bytes());
}

fn put_u64(buf: &mut Vec<u8>, kind: u16, v: u64) {
    put_attr(buf, kind, &v.to_ne_bytes());
}

/// A nested attribute around the attributes `inner` appends.
fn put_nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let mut body = Vec::new();
    inner(&mut body);
    put_attr(buf, kind | NLA_F_NESTED, &body);
}

/// A whole request: netlink header, generic header, attributes.
fn message(family: u16, seq: u32, cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + GENL_HDRLEN + attrs.len()) as u32;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

fn put_sockets(buf: &mut Vec<u8>, fds: &[u32]) {
    put_nested(buf, NBD_ATTR_SOCKETS, |b| {
        for fd in fds {
            put_nested(b, NBD_SOCK_ITEM, |item| put_u32(item, NBD_SOCK_FD, *fd));
        }
    });
}

/// `CTRL_CMD_GETFAMILY` for the family `name`.
pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    put_attr(&mut a, CTRL_ATTR_FAMILY_NAME, &z);
    message(GENL_ID_CTRL, seq, CTRL_CMD_GETFAMILY, 1, &a)
}

/// `NBD_CMD_CONNECT`.
pub fn encode_connect(family: u16, seq: u32, c: &ConnectConfig) -> Vec<u8> {
    let mut a = Vec::new();
    if let Some(i) = c.index {
        put_u32(&mut a, NBD_ATTR_INDEX, i);
    }
    put_u64(&mut a, NBD_ATTR_SIZE_BYTES, c.size_bytes);
    put_u64(&mut a, NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size);
    if c.timeout > 0 {
        put_u64(&mut a, NBD_ATTR_TIMEOUT, c.timeout);
    }
    put_u64(&mut a, NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout);
    put_u64(&mut a, NBD_ATTR_SERVER_FLAGS, c.server_flags);
    put_u64(&mut a, NBD_ATTR_CLIENT_FLAGS, c.client_flags);
    put_sockets(&mut a, &c.fds);
    message(family, seq, NBD_CMD_CONNECT, NBD_GENL_VERSION, &a)
}

/// `NBD_CMD_RECONFIGURE`: new sockets and/or a new size.
pub fn encode_reconfigure(family: u16, seq: u32, r: &Reconfigure) -> Vec<u8> {
    let mut a = Vec::new();
    put_u32(&mut a, NBD_ATTR_INDEX, r.index);
    if let Some(size) = r.size_bytes {
        put_u64(&mut a, NBD_ATTR_SIZE_BYTES, size);
    }
    if !r.fds.is_empty() {
        put_sockets(&mut a, &r.fds);
    }
    message(family, seq, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &a)
}

/// `NBD_CMD_DISCONNECT` of device `index`.
pub fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut a = Vec::new();
    put_u32(&mut a, NBD_ATTR_INDEX, index);
    message(family, seq, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &a)
}

/// `NBD_CMD_STATUS` of device `index`, or of every device.
pub fn encode_status(family: u16, seq: u32, index: Option<u32>) -> Vec<u8> {
    let mut a = Vec::new();
    if let Some(i) = index {
        put_u32(&mut a, NBD_ATTR_INDEX, i);
    }
    message(family, seq, NBD_CMD_STATUS, NBD_GENL_VERSION, &a)
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits an attribute stream; every length is checked against the buffer.
pub fn parse_attrs(mut b: &[u8]) -> Result<Vec<Attr>, ParseError> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(ne_u16(b, 0).ok_or_else(|| bad("attribute header"))?);
        let kind = ne_u16(b, 2).ok_or_else(|| bad("attribute header"))? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return Err(bad(format!("attribute length {len} of {} bytes", b.len())));
        }
        out.push(Attr {
            kind,
            payload: b[4..len].to_vec(),
        });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// Splits a datagram from the kernel into its messages.
pub fn parse_messages(mut b: &[u8]) -> Result<Vec<Message>, ParseError> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = ne_u32(b, 0).ok_or_else(|| bad("header"))? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(bad(format!("message length {len} of {} bytes", b.len())));
        }
        let ty = ne_u16(b, 4).ok_or_else(|| bad("header"))?;
        let seq = ne_u32(b, 8).ok_or_else(|| bad("header"))?;
        let body = &b[NLMSG_HDRLEN..len];
        out.push(parse_one(ty, seq, body)?);
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

fn parse_one(ty: u16, seq: u32, body: &[u8]) -> Result<Message, ParseError> {
    match ty {
        NLMSG_ERROR => {
            let e = ne_u32(body, 0).ok_or_else(|| bad("short NLMSG_ERROR"))? as i32;
            // The kernel sends a negated errno; i32::MIN has no positive counterpart.
            let errno = e
                .checked_neg()
                .ok_or_else(|| bad(format!("NLMSG_ERROR code {e} is no errno")))?;
            Ok(Message::Ack { seq, errno })
        }
        NLMSG_DONE => Ok(Message::Done { seq }),
        family => {
            let cmd = *body.first().ok_or_else(|| bad("short generic message"))?;
            let attrs = parse_attrs(body.get(GENL_HDRLEN..).ok_or_else(|| bad("short genl"))?)?;
            Ok(Message::Generic {
                family,
                seq,
                cmd,
                attrs,
            })
        }
    }
}

fn find(attrs: &[Attr], kind: u16) -> Option<&Attr> {
    attrs.iter().find(|a| a.kind == kind)
}

fn attr_u32(attrs: &[Attr], kind: u16) -> Option<u32> {
    ne_u32(&find(attrs, kind)?.payload, 0)
}

/// What `CTRL_CMD_GETFAMILY` answered: the family id and its multicast groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    pub mcast_groups: Vec<(String, u32)>,
}

/// Parses the controller's answer to [`encode_get_family`].
pub fn parse_family(attrs: &[Attr]) -> Result<Family, ParseError> {
    let id = find(attrs, CTRL_ATTR_FAMILY_ID)
        .and_then(|a| ne_u16(&a.payload, 0))
        .ok_or_else(|| bad("no CTRL_ATTR_FAMILY_ID"))?;
    let mut mcast_groups = Vec::new();
    if let Some(groups) = find(attrs, CTRL_ATTR_MCAST_GROUPS) {
        for g in parse_attrs(&groups.payload)? {
            let inner = parse_attrs(&g.payload)?;
            let name = find(&inner, CTRL_ATTR_MCAST_GRP_NAME).map(|a| {
                let s = a.payload.split(|c| *c == 0).next().unwrap_or_default();
                String::from_utf8_lossy(s).into_owned()
            });
            if let (Some(name), Some(gid)) = (name, attr_u32(&inner, CTRL_ATTR_MCAST_GRP_ID)) {
                mcast_groups.push((name, gid));
            }
        }
    }
    Ok(Family { id, mcast_groups })
}

/// The device index in a `CONNECT` reply or a `LINK_DEAD` announcement.
pub fn parse_index(attrs: &[Attr]) -> Option<u32> {
    attr_u32(attrs, NBD_ATTR_INDEX)
}

/// One device of a `STATUS` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

/// Parses a `STATUS` reply's device list.
pub fn parse_status(attrs: &[Attr]) -> Result<Vec<DeviceStatus>, ParseError> {
    let Some(list) = find(attrs, NBD_ATTR_DEVICE_LIST) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in parse_attrs(&list.payload)? {
        if item.kind != NBD_DEVICE_ITEM {
            continue;
        }
        let inner = parse_attrs(&item.payload)?;
        let index =
            attr_u32(&inner, NBD_DEVICE_INDEX).ok_or_else(|| bad("device without index"))?;
        let connected = find(&inner, NBD_DEVICE_CONNECTED)
            .and_then(|a| a.payload.first().copied())
            .unwrap_or(0);
        out.push(DeviceStatus {
            index,
            connected: connected != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[path = "netlink/tests.rs"]
mod tests;
