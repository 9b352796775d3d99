//! Byte-exact messages (little-endian hosts: netlink headers are in host order).
#![cfg(target_endian = "little")]

use super::*;

/// nlmsghdr (len, type, flags REQUEST|ACK, seq, pid 0) + genlmsghdr (cmd, version).
fn header(len: u32, ty: u16, seq: u32, cmd: u8, version: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&[5, 0]);
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&[cmd, version, 0, 0]);
    h
}

#[test]
fn get_family_request() {
    let m = encode_get_family(7, "nbd");
    let mut want = header(28, 0x10, 7, 3, 1);
    // CTRL_ATTR_FAMILY_NAME "nbd\0": len 8, type 2.
    want.extend_from_slice(&[8, 0, 2, 0, b'n', b'b', b'd', 0]);
    assert_eq!(m, want);
}

#[test]
fn connect_request_with_two_sockets() {
    let c = ConnectConfig {
        index: Some(3),
        size_bytes: 0x1000_0000,
        block_size: 4096,
        timeout: 30,
        dead_conn_timeout: 60,
        server_flags: 0x16d,
        client_flags: 0,
        fds: vec![5, 6],
    };
    let m = encode_connect(0x22, 9, &c);
    let mut want = header(0, 0x22, 9, 1, 1);
    want.extend_from_slice(&[8, 0, 1, 0, 3, 0, 0, 0]); // INDEX u32 3
    want.extend_from_slice(&[12, 0, 2, 0, 0, 0, 0, 0x10, 0, 0, 0, 0]); // SIZE_BYTES
    want.extend_from_slice(&[12, 0, 3, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]); // BLOCK_SIZE 4096
    want.extend_from_slice(&[12, 0, 4, 0, 30, 0, 0, 0, 0, 0, 0, 0]); // TIMEOUT
    want.extend_from_slice(&[12, 0, 8, 0, 60, 0, 0, 0, 0, 0, 0, 0]); // DEAD_CONN_TIMEOUT
    want.extend_from_slice(&[12, 0, 5, 0, 0x6d, 0x01, 0, 0, 0, 0, 0, 0]); // SERVER_FLAGS
    want.extend_from_slice(&[12, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // CLIENT_FLAGS
                                                                    // SOCKETS (nested, 0x8000|7) of two SOCK_ITEMs (nested, 0x8000|1) each one SOCK_FD.
    want.extend_from_slice(&[28, 0, 7, 0x80]);
    want.extend_from_slice(&[12, 0, 1, 0x80, 8, 0, 1, 0, 5, 0, 0, 0]);
    want.extend_from_slice(&[12, 0, 1, 0x80, 8, 0, 1, 0, 6, 0, 0, 0]);
    let len = want.len() as u32;
    want[..4].copy_from_slice(&len.to_le_bytes());
    assert_eq!(m, want);
    assert_eq!(m.len(), 20 + 8 + 6 * 12 + 28);
}

#[test]
fn connect_without_index_or_timeout_leaves_them_out() {
    let c = ConnectConfig {
        index: None,
        size_bytes: 512,
        block_size: 512,
        timeout: 0,
        dead_conn_timeout: 0,
        server_flags: 1,
        client_flags: 0,
        fds: vec![4],
    };
    let m = encode_connect(0x22, 1, &c);
    let attrs = parse_attrs(&m[20..]).unwrap();
    let kinds: Vec<u16> = attrs.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec![2, 3, 8, 5, 6, 7]);
}

#[test]
fn reconfigure_requests() {
    let r = Reconfigure {
        index: 2,
        fds: vec![9],
        size_bytes: None,
    };
    let mut want = header(0, 0x22, 4, 3, 1);
    want.extend_from_slice(&[8, 0, 1, 0, 2, 0, 0, 0]);
    want.extend_from_slice(&[16, 0, 7, 0x80, 12, 0, 1, 0x80, 8, 0, 1, 0, 9, 0, 0, 0]);
    let len = want.len() as u32;
    want[..4].copy_from_slice(&len.to_le_bytes());
    assert_eq!(encode_reconfigure(0x22, 4, &r), want);

    let grow = Reconfigure {
        index: 2,
        fds: vec![],
        size_bytes: Some(1 << 30),
    };
    let mut want = header(40, 0x22, 5, 3, 1);
    want.extend_from_slice(&[8, 0, 1, 0, 2, 0, 0, 0]);
    want.extend_from_slice(&[12, 0, 2, 0, 0, 0, 0, 0x40, 0, 0, 0, 0]);
    assert_eq!(encode_reconfigure(0x22, 5, &grow), want);
}

#[test]
fn disconnect_and_status_requests() {
    let mut want = header(28, 0x22, 1, 2, 1);
    want.extend_from_slice(&[8, 0, 1, 0, 6, 0, 0, 0]);
    assert_eq!(encode_disconnect(0x22, 1, 6), want);

    let mut want = header(28, 0x22, 2, 5, 1);
    want.extend_from_slice(&[8, 0, 1, 0, 1, 0, 0, 0]);
    assert_eq!(encode_status(0x22, 2, Some(1)), want);
    assert_eq!(encode_status(0x22, 3, None), header(20, 0x22, 3, 5, 1));
}

/// A kernel message: nlmsghdr of type `ty`, genl header with `cmd`, `attrs`.
fn kernel_msg(ty: u16, seq: u32, cmd: u8, attrs: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((20 + attrs.len()) as u32).to_le_bytes());
    m.extend_from_slice(&ty.to_le_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

#[test]
fn family_reply_with_multicast_group() {
    let mut a = Vec::new();
    a.extend_from_slice(&[8, 0, 2, 0, b'n', b'b', b'd', 0]);
    a.extend_from_slice(&[6, 0, 1, 0, 0x23, 0, 0, 0]); // FAMILY_ID u16 0x23, padded
                                                       // MCAST_GROUPS { 1: { NAME "nbd_mc_group\0", ID 5 } }
    let mut grp = Vec::new();
    grp.extend_from_slice(&[17, 0, 1, 0]);
    grp.extend_from_slice(b"nbd_mc_group\0");
    grp.extend_from_slice(&[0, 0, 0]);
    grp.extend_from_slice(&[8, 0, 2, 0, 5, 0, 0, 0]);
    let mut item = vec![(4 + grp.len()) as u8, 0, 1, 0x80];
    item.extend_from_slice(&grp);
    a.extend_from_slice(&[(4 + item.len()) as u8, 0, 7, 0x80]);
    a.extend_from_slice(&item);
    let msgs = parse_messages(&kernel_msg(0x10, 7, 1, &a)).unwrap();
    let Message::Generic { attrs, cmd, .. } = &msgs[0] else {
        panic!("{msgs:?}")
    };
    assert_eq!(*cmd, 1);
    let f = parse_family(attrs).unwrap();
    assert_eq!(f.id, 0x23);
    assert_eq!(f.mcast_groups, vec![("nbd_mc_group".to_string(), 5)]);
}

#[test]
fn acks_errors_replies_and_link_dead() {
    let mut b = Vec::new();
    // CONNECT reply with INDEX 4, then an ack (error 0) for seq 3.
    b.extend_from_slice(&kernel_msg(0x23, 3, 1, &[8, 0, 1, 0, 4, 0, 0, 0]));
    let mut ack = Vec::new();
    ack.extend_from_slice(&36u32.to_le_bytes());
    ack.extend_from_slice(&[2, 0, 0, 0]);
    ack.extend_from_slice(&3u32.to_le_bytes());
    ack.extend_from_slice(&[0; 4]);
    ack.extend_from_slice(&(-16i32).to_le_bytes()); // -EBUSY
    ack.extend_from_slice(&[0; 16]); // the request's header
    b.extend_from_slice(&ack);
    let msgs = parse_messages(&b).unwrap();
    assert_eq!(msgs.len(), 2);
    match &msgs[0] {
        Message::Generic { attrs, seq: 3, .. } => assert_eq!(parse_index(attrs), Some(4)),
        m => panic!("{m:?}"),
    }
    assert_eq!(msgs[1], Message::Ack { seq: 3, errno: 16 });

    let dead = parse_messages(&kernel_msg(0x23, 0, 4, &[8, 0, 1, 0, 2, 0, 0, 0])).unwrap();
    assert!(
        matches!(&dead[0], Message::Generic { cmd: NBD_CMD_LINK_DEAD, attrs, .. }
        if parse_index(attrs) == Some(2))
    );
}

#[test]
fn status_reply() {
    // DEVICE_LIST { ITEM { INDEX 0, CONNECTED 1 }, ITEM { INDEX 1, CONNECTED 0 } }
    let item = |i: u8, c: u8| vec![20, 0, 1, 0, 8, 0, 1, 0, i, 0, 0, 0, 5, 0, 2, 0, c, 0, 0, 0];
    let mut list = vec![44, 0, 9, 0];
    list.extend(item(0, 1));
    list.extend(item(1, 0));
    let msgs = parse_messages(&kernel_msg(0x23, 2, 5, &list)).unwrap();
    let Message::Generic { attrs, .. } = &msgs[0] else {
        panic!()
    };
    let st = parse_status(attrs).unwrap();
    assert_eq!(
        st,
        vec![
            DeviceStatus {
                index: 0,
                connected: true
            },
            DeviceStatus {
                index: 1,
                connected: false
            }
        ]
    );
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    assert!(parse_messages(&[255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    assert!(parse_attrs(&[200, 0, 1, 0, 1]).is_err());
    assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
    let short_err = kernel_msg(2, 1, 0, &[])[..16].to_vec();
    let mut m = short_err.clone();
    m[0] = 16;
    assert!(parse_messages(&m).is_err());
    assert_eq!(parse_messages(&[1, 2, 3]).unwrap(), vec![]);
    // A status item without its index.
    let mut list = vec![12, 0, 9, 0, 8, 0, 1, 0, 5, 0, 2, 0];
    list.extend([1, 0, 0, 0]);
    list[0] = 16;
    list[4] = 12;
    let attrs = parse_attrs(&list).unwrap();
    assert!(parse_status(&attrs).is_err());
}

/// Found by the netlink_reply fuzz target: an NLMSG_ERROR code of i32::MIN overflowed
/// the negation (a panic with overflow checks, a negative "errno" without).
#[test]
fn an_error_code_with_no_errno_is_malformed() {
    let mut ack = Vec::new();
    ack.extend_from_slice(&36u32.to_ne_bytes());
    ack.extend_from_slice(&2u16.to_ne_bytes());
    ack.extend_from_slice(&[0; 2]);
    ack.extend_from_slice(&9u32.to_ne_bytes());
    ack.extend_from_slice(&[0; 4]);
    ack.extend_from_slice(&i32::MIN.to_ne_bytes());
    ack.extend_from_slice(&[0; 16]);
    let e = parse_messages(&ack).unwrap_err();
    assert!(e.to_string().contains("no errno"), "{e}");
}
