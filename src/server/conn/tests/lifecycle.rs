//! Disconnects: a client that goes away in the middle of a request header or a write
//! payload ends the connection cleanly, with the reason recorded.

use super::*;

#[test]
fn client_cut_in_a_write_payload_ends_the_connection_cleanly() {
    let mut s = start(false, false);
    s.send(Command::Write, 0, 1, 0, 4096);
    s.client.write_all(&[1u8; 100]).unwrap();
    s.client.shutdown(Shutdown::Write).unwrap();
    let reason = s.finish();
    assert!(reason.contains("write payload"), "{reason}");
}

#[test]
fn client_cut_in_a_request_header_ends_the_connection_cleanly() {
    let mut s = start(false, false);
    s.client.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    s.client.shutdown(Shutdown::Write).unwrap();
    let reason = s.finish();
    assert!(reason.contains("middle of a request"), "{reason}");
}

#[test]
fn a_bad_request_magic_closes_the_connection() {
    let mut s = start(false, false);
    let mut header = encode_request(&Request {
        flags: 0,
        command: Command::Read,
        cookie: 1,
        offset: 0,
        len: 512,
    });
    header[0] ^= 0xff;
    s.client.write_all(&header).unwrap();
    let reason = s.finish();
    assert!(reason.contains("bad request magic"), "{reason}");
}

#[test]
fn a_read_or_write_over_the_payload_limit_closes_the_connection() {
    for command in [Command::Write, Command::Read] {
        let mut s = start(false, false);
        // The header alone: the server must not wait for (or allocate) 33 MiB.
        s.send(command, 0, 1, 0, nbd::MAX_PAYLOAD + 4096);
        let reason = s.finish();
        assert!(
            reason.contains("exceeds the 32 MiB limit"),
            "{command:?}: {reason}"
        );
    }
}

#[test]
fn disc_after_requests_answers_them_all_then_closes() {
    let mut s = start(false, false);
    s.write(1, 0, &[3u8; 4096]);
    s.send(Command::Flush, 0, 2, 0, 0);
    s.send(Command::Disc, 0, 3, 0, 0);
    let mut cookies = [s.simple(), s.simple()];
    cookies.sort();
    assert_eq!(cookies, [(0, 1), (0, 2)]);
    let reason = s.finish();
    assert!(reason.contains("NBD_CMD_DISC"), "{reason}");
}
