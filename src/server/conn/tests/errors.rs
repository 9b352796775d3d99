//! Error paths: requests refused by validation (EINVAL, ENOSPC, EPERM) and device
//! failures (EIO), each answered while the session goes on.

use super::*;

#[test]
fn out_of_range_requests_get_einval_or_enospc_and_the_session_goes_on() {
    let mut s = start(false, false);
    s.send(Command::Read, 0, 1, SIZE - 512, 1024);
    assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 1));
    // The refused write's payload is read and discarded.
    s.write(2, SIZE - 512, &[1u8; 1024]);
    assert_eq!(s.simple(), (NbdErrno::NoSpc.wire(), 2));
    s.send(Command::WriteZeroes, 0, 3, SIZE, 512);
    assert_eq!(s.simple(), (NbdErrno::NoSpc.wire(), 3));
    s.send(Command::Trim, 0, 4, u64::MAX - 10, 512);
    assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 4));
    s.send(Command::Flush, 0, 5, 0, 0);
    assert_eq!(s.simple(), (0, 5));
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let mut s = start(true, false);
    s.write(1, 0, &[1u8; 512]);
    assert_eq!(s.simple(), (NbdErrno::Perm.wire(), 1));
    s.send(Command::Trim, 0, 2, 0, 512);
    assert_eq!(s.simple(), (NbdErrno::Perm.wire(), 2));
    s.send(Command::WriteZeroes, 0, 3, 0, 512);
    assert_eq!(s.simple(), (NbdErrno::Perm.wire(), 3));
    s.send(Command::Read, 0, 4, 0, 512);
    assert_eq!(s.simple(), (0, 4));
    let mut back = [9u8; 512];
    s.client.read_exact(&mut back).unwrap();
    assert_eq!(back, [0u8; 512]);
}

#[test]
fn device_failure_becomes_eio_in_a_structured_error_chunk() {
    let mut s = start(false, true);
    s.write(1, 0, &[1u8; 512]);
    assert_eq!(s.simple(), (0, 1));
    s.dev.fail_reads(true);
    s.send(Command::Read, 0, 2, 0, 512);
    let (h, p) = s.chunk();
    assert_eq!(
        (h.reply_type, h.cookie, h.done()),
        (REPLY_TYPE_ERROR, 2, true)
    );
    assert_eq!(be32(&p), NbdErrno::Io.wire());
}

#[test]
fn unknown_commands_and_flags_get_einval_and_the_session_goes_on() {
    let mut s = start(false, false);
    s.send(Command::Unknown(99), 0, 1, 0, 512);
    assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 1));
    // NO_HOLE only means something on WRITE_ZEROES; REQ_ONE only on BLOCK_STATUS.
    s.send(Command::Read, CMD_FLAG_NO_HOLE, 2, 0, 512);
    assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 2));
    s.send(Command::Trim, CMD_FLAG_REQ_ONE, 3, 0, 512);
    assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 3));
    // FLUSH carries no range.
    s.send(Command::Flush, 0, 4, 0, 512);
    assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 4));
    s.send(Command::Flush, 0, 5, 0, 0);
    assert_eq!(s.simple(), (0, 5));
}

#[test]
fn block_status_without_a_negotiated_context_gets_einval() {
    let mut s = start(false, false);
    s.send(Command::BlockStatus, 0, 1, 0, 4096);
    assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 1));
    let mut s = start(false, true);
    s.send(Command::BlockStatus, 0, 2, 0, 0);
    let (h, p) = s.chunk();
    assert_eq!((h.reply_type, h.cookie), (REPLY_TYPE_ERROR, 2));
    assert_eq!(be32(&p), NbdErrno::Inval.wire());
}
