//! Unit and property tests for the transmission phase.

use proptest::prelude::*;

use super::*;

fn export(size: u64, read_only: bool) -> ExportInfo {
    ExportInfo {
        name: "e".to_owned(),
        description: String::new(),
        size,
        read_only,
        min_block: 4096,
        preferred_block: 4096,
        max_block: MAX_PAYLOAD,
    }
}

fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        command,
        cookie: 0xdead_beef_0000_0001,
        offset,
        len,
    }
}

fn header(magic: u32, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&magic.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

fn rejected(errno: NbdErrno) -> Result<ValidRequest, Rejection> {
    Err(Rejection { errno })
}

// ----- Error values -----

#[test]
fn errno_wire_values_match_the_spec() {
    let expected = [
        (NbdErrno::Perm, 1),
        (NbdErrno::Io, 5),
        (NbdErrno::NoMem, 12),
        (NbdErrno::Inval, 22),
        (NbdErrno::NoSpc, 28),
        (NbdErrno::Overflow, 75),
        (NbdErrno::NotSup, 95),
        (NbdErrno::Shutdown, 108),
    ];
    for (errno, wire) in expected {
        assert_eq!(errno.wire(), wire);
        assert_eq!(NbdErrno::from_wire(wire), Some(errno));
        assert!(errno.name().starts_with("NBD_E"));
    }
    assert_eq!(NbdErrno::ALL.len(), expected.len());
    assert_eq!(NbdErrno::from_wire(0), None);
    assert_eq!(NbdErrno::from_wire(38), None);
}

#[test]
fn host_errors_map_to_portable_values() {
    let os = |code| NbdErrno::from_io_error(&io::Error::from_raw_os_error(code));
    assert_eq!(os(libc::EPERM), NbdErrno::Perm);
    assert_eq!(os(libc::EACCES), NbdErrno::Perm);
    assert_eq!(os(libc::EROFS), NbdErrno::Perm);
    assert_eq!(os(libc::EIO), NbdErrno::Io);
    assert_eq!(os(libc::ENOMEM), NbdErrno::NoMem);
    assert_eq!(os(libc::EINVAL), NbdErrno::Inval);
    assert_eq!(os(libc::EOVERFLOW), NbdErrno::Inval);
    assert_eq!(os(libc::ENOSPC), NbdErrno::NoSpc);
    assert_eq!(os(libc::EDQUOT), NbdErrno::NoSpc);
    assert_eq!(os(libc::EFBIG), NbdErrno::NoSpc);
    assert_eq!(os(libc::ESHUTDOWN), NbdErrno::Shutdown);
    assert_eq!(os(libc::EOPNOTSUPP), NbdErrno::Io);
    assert_eq!(os(libc::ENOSYS), NbdErrno::Io);
    let kind = |k: io::ErrorKind| NbdErrno::from_io_error(&io::Error::new(k, "x"));
    assert_eq!(kind(io::ErrorKind::PermissionDenied), NbdErrno::Perm);
    assert_eq!(kind(io::ErrorKind::OutOfMemory), NbdErrno::NoMem);
    assert_eq!(kind(io::ErrorKind::InvalidInput), NbdErrno::Inval);
    assert_eq!(kind(io::ErrorKind::StorageFull), NbdErrno::NoSpc);
    assert_eq!(kind(io::ErrorKind::UnexpectedEof), NbdErrno::Io);
}

// ----- Parsing and encoding -----

#[test]
fn parses_a_kernel_style_write_header() {
    let b = header(0x2560_9513, 0x0001, 1, 0x0102_0304_0506_0708, 4096, 512);
    assert_eq!(
        parse_request(&b),
        Ok(Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        })
    );
    assert_eq!(encode_request(&parse_request(&b).unwrap()), b);
}

#[test]
fn bad_magic_is_a_framing_error() {
    for magic in [0x2560_9514, 0x1256_0953, EXTENDED_REQUEST_MAGIC, 0] {
        let b = header(magic, 0, 0, 0, 0, 0);
        assert_eq!(parse_request(&b), Err(FrameError::BadMagic(magic)));
    }
}

#[test]
fn oversized_read_and_write_are_framing_errors() {
    for kind in [CMD_READ, CMD_WRITE] {
        let ok = header(REQUEST_MAGIC, 0, kind, 1, 0, MAX_PAYLOAD);
        assert_eq!(parse_request(&ok).map(|r| r.len), Ok(MAX_PAYLOAD));
        let big = header(REQUEST_MAGIC, 0, kind, 1, 0, MAX_PAYLOAD + 1);
        assert_eq!(
            parse_request(&big),
            Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
        );
        let max = header(REQUEST_MAGIC, 0, kind, 1, 0, u32::MAX);
        assert_eq!(parse_request(&max), Err(FrameError::TooLarge(u32::MAX)));
    }
}

#[test]
fn payload_less_commands_take_any_length() {
    for kind in [CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS, 99] {
        let b = header(REQUEST_MAGIC, 0, kind, 1, 0, u32::MAX);
        let r = parse_request(&b).unwrap();
        assert_eq!(r.len, u32::MAX);
        assert_eq!(r.command.wire(), kind);
        assert_eq!(r.payload_len(), 0);
    }
}

#[test]
fn only_write_has_a_payload() {
    assert_eq!(req(Command::Write, 0, 0, 77).payload_len(), 77);
    for command in [
        Command::Read,
        Command::Disc,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
        Command::Unknown(1000),
    ] {
        assert_eq!(req(command, 0, 0, 77).payload_len(), 0, "{command:?}");
    }
}

#[test]
fn command_numbers() {
    let all = [
        (Command::Read, 0),
        (Command::Write, 1),
        (Command::Disc, 2),
        (Command::Flush, 3),
        (Command::Trim, 4),
        (Command::Cache, 5),
        (Command::WriteZeroes, 6),
        (Command::BlockStatus, 7),
        (Command::Unknown(8), 8),
        (Command::Unknown(0xffff), 0xffff),
    ];
    for (command, wire) in all {
        assert_eq!(command.wire(), wire);
        assert_eq!(Command::from_wire(wire), command);
    }
}

#[test]
fn simple_reply_is_byte_exact() {
    assert_eq!(
        encode_simple_reply(0x0102_0304_0506_0708, None),
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(
        encode_simple_reply(u64::MAX, Some(NbdErrno::NoSpc)),
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
    );
    let decoded = decode_simple_reply(&encode_simple_reply(42, Some(NbdErrno::Perm)));
    assert_eq!(
        decoded,
        Some(SimpleReply {
            error: 1,
            cookie: 42
        })
    );
    let mut bad = encode_simple_reply(42, None);
    bad[3] = 0;
    assert_eq!(decode_simple_reply(&bad), None);
}

// ----- Transmission flags -----

#[test]
fn transmission_flags_for_writable_and_read_only_exports() {
    let rw = transmission_flags(&export(4096, false));
    assert_eq!(
        rw,
        FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN
    );
    assert_eq!(rw, 0x056d);
    let ro = transmission_flags(&export(4096, true));
    assert_eq!(
        ro,
        FLAG_HAS_FLAGS
            | FLAG_READ_ONLY
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN
    );
    for flags in [rw, ro] {
        // Never advertised without structured replies / fast-zero support.
        assert_eq!(flags & (FLAG_SEND_DF | FLAG_SEND_FAST_ZERO), 0);
        assert_eq!(flags & FLAG_HAS_FLAGS, FLAG_HAS_FLAGS);
    }
}

// ----- Validation -----

#[test]
fn valid_requests_of_every_command() {
    let e = export(1 << 20, false);
    let fua = CMD_FLAG_FUA;
    let cases = [
        (
            req(Command::Read, 0, 512, 1024),
            ValidRequest::Read {
                offset: 512,
                len: 1024,
            },
        ),
        (
            req(Command::Write, fua, 0, 4096),
            ValidRequest::Write {
                offset: 0,
                len: 4096,
                fua: true,
            },
        ),
        (
            req(Command::Write, 0, 1, 3),
            ValidRequest::Write {
                offset: 1,
                len: 3,
                fua: false,
            },
        ),
        (req(Command::Flush, 0, 0, 0), ValidRequest::Flush),
        (
            req(Command::Trim, fua, 4096, 4096),
            ValidRequest::Trim {
                offset: 4096,
                len: 4096,
                fua: true,
            },
        ),
        (
            req(Command::Cache, 0, 0, 1 << 20),
            ValidRequest::Cache {
                offset: 0,
                len: 1 << 20,
            },
        ),
        (
            req(Command::WriteZeroes, fua | CMD_FLAG_NO_HOLE, 0, 1 << 20),
            ValidRequest::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: true,
                no_hole: true,
            },
        ),
        (
            req(Command::WriteZeroes, 0, 8, 8),
            ValidRequest::WriteZeroes {
                offset: 8,
                len: 8,
                fua: false,
                no_hole: false,
            },
        ),
        (req(Command::Disc, 0, 0, 0), ValidRequest::Disc),
    ];
    for (request, expected) in cases {
        assert_eq!(validate(&request, &e), Ok(expected), "{request:?}");
    }
}

#[test]
fn unknown_commands_and_block_status_without_context_are_einval() {
    let e = export(1 << 20, false);
    for command in [
        Command::BlockStatus,
        Command::Unknown(8),
        Command::Unknown(0xffff),
    ] {
        assert_eq!(
            validate(&req(command, 0, 0, 512), &e),
            rejected(NbdErrno::Inval)
        );
    }
}

#[test]
fn fua_is_accepted_on_every_command() {
    let e = export(1 << 20, false);
    for command in [
        Command::Read,
        Command::Write,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
    ] {
        let len = if command == Command::Flush { 0 } else { 512 };
        assert!(
            validate(&req(command, CMD_FLAG_FUA, 0, len), &e).is_ok(),
            "{command:?}"
        );
    }
}

#[test]
fn flags_not_valid_for_the_command_are_einval() {
    let e = export(1 << 20, false);
    let cases = [
        (Command::Read, CMD_FLAG_NO_HOLE),
        (Command::Write, CMD_FLAG_NO_HOLE),
        (Command::Trim, CMD_FLAG_NO_HOLE),
        (Command::Read, CMD_FLAG_DF), // needs structured replies
        (Command::Read, CMD_FLAG_REQ_ONE),
        (Command::WriteZeroes, CMD_FLAG_FAST_ZERO), // SEND_FAST_ZERO not advertised
        (Command::WriteZeroes, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE),
        (Command::Write, CMD_FLAG_PAYLOAD_LEN), // extended headers only
        (Command::Cache, 1 << 6),
        (Command::Flush, 1 << 15),
        (Command::Write, 0xffff),
    ];
    for (command, flags) in cases {
        let len = if command == Command::Flush { 0 } else { 512 };
        assert_eq!(
            validate(&req(command, flags, 0, len), &e),
            rejected(NbdErrno::Inval),
            "{command:?} {flags:#x}"
        );
    }
}

#[test]
fn disc_is_always_accepted() {
    let e = export(0, true);
    let r = req(Command::Disc, 0xffff, u64::MAX, u32::MAX);
    assert_eq!(validate(&r, &e), Ok(ValidRequest::Disc));
}

#[test]
fn writes_to_read_only_exports_are_eperm() {
    let e = export(1 << 20, true);
    for command in [Command::Write, Command::Trim, Command::WriteZeroes] {
        assert_eq!(
            validate(&req(command, 0, 0, 512), &e),
            rejected(NbdErrno::Perm)
        );
        // Permission is checked before the range.
        assert_eq!(
            validate(&req(command, 0, u64::MAX, 512), &e),
            rejected(NbdErrno::Perm)
        );
    }
    assert!(validate(&req(Command::Read, 0, 0, 512), &e).is_ok());
    assert!(validate(&req(Command::Cache, 0, 0, 512), &e).is_ok());
    assert_eq!(
        validate(&req(Command::Flush, 0, 0, 0), &e),
        Ok(ValidRequest::Flush)
    );
}

#[test]
fn flush_with_offset_or_length_is_einval() {
    let e = export(1 << 20, false);
    assert_eq!(
        validate(&req(Command::Flush, 0, 1, 0), &e),
        rejected(NbdErrno::Inval)
    );
    assert_eq!(
        validate(&req(Command::Flush, 0, 0, 1), &e),
        rejected(NbdErrno::Inval)
    );
}

#[test]
fn out_of_range_requests() {
    let size = 1 << 20;
    let e = export(size, false);
    let beyond = [
        (size - 511, 512),    // one byte past the end
        (size, 1),            // starts at the end
        (size + 1, 0),        // zero length, but starts past the end
        (u64::MAX, 1),        // offset + len overflows
        (u64::MAX - 10, 512), // overflows
        (0, u32::MAX),        // far longer than the export
    ];
    for (offset, len) in beyond {
        for (command, errno) in [
            (Command::Read, NbdErrno::Inval),
            (Command::Trim, NbdErrno::Inval),
            (Command::Cache, NbdErrno::Inval),
            (Command::Write, NbdErrno::NoSpc),
            (Command::WriteZeroes, NbdErrno::NoSpc),
        ] {
            if command == Command::Read && len > MAX_PAYLOAD {
                continue; // cannot be parsed; covered below
            }
            assert_eq!(
                validate(&req(command, 0, offset, len), &e),
                rejected(errno),
                "{command:?} {offset} {len}"
            );
        }
    }
}

#[test]
fn requests_ending_exactly_at_the_end_and_zero_lengths_are_valid() {
    let size = 1 << 20;
    let e = export(size, false);
    for command in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
    ] {
        assert!(validate(&req(command, 0, size - 512, 512), &e).is_ok());
        assert!(validate(&req(command, 0, 0, 0), &e).is_ok());
        assert!(validate(&req(command, 0, size, 0), &e).is_ok());
    }
    let empty = export(0, false);
    assert_eq!(
        validate(&req(Command::Read, 0, 0, 0), &empty),
        Ok(ValidRequest::Read { offset: 0, len: 0 })
    );
    assert_eq!(
        validate(&req(Command::Read, 0, 0, 1), &empty),
        rejected(NbdErrno::Inval)
    );
}

#[test]
fn huge_trim_and_zeroes_within_a_large_export_are_valid() {
    let e = export(1 << 40, false);
    assert!(validate(&req(Command::Trim, 0, 0, u32::MAX), &e).is_ok());
    assert!(validate(&req(Command::WriteZeroes, 0, 4096, u32::MAX), &e).is_ok());
}

#[test]
fn hand_built_oversized_read_or_write_is_einval() {
    let e = export(1 << 40, false);
    for command in [Command::Read, Command::Write] {
        assert_eq!(
            validate(&req(command, 0, 0, MAX_PAYLOAD + 1), &e),
            rejected(NbdErrno::Inval)
        );
    }
}

#[test]
fn unaligned_requests_are_served() {
    // min_block is 4096, but read-modify-write serves any alignment.
    let e = export(1 << 20, false);
    assert!(validate(&req(Command::Write, 0, 1, 1), &e).is_ok());
    assert!(validate(&req(Command::Read, 0, 513, 7), &e).is_ok());
}

// ----- Properties -----

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![0u16..10, any::<u16>()].prop_map(Command::from_wire)
}

fn arb_flags() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(0),
        Just(CMD_FLAG_FUA),
        Just(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE),
        0u16..0x40,
        any::<u16>(),
    ]
}

fn arb_request() -> impl Strategy<Value = Request> {
    (
        arb_flags(),
        arb_command(),
        any::<u64>(),
        prop_oneof![0u64..(1 << 21), any::<u64>()],
        prop_oneof![0u32..(1 << 21), any::<u32>()],
    )
        .prop_map(|(flags, command, cookie, offset, len)| Request {
            flags,
            command,
            cookie,
            offset,
            len,
        })
}

/// 28 arbitrary bytes, half of the time starting with the request magic.
fn arb_header() -> impl Strategy<Value = [u8; 28]> {
    (any::<bool>(), any::<[u8; 28]>()).prop_map(|(with_magic, mut b)| {
        if with_magic {
            b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        b
    })
}

proptest! {
    #[test]
    fn parse_request_never_panics_and_round_trips(bytes in arb_header()) {
        let magic_ok = bytes[..4] == REQUEST_MAGIC.to_be_bytes();
        prop_assert_eq!(
            matches!(parse_request(&bytes), Err(FrameError::BadMagic(_))),
            !magic_ok
        );
        if let Ok(r) = parse_request(&bytes) {
            prop_assert_eq!(encode_request(&r), bytes);
            if matches!(r.command, Command::Read | Command::Write) {
                prop_assert!(r.len <= MAX_PAYLOAD);
            }
        }
    }

    #[test]
    fn encode_then_parse_is_identity(r in arb_request()) {
        let parsed = parse_request(&encode_request(&r));
        if matches!(r.command, Command::Read | Command::Write) && r.len > MAX_PAYLOAD {
            prop_assert_eq!(parsed, Err(FrameError::TooLarge(r.len)));
        } else {
            prop_assert_eq!(parsed, Ok(r));
        }
    }

    #[test]
    fn validate_never_accepts_out_of_range_or_forbidden_requests(
        r in arb_request(),
        size in prop_oneof![0u64..(1 << 21), any::<u64>()],
        read_only in any::<bool>(),
    ) {
        let e = export(size, read_only);
        let flags = transmission_flags(&e);
        match validate(&r, &e) {
            Ok(ValidRequest::Disc) => prop_assert_eq!(r.command, Command::Disc),
            Ok(ValidRequest::Flush) => {
                prop_assert_eq!((r.command, r.offset, r.len), (Command::Flush, 0, 0));
            }
            Ok(valid) => {
                let (offset, len, writes) = match valid {
                    ValidRequest::Read { offset, len } => (offset, len, false),
                    ValidRequest::Cache { offset, len } => (offset, len, false),
                    ValidRequest::Write { offset, len, .. } => (offset, len, true),
                    ValidRequest::Trim { offset, len, .. } => (offset, len, true),
                    ValidRequest::WriteZeroes { offset, len, .. } => (offset, len, true),
                    // No metadata context negotiated: BLOCK_STATUS is always refused.
                    ValidRequest::Disc | ValidRequest::Flush | ValidRequest::BlockStatus { .. } => {
                        unreachable!()
                    }
                };
                prop_assert_eq!((offset, len), (r.offset, r.len));
                let end = offset.checked_add(u64::from(len));
                prop_assert!(end.is_some_and(|end| end <= size));
                prop_assert!(!(writes && read_only));
                prop_assert_eq!(r.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE), 0);
                // Only commands the export advertises get through.
                if matches!(valid, ValidRequest::Trim { .. }) {
                    prop_assert!(flags & FLAG_SEND_TRIM != 0);
                }
                if matches!(valid, ValidRequest::WriteZeroes { .. }) {
                    prop_assert!(flags & FLAG_SEND_WRITE_ZEROES != 0);
                }
            }
            Err(Rejection { errno }) => {
                prop_assert!(matches!(
                    errno,
                    NbdErrno::Inval | NbdErrno::Perm | NbdErrno::NoSpc
                ));
            }
        }
    }

    #[test]
    fn ranges_near_the_end_are_accepted_exactly_when_inside(
        size in 0u64..(1 << 21),
        len in 0u32..4096,
        past_end in -3i64..=3,
        command in prop_oneof![
            Just(Command::Read),
            Just(Command::Write),
            Just(Command::Trim),
            Just(Command::Cache),
            Just(Command::WriteZeroes),
        ],
    ) {
        // The request ends `past_end` bytes after the end of the export.
        let end = size.checked_add_signed(past_end);
        let offset = end.and_then(|end| end.checked_sub(u64::from(len)));
        prop_assume!(offset.is_some());
        let offset = offset.unwrap();
        let result = validate(&req(command, 0, offset, len), &export(size, false));
        prop_assert_eq!(result.is_ok(), past_end <= 0);
    }
}

// ----- BLOCK_STATUS -----

const WITH_CONTEXT: Negotiated = Negotiated {
    structured_replies: true,
    base_allocation: Some(1),
};

#[test]
fn block_status_needs_a_negotiated_context() {
    let e = export(1 << 20, false);
    let r = req(Command::BlockStatus, 0, 0, 4096);
    let sr_only = Negotiated {
        structured_replies: true,
        base_allocation: None,
    };
    for negotiated in [Negotiated::default(), sr_only] {
        assert_eq!(
            validate_negotiated(&r, &e, &negotiated),
            rejected(NbdErrno::Inval)
        );
        // Even with flags that would otherwise be valid.
        let one = req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 4096);
        assert_eq!(
            validate_negotiated(&one, &e, &negotiated),
            rejected(NbdErrno::Inval)
        );
    }
    assert_eq!(
        validate_negotiated(&r, &e, &WITH_CONTEXT),
        Ok(ValidRequest::BlockStatus {
            offset: 0,
            len: 4096,
            req_one: false
        })
    );
}

#[test]
fn block_status_flags_range_and_length() {
    let e = export(1 << 20, true); // read-only exports answer block status too
    let ok = |flags, offset, len| {
        validate_negotiated(
            &req(Command::BlockStatus, flags, offset, len),
            &e,
            &WITH_CONTEXT,
        )
    };
    assert_eq!(
        ok(CMD_FLAG_REQ_ONE | CMD_FLAG_FUA, 512, 1 << 19),
        Ok(ValidRequest::BlockStatus {
            offset: 512,
            len: 1 << 19,
            req_one: true
        })
    );
    // Whole export; unaligned; longer than the 32 MiB payload limit is fine on a big export.
    assert!(ok(0, 0, 1 << 20).is_ok());
    assert!(ok(0, 1, 3).is_ok());
    let big = export(1 << 40, false);
    assert!(validate_negotiated(
        &req(Command::BlockStatus, 0, 0, u32::MAX),
        &big,
        &WITH_CONTEXT
    )
    .is_ok());
    // Zero length, beyond the end, overflow.
    for (offset, len) in [
        (0, 0),
        (1 << 20, 0),
        (0, (1 << 20) + 1),
        (1 << 20, 1),
        (u64::MAX, 2),
    ] {
        assert_eq!(
            ok(0, offset, len),
            rejected(NbdErrno::Inval),
            "{offset} {len}"
        );
    }
    // Flags of other commands.
    for flags in [
        CMD_FLAG_NO_HOLE,
        CMD_FLAG_DF,
        CMD_FLAG_FAST_ZERO,
        CMD_FLAG_PAYLOAD_LEN,
        1 << 9,
    ] {
        assert_eq!(ok(flags, 0, 4096), rejected(NbdErrno::Inval), "{flags:#x}");
    }
}

#[test]
fn req_one_is_refused_on_every_other_command_even_with_a_context() {
    let e = export(1 << 20, false);
    for command in [
        Command::Read,
        Command::Write,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
    ] {
        let len = if command == Command::Flush { 0 } else { 512 };
        assert_eq!(
            validate_negotiated(&req(command, CMD_FLAG_REQ_ONE, 0, len), &e, &WITH_CONTEXT),
            rejected(NbdErrno::Inval),
            "{command:?}"
        );
    }
}

#[test]
fn negotiation_changes_nothing_for_other_commands() {
    let e = export(1 << 20, false);
    let commands = [
        Command::Read,
        Command::Write,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::Disc,
        Command::Unknown(99),
    ];
    for command in commands {
        for (flags, offset, len) in [
            (0, 0, 512),
            (CMD_FLAG_FUA, 4096, 0),
            (0, 1 << 20, 1),
            (0, 0, 0),
        ] {
            let r = req(command, flags, offset, len);
            assert_eq!(
                validate(&r, &e),
                validate_negotiated(&r, &e, &WITH_CONTEXT),
                "{r:?}"
            );
        }
    }
}

proptest! {
    #[test]
    fn block_status_validation_is_total(
        flags in any::<u16>(),
        offset in prop_oneof![0u64..(1 << 21), any::<u64>()],
        len in any::<u32>(),
        with_context in any::<bool>(),
    ) {
        let e = export(1 << 20, false);
        let negotiated = if with_context { WITH_CONTEXT } else { Negotiated::default() };
        let r = req(Command::BlockStatus, flags, offset, len);
        match validate_negotiated(&r, &e, &negotiated) {
            Ok(ValidRequest::BlockStatus { offset: o, len: l, req_one }) => {
                prop_assert!(with_context);
                prop_assert!(l > 0 && o + u64::from(l) <= 1 << 20);
                prop_assert_eq!(req_one, flags & CMD_FLAG_REQ_ONE != 0);
                prop_assert_eq!(flags & !(CMD_FLAG_REQ_ONE | CMD_FLAG_FUA), 0);
            }
            Ok(other) => prop_assert!(false, "unexpected {:?}", other),
            Err(rej) => prop_assert_eq!(rej.errno, NbdErrno::Inval),
        }
    }
}
