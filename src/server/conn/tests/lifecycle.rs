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
