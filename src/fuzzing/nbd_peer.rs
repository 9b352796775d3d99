//! Bytes from the peers cryptvol is a client of: an NBD server's handshake and replies
//! (import and export sources, `attach`), the kernel's generic-netlink replies, and the
//! NBD URIs that name a source.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::input::Input;
use crate::attach::netlink::{
    encode_connect, encode_reconfigure, parse_family, parse_index, parse_messages, parse_status,
    ConnectConfig, Message, Reconfigure,
};
use crate::nbdclient::{NbdClient, NbdUri};

/// Most server bytes one input plays (well within a Unix socket's buffer, so writing
/// them never blocks).
const MAX_SERVER_BYTES: usize = 32 << 10;

/// The server's whole side of a connection: the handshake the client negotiates
/// `disk` over, then replies to a READ, a WRITE, a WRITE_ZEROES and a FLUSH.
pub fn nbd_client(data: &[u8]) -> bool {
    let data = &data[..data.len().min(MAX_SERVER_BYTES)];
    let Ok((client_end, mut server_end)) = UnixStream::pair() else {
        panic!("no socket pair");
    };
    server_end
        .write_all(data)
        .expect("writing the server's bytes");
    // The client then reads end-of-file, never blocks; the server end stays open until
    // the client is gone, so the client's writes never raise SIGPIPE.
    server_end.shutdown(Shutdown::Write).expect("shutdown");
    let negotiated = NbdClient::over_unix_stream(client_end, "fuzz-server".into(), "disk".into());
    let accepted = negotiated.is_ok();
    if let Ok(client) = negotiated {
        use_client(client);
    }
    drop(server_end);
    accepted
}

/// What a negotiated client must report, and its requests against the fuzzed replies.
fn use_client(mut client: NbdClient) {
    let details = client.details();
    if let Some((min, pref, max)) = details.block_size {
        assert!(
            min >= 1 && min <= pref && pref <= max,
            "block sizes {min}/{pref}/{max} accepted"
        );
    }
    assert!(client.request_size() > 0);
    let len = client.size().min(4096) as usize;
    let mut buf = vec![0u8; len];
    if client.read_at(&mut buf, 0).is_err() {
        return;
    }
    if client.read_only() {
        assert!(
            client.write_at(&buf, 0).is_err(),
            "a write to a read-only export was sent"
        );
        return;
    }
    let _ = client.write_at(&buf, 0);
    let _ = client.write_zeroes(0, len as u64);
    let _ = client.flush();
    client.disconnect();
}

/// A datagram from the kernel: its messages, and in each generic message the family,
/// device index and device status it may carry. Our own CONNECT and RECONFIGURE
/// messages, built from the input, must parse back.
pub fn netlink_reply(data: &[u8]) -> bool {
    let parsed = parse_messages(data);
    let accepted = parsed.as_ref().is_ok_and(|m| !m.is_empty());
    if let Ok(messages) = parsed {
        for m in messages {
            if let Message::Generic { attrs, .. } = m {
                let _ = parse_family(&attrs);
                let _ = parse_index(&attrs);
                let _ = parse_status(&attrs);
            }
        }
    }
    let mut input = Input(data);
    // Below 16 are netlink's own message types, not families.
    let family = (input.u32() as u16).max(16);
    let seq = input.u32();
    let connect = ConnectConfig {
        index: (input.byte() & 1 != 0).then(|| input.u32()),
        size_bytes: input.u64(),
        block_size: input.u64(),
        timeout: input.u64(),
        dead_conn_timeout: input.u64(),
        server_flags: input.u64(),
        client_flags: input.u64(),
        fds: (0..input.byte() % 8).map(|_| input.u32()).collect(),
    };
    let index = parse_back(&encode_connect(family, seq, &connect), family, seq);
    assert_eq!(
        index, connect.index,
        "CONNECT's device index does not parse back"
    );
    let reconfigure = Reconfigure {
        index: input.u32(),
        fds: (0..input.byte() % 8).map(|_| input.u32()).collect(),
        size_bytes: (input.byte() & 1 != 0).then(|| input.u64()),
    };
    let index = parse_back(&encode_reconfigure(family, seq, &reconfigure), family, seq);
    assert_eq!(index, Some(reconfigure.index));
    accepted
}

/// Parses a message this code encoded: exactly one generic message of `family` and
/// `seq`; its device index attribute.
fn parse_back(bytes: &[u8], family: u16, seq: u32) -> Option<u32> {
    let messages = match parse_messages(bytes) {
        Ok(m) => m,
        Err(e) => panic!("our own netlink message does not parse: {e}"),
    };
    match messages.as_slice() {
        [Message::Generic {
            family: f,
            seq: s,
            attrs,
            ..
        }] if *f == family && *s == seq => parse_index(attrs),
        other => panic!("our own netlink message parsed as {other:?}"),
    }
}

/// An NBD URI (UTF-8 input only): parsed, printed and parsed again to the same URI.
pub fn nbd_uri(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let _ = NbdUri::looks_like_uri(text);
    let Ok(uri) = NbdUri::parse(text) else {
        return false;
    };
    let printed = uri.to_string();
    match NbdUri::parse(&printed) {
        Ok(again) => assert_eq!(again, uri, "{text:?} printed as {printed:?}"),
        Err(e) => panic!("{text:?} printed as {printed:?}, which does not parse: {e}"),
    }
    true
}
