//! Unit and property tests for the handshake.

use proptest::prelude::*;

use super::*;
use crate::nbd::client::{decode_option_replies, encode_info_data, OptionReply};
use crate::nbd::meta::BASE_ALLOCATION_ID;

const MIB: u32 = 1024 * 1024;

struct Catalog(Vec<ExportInfo>);

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Result<ExportInfo, LookupError> {
        self.0
            .iter()
            .find(|e| e.name == name)
            .cloned()
            .ok_or(LookupError::Unknown)
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.0.clone()
    }
}

fn export(name: &str, size: u64) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: String::new(),
        size,
        read_only: false,
        min_block: 4096,
        preferred_block: 4096,
        max_block: 32 * MIB,
    }
}

fn described(name: &str, description: &str) -> ExportInfo {
    ExportInfo {
        description: description.to_owned(),
        ..export(name, 1 << 20)
    }
}

const FIXED: ClientFlags = ClientFlags {
    fixed_newstyle: true,
    no_zeroes: true,
};
const FIXED_WITH_ZEROES: ClientFlags = ClientFlags {
    fixed_newstyle: true,
    no_zeroes: false,
};
const PLAIN: ClientFlags = ClientFlags {
    fixed_newstyle: false,
    no_zeroes: false,
};

/// Transmission flags of a writable export: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
/// SEND_WRITE_ZEROES, CAN_MULTI_CONN, SEND_CACHE.
const RW_FLAGS: u16 = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400;

fn run(client: ClientFlags, option: u32, data: &[u8], catalog: &Catalog) -> OptionOutcome {
    let hdr = OptionHeader {
        option,
        len: u32::try_from(data.len()).unwrap(),
    };
    Negotiation::new(client).handle_option(&hdr, data, catalog)
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    encode_info_data(name.as_bytes(), infos).unwrap()
}

fn replies(outcome: &OptionOutcome) -> Vec<OptionReply> {
    decode_option_replies(&outcome.reply).unwrap()
}

/// Builds the bytes of one option reply independently of the code under test.
fn rep(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn message(reply: &OptionReply) -> &str {
    std::str::from_utf8(&reply.payload).unwrap()
}

// ----- Greeting, client flags, option headers -----

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_flags() {
    let mut expected = b"NBDMAGICIHAVEOPT".to_vec();
    expected.extend_from_slice(&[0x00, 0x03]);
    assert_eq!(server_greeting().to_vec(), expected);
}

#[test]
fn client_flags_accept_advertised_bits_only() {
    assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(FIXED));
    assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(FIXED_WITH_ZEROES));
    assert_eq!(parse_client_flags([0, 0, 0, 0]), Ok(PLAIN));
    assert_eq!(
        parse_client_flags([0, 0, 0, 2]),
        Ok(ClientFlags {
            fixed_newstyle: false,
            no_zeroes: true
        })
    );
    assert_eq!(
        parse_client_flags([0, 0, 0, 7]),
        Err(HandshakeError::BadClientFlags(7))
    );
    assert_eq!(
        parse_client_flags([0x80, 0, 0, 1]),
        Err(HandshakeError::BadClientFlags(0x8000_0001))
    );
}

#[test]
fn option_header_checks_magic() {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(b"IHAVEOPT");
    b[8..12].copy_from_slice(&7u32.to_be_bytes());
    b[12..].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    assert_eq!(
        parse_option_header(&b),
        Ok(OptionHeader {
            option: 7,
            len: 0x0102_0304
        })
    );
    b[0] = b'i';
    assert_eq!(
        parse_option_header(&b),
        Err(HandshakeError::BadOptionMagic(0x6948_4156_454F_5054))
    );
}

// ----- GO / INFO -----

#[test]
fn go_without_info_requests_is_byte_exact() {
    let catalog = Catalog(vec![export("disk", 0x4000_0000)]);
    let out = run(FIXED, OPT_GO, &go_data("disk", &[]), &catalog);
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        // NBD_REP_INFO, NBD_INFO_EXPORT: size 1 GiB, flags 0x056d
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12,
        0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x05, 0x6d,
        // NBD_REP_INFO, NBD_INFO_BLOCK_SIZE: min 1 (not requested), preferred 4096, max 32 MiB
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 14,
        0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0,
        // NBD_REP_ACK
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0,
    ];
    assert_eq!(out.reply, expected);
    assert_eq!(
        out.next,
        Next::Transmit {
            export: export("disk", 0x4000_0000),
            flags: RW_FLAGS
        }
    );
    assert_eq!(RW_FLAGS, 0x056d);
}

#[test]
fn go_with_all_info_requests() {
    let catalog = Catalog(vec![described("vol", "encrypted volume")]);
    let data = go_data(
        "vol",
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x7777],
    );
    let out = run(FIXED, OPT_GO, &data, &catalog);
    let mut expected = rep(
        OPT_GO,
        REP_INFO,
        &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x05, 0x6d],
    );
    expected.extend(rep(OPT_GO, REP_INFO, b"\x00\x01vol"));
    expected.extend(rep(OPT_GO, REP_INFO, b"\x00\x02encrypted volume"));
    expected.extend(rep(
        OPT_GO,
        REP_INFO,
        &[0, 3, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0],
    ));
    expected.extend(rep(OPT_GO, REP_ACK, &[]));
    assert_eq!(out.reply, expected);
    assert!(matches!(out.next, Next::Transmit { .. }));
}

#[test]
fn empty_description_is_omitted_even_when_requested() {
    let catalog = Catalog(vec![export("vol", 1 << 20)]);
    let out = run(
        FIXED,
        OPT_GO,
        &go_data("vol", &[INFO_DESCRIPTION]),
        &catalog,
    );
    let infos: Vec<u16> = replies(&out)
        .iter()
        .filter(|r| r.reply_type == REP_INFO)
        .map(|r| u16::from_be_bytes([r.payload[0], r.payload[1]]))
        .collect();
    assert_eq!(infos, [INFO_EXPORT, INFO_BLOCK_SIZE]);
}

#[test]
fn info_is_go_without_entering_transmission() {
    let catalog = Catalog(vec![described("vol", "d")]);
    let data = go_data("vol", &[INFO_BLOCK_SIZE, INFO_NAME]);
    let info = run(FIXED, OPT_INFO, &data, &catalog);
    let go = run(FIXED, OPT_GO, &data, &catalog);
    assert_eq!(info.next, Next::Continue);
    assert!(matches!(go.next, Next::Transmit { .. }));
    // Same information, only the echoed option differs (the spec requires this for a GO
    // that follows a successful INFO with the same parameters).
    let strip = |o: &OptionOutcome| -> Vec<(u32, Vec<u8>)> {
        replies(o)
            .into_iter()
            .map(|r| (r.reply_type, r.payload))
            .collect()
    };
    assert_eq!(strip(&info), strip(&go));
    assert!(replies(&info).iter().all(|r| r.option == OPT_INFO));
    // Block size requested: the minimum is the sector size.
    let bs = replies(&info)
        .into_iter()
        .find(|r| r.payload.starts_with(&[0, 3]))
        .unwrap();
    assert_eq!(
        bs.payload,
        [0, 3, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
    );
}

#[test]
fn go_on_read_only_export_advertises_read_only() {
    let ro = ExportInfo {
        read_only: true,
        ..export("ro", 512)
    };
    let catalog = Catalog(vec![ro.clone()]);
    let out = run(FIXED, OPT_GO, &go_data("ro", &[]), &catalog);
    let flags = 0x0001 | 0x0002 | 0x0004 | 0x0008 | 0x0100 | 0x0400;
    assert_eq!(out.next, Next::Transmit { export: ro, flags });
    assert_eq!(replies(&out)[0].payload[10..], u16::to_be_bytes(flags));
}

#[test]
fn go_for_unknown_export_lists_available_and_continues() {
    let catalog = Catalog(vec![export("a", 1), export("b", 2)]);
    let out = run(FIXED, OPT_GO, &go_data("foo", &[]), &catalog);
    assert_eq!(
        out.reply,
        rep(
            OPT_GO,
            REP_ERR_UNKNOWN,
            b"unknown export \"foo\"; available: a, b"
        )
    );
    assert_eq!(out.next, Next::Continue);

    let out = run(FIXED, OPT_INFO, &go_data("x", &[]), &Catalog(vec![]));
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_type, REP_ERR_UNKNOWN);
    assert_eq!(
        message(&r[0]),
        "unknown export \"x\"; this server has no exports"
    );
}

#[test]
fn empty_name_is_the_default_export_only_when_there_is_exactly_one() {
    let one = Catalog(vec![export("only", 4096)]);
    let out = run(FIXED, OPT_GO, &go_data("", &[]), &one);
    assert_eq!(
        out.next,
        Next::Transmit {
            export: export("only", 4096),
            flags: RW_FLAGS
        }
    );

    let two = Catalog(vec![export("a", 1), export("b", 1)]);
    let out = run(FIXED, OPT_GO, &go_data("", &[]), &two);
    assert_eq!(out.next, Next::Continue);
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_type, REP_ERR_UNKNOWN);
    let msg = message(&r[0]);
    assert!(msg.contains("no default export"), "{msg}");
    assert!(msg.ends_with("available: a, b"), "{msg}");

    let out = run(FIXED, OPT_GO, &go_data("", &[]), &Catalog(vec![]));
    assert!(message(&replies(&out)[0]).ends_with("this server has no exports"));
}

#[test]
fn malformed_go_and_info_get_err_invalid_and_continue() {
    let catalog = Catalog(vec![export("a", 1)]);
    let mut name_too_long = go_data("a", &[]);
    name_too_long[3] = 2; // namelen 2, but only "a" and the count follow
    let mut huge_namelen = go_data("a", &[]);
    huge_namelen[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut missing_info = go_data("a", &[INFO_NAME]);
    missing_info.pop();
    let mut extra_byte = go_data("a", &[INFO_NAME]);
    extra_byte.push(0);
    let mut count_too_small = go_data("a", &[INFO_NAME, INFO_BLOCK_SIZE]);
    count_too_small[6] = 1; // announces one info request, two follow
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("five bytes", vec![0, 0, 0, 0, 0]),
        ("namelen past end", name_too_long),
        ("namelen u32::MAX", huge_namelen),
        ("missing info byte", missing_info),
        ("extra byte", extra_byte),
        ("count too small", count_too_small),
        ("not utf-8", encode_info_data(b"\xff\xfe", &[]).unwrap()),
        ("NUL in name", encode_info_data(b"a\0b", &[]).unwrap()),
        (
            "name over 4096",
            encode_info_data(&[b'n'; 4097], &[]).unwrap(),
        ),
    ];
    for (what, data) in cases {
        for option in [OPT_GO, OPT_INFO] {
            let out = run(FIXED, option, &data, &catalog);
            assert_eq!(out.next, Next::Continue, "{what}");
            let r = replies(&out);
            assert_eq!(r.len(), 1, "{what}");
            assert_eq!(r[0].option, option, "{what}");
            assert_eq!(r[0].reply_type, REP_ERR_INVALID, "{what}");
            assert!(message(&r[0]).starts_with("malformed NBD_OPT_"), "{what}");
        }
    }
}

#[test]
fn a_name_of_exactly_4096_bytes_is_well_formed() {
    let name = "n".repeat(MAX_NAME_LEN);
    let out = run(FIXED, OPT_INFO, &go_data(&name, &[]), &Catalog(vec![]));
    assert_eq!(replies(&out)[0].reply_type, REP_ERR_UNKNOWN);
}

// ----- Block size -----

#[test]
fn block_size_minimum_depends_on_the_request() {
    let e = ExportInfo {
        min_block: 512,
        preferred_block: 4096,
        max_block: 32 * MIB,
        ..export("e", 1 << 30)
    };
    assert_eq!(block_size_info(&e, true), (512, 4096, 32 * MIB));
    assert_eq!(block_size_info(&e, false), (1, 4096, 32 * MIB));
}

#[test]
fn block_size_values_are_always_spec_valid() {
    let bad = ExportInfo {
        min_block: 3000,      // not a power of two
        preferred_block: 256, // below 512
        max_block: u32::MAX,  // above what parse_request accepts
        ..export("e", 1 << 30)
    };
    assert_eq!(block_size_info(&bad, true), (1, 4096, 32 * MIB));
    let big_min = ExportInfo {
        min_block: 1 << 17, // above 64 KiB
        ..bad.clone()
    };
    assert_eq!(block_size_info(&big_min, true).0, 1);
    let small_max = ExportInfo {
        min_block: 65536,
        preferred_block: 4096, // below min
        max_block: 100,        // below preferred
        ..bad
    };
    assert_eq!(block_size_info(&small_max, true), (65536, 65536, 65536));
}

// ----- EXPORT_NAME -----

#[test]
fn export_name_with_no_zeroes_is_size_and_flags() {
    let catalog = Catalog(vec![export("disk", 0x0102_0304_0506_0708)]);
    let out = run(FIXED, OPT_EXPORT_NAME, b"disk", &catalog);
    assert_eq!(out.reply, [1, 2, 3, 4, 5, 6, 7, 8, 0x05, 0x6d]);
    assert_eq!(
        out.next,
        Next::Transmit {
            export: export("disk", 0x0102_0304_0506_0708),
            flags: RW_FLAGS
        }
    );
}

#[test]
fn export_name_without_no_zeroes_pads_124_zero_bytes() {
    let catalog = Catalog(vec![export("disk", 512)]);
    let out = run(FIXED_WITH_ZEROES, OPT_EXPORT_NAME, b"disk", &catalog);
    let mut expected = vec![0, 0, 0, 0, 0, 0, 2, 0, 0x05, 0x6d];
    expected.extend_from_slice(&[0u8; 124]);
    assert_eq!(out.reply, expected);
    assert_eq!(out.reply.len(), 134);
    assert!(matches!(out.next, Next::Transmit { .. }));
}

#[test]
fn export_name_failures_close_without_a_reply() {
    let two = Catalog(vec![export("a", 1), export("b", 1)]);
    for name in [&b"nope"[..], b"", b"\xff"] {
        let out = run(FIXED, OPT_EXPORT_NAME, name, &two);
        assert_eq!(
            out,
            OptionOutcome {
                reply: vec![],
                next: Next::Close,
                refusal: None,
            }
        );
    }
    let one = Catalog(vec![export("a", 1)]);
    let out = run(FIXED, OPT_EXPORT_NAME, b"", &one);
    assert!(matches!(out.next, Next::Transmit { .. }));
}

#[test]
fn plain_newstyle_client_may_only_use_export_name() {
    let catalog = Catalog(vec![export("a", 1)]);
    let out = run(PLAIN, OPT_GO, &go_data("a", &[]), &catalog);
    assert_eq!(out.next, Next::Close);
    assert!(out.reply.is_empty());
    let out = run(PLAIN, OPT_EXPORT_NAME, b"a", &catalog);
    assert_eq!(out.reply.len(), 134);
    assert!(matches!(out.next, Next::Transmit { .. }));
}

// ----- LIST, ABORT, unsupported options -----

#[test]
fn list_is_byte_exact() {
    let catalog = Catalog(vec![described("a", "first"), export("bb", 1)]);
    let out = run(FIXED, OPT_LIST, &[], &catalog);
    let mut expected = rep(OPT_LIST, REP_SERVER, b"\x00\x00\x00\x01afirst");
    expected.extend(rep(OPT_LIST, REP_SERVER, b"\x00\x00\x00\x02bb"));
    expected.extend(rep(OPT_LIST, REP_ACK, &[]));
    assert_eq!(out.reply, expected);
    assert_eq!(out.next, Next::Continue);

    let out = run(FIXED, OPT_LIST, &[], &Catalog(vec![]));
    assert_eq!(out.reply, rep(OPT_LIST, REP_ACK, &[]));
}

#[test]
fn list_with_data_is_invalid() {
    let out = run(FIXED, OPT_LIST, b"xy", &Catalog(vec![export("a", 1)]));
    assert_eq!(
        out.reply,
        rep(
            OPT_LIST,
            REP_ERR_INVALID,
            b"NBD_OPT_LIST takes no data, but 2 bytes were sent"
        )
    );
    assert_eq!(out.next, Next::Continue);
}

#[test]
fn abort_acks_then_closes() {
    let catalog = Catalog(vec![]);
    for data in [&b""[..], b"ignored"] {
        let out = run(FIXED, OPT_ABORT, data, &catalog);
        assert_eq!(
            out.reply,
            [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(out.next, Next::Close);
    }
}

#[test]
fn unknown_option_is_unsup_byte_exact() {
    let out = run(FIXED, 999, b"whatever", &Catalog(vec![]));
    assert_eq!(
        out.reply,
        rep(
            999,
            REP_ERR_UNSUP,
            b"option 999 (unknown option) is not supported by this server"
        )
    );
    assert_eq!(out.next, Next::Continue);
}

#[test]
fn unimplemented_known_options_are_unsup() {
    let catalog = Catalog(vec![export("a", 1)]);
    for option in [
        OPT_PEEK_EXPORT,
        OPT_STARTTLS,
        OPT_EXTENDED_HEADERS,
        0,
        u32::MAX,
    ] {
        let mut n = Negotiation::new(FIXED);
        let hdr = OptionHeader { option, len: 0 };
        let out = n.handle_option(&hdr, &[], &catalog);
        assert_eq!(out.next, Next::Continue, "option {option}");
        let r = replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].option, r[0].reply_type), (option, REP_ERR_UNSUP));
        assert!(!r[0].payload.is_empty());
        assert!(!n.structured_replies());
    }
}

// ----- Oversized options and state -----

#[test]
fn oversized_options() {
    let mut n = Negotiation::new(FIXED);
    let hdr = OptionHeader {
        option: OPT_GO,
        len: MAX_OPTION_LEN + 1,
    };
    let out = n.handle_oversized(&hdr);
    assert_eq!(
        out.reply,
        rep(
            OPT_GO,
            REP_ERR_TOO_BIG,
            b"NBD_OPT_GO data of 65537 bytes exceeds this server's 65536-byte limit"
        )
    );
    assert_eq!(out.next, Next::Continue);

    let hdr = OptionHeader {
        option: OPT_ABORT,
        len: u32::MAX,
    };
    let out = n.handle_oversized(&hdr);
    assert_eq!(out.reply, rep(OPT_ABORT, REP_ACK, &[]));
    assert_eq!(out.next, Next::Close);

    for client in [FIXED, PLAIN] {
        let hdr = OptionHeader {
            option: OPT_EXPORT_NAME,
            len: u32::MAX,
        };
        let out = Negotiation::new(client).handle_oversized(&hdr);
        assert_eq!(out.next, Next::Close);
        assert!(out.reply.is_empty());
    }
    let hdr = OptionHeader {
        option: 4242,
        len: u32::MAX,
    };
    let out = Negotiation::new(PLAIN).handle_oversized(&hdr);
    assert_eq!((out.reply.len(), out.next), (0, Next::Close));
}

#[test]
fn negotiation_keeps_going_until_a_final_outcome_then_refuses() {
    let catalog = Catalog(vec![export("a", 1)]);
    let mut n = Negotiation::new(FIXED);
    let list = OptionHeader {
        option: OPT_LIST,
        len: 0,
    };
    assert_eq!(n.handle_option(&list, &[], &catalog).next, Next::Continue);
    let data = go_data("a", &[]);
    let go = OptionHeader {
        option: OPT_GO,
        len: data.len() as u32,
    };
    assert!(matches!(
        n.handle_option(&go, &data, &catalog).next,
        Next::Transmit { .. }
    ));
    // Nothing more is accepted on this negotiation.
    let out = n.handle_option(&list, &[], &catalog);
    assert_eq!((out.reply.len(), out.next), (0, Next::Close));
    let out = n.handle_oversized(&go);
    assert_eq!((out.reply.len(), out.next), (0, Next::Close));
}

// ----- Reply size limits -----

fn assert_all_replies_small(out: &OptionOutcome) {
    for r in replies(out) {
        assert!(r.payload.len() < 4096, "reply payload {}", r.payload.len());
        if r.is_error() {
            assert!(r.payload.len() <= MAX_HUMAN_STRING);
            assert!(std::str::from_utf8(&r.payload).is_ok());
        }
    }
}

#[test]
fn every_reply_stays_under_4096_bytes() {
    let long_desc = "€".repeat(5000); // 15000 bytes, 3-byte characters
    let mut exports: Vec<ExportInfo> = (0..1000)
        .map(|i| described(&format!("export-{i}-{}", "x".repeat(200)), &long_desc))
        .collect();
    exports.push(described(&"n".repeat(4091), &long_desc)); // name fits, no room for text
    exports.push(described(&"m".repeat(4092), "")); // 4 + 4092 > 4095: left out of LIST
    exports.push(described(&"k".repeat(4094), &long_desc)); // INFO_NAME would be 4096
    let catalog = Catalog(exports.clone());

    let list = run(FIXED, OPT_LIST, &[], &catalog);
    assert_all_replies_small(&list);
    let servers = replies(&list)
        .into_iter()
        .filter(|r| r.reply_type == REP_SERVER)
        .collect::<Vec<_>>();
    assert_eq!(servers.len(), 1001);
    // Descriptions were cut on a character boundary.
    let first = &servers[0].payload;
    let name_len = u32::from_be_bytes(first[..4].try_into().unwrap()) as usize;
    let desc = std::str::from_utf8(&first[4 + name_len..]).unwrap();
    assert!(!desc.is_empty() && desc.len() <= MAX_HUMAN_STRING);
    assert_eq!(servers[1000].payload.len(), 4095);

    let all_infos = [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    for e in &exports {
        for option in [OPT_GO, OPT_INFO] {
            let out = run(FIXED, option, &go_data(&e.name, &all_infos), &catalog);
            assert_all_replies_small(&out);
            assert_eq!(replies(&out).last().unwrap().reply_type, REP_ACK);
        }
    }
    let big = run(
        FIXED,
        OPT_GO,
        &go_data(&"k".repeat(4094), &all_infos),
        &catalog,
    );
    assert!(!replies(&big)
        .iter()
        .any(|r| r.payload.starts_with(&INFO_NAME.to_be_bytes())));

    // Error messages that list exports or echo huge names stay short.
    for name in ["", "nope", &"q".repeat(4096)] {
        let out = run(FIXED, OPT_GO, &go_data(name, &[]), &catalog);
        assert_all_replies_small(&out);
        assert!(replies(&out)[0].payload.ends_with(b"..."));
    }
    let out = Negotiation::new(FIXED).handle_oversized(&OptionHeader {
        option: u32::MAX,
        len: u32::MAX,
    });
    assert_all_replies_small(&out);
}

// ----- Properties -----

/// Checks the framing of an outcome: a sequence of option replies that echo the option,
/// have consistent lengths, stay under 4096 bytes, and end with exactly one final reply.
fn check_well_formed(option: u32, client: ClientFlags, out: &OptionOutcome) {
    if out.reply.is_empty() {
        // Only closing (EXPORT_NAME failure, non-fixed client, finished) sends nothing.
        assert_eq!(out.next, Next::Close);
        return;
    }
    if option == OPT_EXPORT_NAME {
        let Next::Transmit { export, flags } = &out.next else {
            panic!("EXPORT_NAME with a reply must transmit");
        };
        let expected_len = if client.no_zeroes { 10 } else { 134 };
        assert_eq!(out.reply.len(), expected_len);
        assert_eq!(out.reply[..8], export.size.to_be_bytes());
        assert_eq!(out.reply[8..10], flags.to_be_bytes());
        assert!(out.reply[10..].iter().all(|&b| b == 0));
        return;
    }
    let r = decode_option_replies(&out.reply).expect("replies must decode");
    let (last, rest) = r.split_last().unwrap();
    for reply in &r {
        assert_eq!(reply.option, option);
        assert!(reply.payload.len() <= MAX_REPLY_PAYLOAD);
    }
    for reply in rest {
        assert!(matches!(
            reply.reply_type,
            REP_SERVER | REP_INFO | REP_META_CONTEXT
        ));
    }
    for reply in r.iter().filter(|r| r.reply_type == REP_META_CONTEXT) {
        assert!(matches!(
            option,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT
        ));
        assert_eq!(&reply.payload[4..], b"base:allocation");
    }
    assert!(last.reply_type == REP_ACK || last.is_error());
    if last.reply_type == REP_ACK {
        assert!(last.payload.is_empty());
    }
    for reply in r.iter().filter(|r| r.reply_type == REP_INFO) {
        match u16::from_be_bytes([reply.payload[0], reply.payload[1]]) {
            INFO_EXPORT => assert_eq!(reply.payload.len(), 12),
            INFO_BLOCK_SIZE => assert_eq!(reply.payload.len(), 14),
            _ => {}
        }
    }
    match &out.next {
        Next::Transmit { .. } => {
            assert_eq!(option, OPT_GO);
            assert_eq!(last.reply_type, REP_ACK);
            assert!(r
                .iter()
                .any(|r| r.payload.starts_with(&INFO_EXPORT.to_be_bytes())));
        }
        Next::Close => assert_eq!(option, OPT_ABORT),
        Next::Continue => assert!(!(option == OPT_GO && last.reply_type == REP_ACK)),
        Next::StartTls => panic!("STARTTLS acknowledged by a server without TLS"),
    }
}

fn arb_client() -> impl Strategy<Value = ClientFlags> {
    (any::<bool>(), any::<bool>()).prop_map(|(fixed_newstyle, no_zeroes)| ClientFlags {
        fixed_newstyle,
        no_zeroes,
    })
}

fn arb_option() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..16, any::<u32>()]
}

fn prop_catalog() -> Catalog {
    Catalog(vec![
        described("alpha", "first volume"),
        ExportInfo {
            read_only: true,
            ..export("beta", 1 << 40)
        },
        export("", 0),
    ])
}

proptest! {
    #[test]
    fn handle_option_never_panics_and_frames_replies(
        client in arb_client(),
        option in arb_option(),
        data in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let catalog = prop_catalog();
        let out = run(client, option, &data, &catalog);
        check_well_formed(option, client, &out);
    }

    #[test]
    fn info_and_go_with_structured_data_are_well_formed(
        client in arb_client(),
        go in any::<bool>(),
        name in prop_oneof![
            Just("alpha".to_owned()),
            Just("beta".to_owned()),
            Just(String::new()),
            ".{0,40}",
        ],
        infos in proptest::collection::vec(prop_oneof![0u16..5, any::<u16>()], 0..8),
        junk in proptest::collection::vec(any::<u8>(), 0..3),
        single in any::<bool>(),
    ) {
        let catalog = if single { Catalog(vec![export("alpha", 4096)]) } else { prop_catalog() };
        let option = if go { OPT_GO } else { OPT_INFO };
        let mut data = go_data(&name, &infos);
        data.extend_from_slice(&junk);
        let out = run(client, option, &data, &catalog);
        check_well_formed(option, client, &out);
        if client.fixed_newstyle && junk.is_empty() {
            let found = if name.is_empty() { single } else { catalog.lookup(&name).is_ok() };
            let last = replies(&out).pop().unwrap();
            prop_assert_eq!(last.reply_type == REP_ACK, found);
        }
    }

    #[test]
    fn oversized_never_panics_and_frames_replies(
        client in arb_client(),
        option in arb_option(),
        extra in 1u32..=(u32::MAX - MAX_OPTION_LEN),
    ) {
        let hdr = OptionHeader { option, len: MAX_OPTION_LEN + extra };
        let out = Negotiation::new(client).handle_oversized(&hdr);
        check_well_formed(option, client, &out);
        let transmits = matches!(out.next, Next::Transmit { .. });
        prop_assert!(!transmits);
    }
}

// ----- Structured replies and metadata contexts -----

/// `u32 namelen, name, u32 n, n × (u32 len, query)`, built independently of the parser.
fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn opt(n: &mut Negotiation, option: u32, data: &[u8], catalog: &Catalog) -> OptionOutcome {
    let hdr = OptionHeader {
        option,
        len: data.len() as u32,
    };
    n.handle_option(&hdr, data, catalog)
}

/// A negotiation that has structured replies.
fn with_sr(catalog: &Catalog) -> Negotiation {
    let mut n = Negotiation::new(FIXED);
    let out = opt(&mut n, OPT_STRUCTURED_REPLY, &[], catalog);
    assert_eq!(out.reply, rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    n
}

/// `NBD_REP_META_CONTEXT` for base:allocation with `id`, byte-exact.
fn base_allocation_reply(option: u32, id: u32) -> Vec<u8> {
    let mut payload = id.to_be_bytes().to_vec();
    payload.extend_from_slice(b"base:allocation");
    rep(option, REP_META_CONTEXT, &payload)
}

#[test]
fn structured_reply_is_acknowledged_and_remembered() {
    let catalog = Catalog(vec![export("a", 1)]);
    let mut n = Negotiation::new(FIXED);
    assert!(!n.structured_replies());
    let out = opt(&mut n, OPT_STRUCTURED_REPLY, &[], &catalog);
    #[rustfmt::skip]
    let expected = vec![
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0,
    ];
    assert_eq!(out.reply, expected);
    assert_eq!(out.next, Next::Continue);
    assert!(n.structured_replies());
    // Asking again is harmless.
    let out = opt(&mut n, OPT_STRUCTURED_REPLY, &[], &catalog);
    assert_eq!(out.reply, expected);
    assert_eq!(
        n.negotiated(),
        Negotiated {
            structured_replies: true,
            base_allocation: None
        }
    );
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let catalog = Catalog(vec![export("a", 1)]);
    let mut n = Negotiation::new(FIXED);
    let out = opt(&mut n, OPT_STRUCTURED_REPLY, b"x", &catalog);
    let r = replies(&out);
    assert_eq!((r.len(), r[0].reply_type), (1, REP_ERR_INVALID));
    assert!(message(&r[0]).contains("takes no data"));
    assert!(!n.structured_replies());
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let catalog = Catalog(vec![export("a", 1)]);
    let mut n = Negotiation::new(FIXED);
    let out = opt(
        &mut n,
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:allocation"]),
        &catalog,
    );
    let r = replies(&out);
    assert_eq!((r.len(), r[0].reply_type), (1, REP_ERR_INVALID));
    assert!(message(&r[0]).contains("NBD_OPT_STRUCTURED_REPLY first"));
    assert_eq!(n.base_allocation_id(), None);
    assert_eq!(n.negotiated(), Negotiated::default());
}

#[test]
fn set_meta_context_selects_base_allocation_byte_exact() {
    let catalog = Catalog(vec![export("a", 1 << 20), export("b", 1 << 20)]);
    let mut n = with_sr(&catalog);
    let out = opt(
        &mut n,
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["x-other:thing", "base:allocation", "base:nope"]),
        &catalog,
    );
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        // NBD_REP_META_CONTEXT, id 1, "base:allocation"
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0, 0, 19,
        0, 0, 0, 1, b'b', b'a', b's', b'e', b':', b'a', b'l', b'l', b'o', b'c', b'a', b't',
        b'i', b'o', b'n',
        // NBD_REP_ACK
        0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 0, 0,
    ];
    assert_eq!(out.reply, expected);
    assert_eq!(out.next, Next::Continue);
    assert_eq!(n.base_allocation_id(), Some(BASE_ALLOCATION_ID));
    assert_eq!(
        n.meta_contexts(),
        vec![(BASE_ALLOCATION_ID, MetaContext::BaseAllocation)]
    );
    // GO on the same export keeps it.
    let out = opt(&mut n, OPT_GO, &go_data("a", &[]), &catalog);
    assert!(matches!(out.next, Next::Transmit { .. }));
    assert_eq!(
        n.negotiated(),
        Negotiated {
            structured_replies: true,
            base_allocation: Some(BASE_ALLOCATION_ID)
        }
    );
}

#[test]
fn meta_contexts_of_another_export_are_dropped_at_go() {
    let catalog = Catalog(vec![export("a", 1 << 20), export("b", 1 << 20)]);
    let mut n = with_sr(&catalog);
    opt(
        &mut n,
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:allocation"]),
        &catalog,
    );
    assert_eq!(n.base_allocation_id(), Some(BASE_ALLOCATION_ID));
    let out = opt(&mut n, OPT_GO, &go_data("b", &[]), &catalog);
    assert!(matches!(out.next, Next::Transmit { .. }));
    assert_eq!(n.base_allocation_id(), None);
    assert!(n.negotiated().structured_replies);
    // EXPORT_NAME too; the default export ("") matches its real name.
    let single = Catalog(vec![export("only", 1 << 20)]);
    let mut n = with_sr(&single);
    opt(
        &mut n,
        OPT_SET_META_CONTEXT,
        &meta_data("", &["base:allocation"]),
        &single,
    );
    let out = opt(&mut n, OPT_EXPORT_NAME, b"only", &single);
    assert!(matches!(out.next, Next::Transmit { .. }));
    assert_eq!(n.negotiated().base_allocation, Some(BASE_ALLOCATION_ID));
}

#[test]
fn set_meta_context_replaces_the_selection_even_when_it_fails() {
    let catalog = Catalog(vec![export("a", 1 << 20)]);
    let select = |n: &mut Negotiation| {
        opt(
            n,
            OPT_SET_META_CONTEXT,
            &meta_data("a", &["base:allocation"]),
            &catalog,
        );
        assert_eq!(n.base_allocation_id(), Some(BASE_ALLOCATION_ID));
    };
    let mut n = with_sr(&catalog);
    // Nothing selected: only an ACK, and the old selection is gone.
    for queries in [&[][..], &["base:"][..], &["qemu:allocation-depth"][..]] {
        select(&mut n);
        let out = opt(
            &mut n,
            OPT_SET_META_CONTEXT,
            &meta_data("a", queries),
            &catalog,
        );
        assert_eq!(out.reply, rep(OPT_SET_META_CONTEXT, REP_ACK, &[]));
        assert_eq!(n.base_allocation_id(), None, "{queries:?}");
    }
    // Unknown export.
    select(&mut n);
    let out = opt(
        &mut n,
        OPT_SET_META_CONTEXT,
        &meta_data("zz", &["base:allocation"]),
        &catalog,
    );
    let r = replies(&out);
    assert_eq!((r.len(), r[0].reply_type), (1, REP_ERR_UNKNOWN));
    assert!(message(&r[0]).contains("unknown export \"zz\""));
    assert_eq!(n.base_allocation_id(), None);
    // Malformed.
    select(&mut n);
    let out = opt(&mut n, OPT_SET_META_CONTEXT, &[0, 0, 0, 1, b'a'], &catalog);
    assert_eq!(replies(&out)[0].reply_type, REP_ERR_INVALID);
    assert_eq!(n.base_allocation_id(), None);
    // Oversized.
    select(&mut n);
    let out = n.handle_oversized(&OptionHeader {
        option: OPT_SET_META_CONTEXT,
        len: MAX_OPTION_LEN + 1,
    });
    assert_eq!(replies(&out)[0].reply_type, REP_ERR_TOO_BIG);
    assert_eq!(n.base_allocation_id(), None);
}

#[test]
fn list_meta_context() {
    let catalog = Catalog(vec![export("a", 1 << 20)]);
    let listed = {
        let mut v = base_allocation_reply(OPT_LIST_META_CONTEXT, 0);
        v.extend(rep(OPT_LIST_META_CONTEXT, REP_ACK, &[]));
        v
    };
    let ack_only = rep(OPT_LIST_META_CONTEXT, REP_ACK, &[]);
    // LIST works with or without structured replies and never selects anything.
    for mut n in [Negotiation::new(FIXED), with_sr(&catalog)] {
        let cases: [(&[&str], &Vec<u8>); 6] = [
            (&[], &listed),
            (&["base:"], &listed),
            (&["base:allocation"], &listed),
            (&["base:", "base:allocation"], &listed),
            (&["base:dirty"], &ack_only),
            (&["qemu:dirty-bitmap:"], &ack_only),
        ];
        for (queries, expected) in cases {
            for name in ["a", ""] {
                let out = opt(
                    &mut n,
                    OPT_LIST_META_CONTEXT,
                    &meta_data(name, queries),
                    &catalog,
                );
                assert_eq!(&out.reply, expected, "{name:?} {queries:?}");
                assert_eq!(out.next, Next::Continue);
            }
        }
        assert_eq!(n.base_allocation_id(), None);
    }
    let mut n = Negotiation::new(FIXED);
    let out = opt(
        &mut n,
        OPT_LIST_META_CONTEXT,
        &meta_data("nope", &[]),
        &catalog,
    );
    assert_eq!(replies(&out)[0].reply_type, REP_ERR_UNKNOWN);
    for bad in [
        meta_data("a", &["nocolon"]),
        meta_data("a\0", &[]),
        vec![0, 0, 0, 0, 0, 0, 0, 1],
        vec![0, 0, 0],
        Vec::new(),
    ] {
        let out = opt(&mut n, OPT_LIST_META_CONTEXT, &bad, &catalog);
        let r = replies(&out);
        assert_eq!((r.len(), r[0].reply_type), (1, REP_ERR_INVALID), "{bad:?}");
        assert!(message(&r[0]).starts_with("malformed NBD_OPT_LIST_META_CONTEXT request"));
    }
}

fn arb_query() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("base:allocation".to_owned()),
        Just("base:".to_owned()),
        Just("qemu:dirty-bitmap:x".to_owned()),
        ".{0,20}",
    ]
}

proptest! {
    #[test]
    fn meta_options_never_panic_and_frame_replies(
        sr in any::<bool>(),
        option in prop_oneof![Just(OPT_STRUCTURED_REPLY), Just(OPT_LIST_META_CONTEXT), Just(OPT_SET_META_CONTEXT)],
        data in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let catalog = prop_catalog();
        let mut n = if sr { with_sr(&catalog) } else { Negotiation::new(FIXED) };
        let out = opt(&mut n, option, &data, &catalog);
        check_well_formed(option, FIXED, &out);
        prop_assert_eq!(out.next, Next::Continue);
        // Random bytes select a context only when they really are a valid SET.
        if n.base_allocation_id().is_some() {
            prop_assert!(sr && option == OPT_SET_META_CONTEXT);
        }
    }

    #[test]
    fn well_framed_meta_requests(
        sr in any::<bool>(),
        set in any::<bool>(),
        name in prop_oneof![Just("alpha".to_owned()), Just("beta".to_owned()), Just(String::new()), ".{0,10}"],
        queries in proptest::collection::vec(arb_query(), 0..6),
        junk in proptest::collection::vec(any::<u8>(), 0..3),
    ) {
        let catalog = prop_catalog();
        let option = if set { OPT_SET_META_CONTEXT } else { OPT_LIST_META_CONTEXT };
        let mut n = if sr { with_sr(&catalog) } else { Negotiation::new(FIXED) };
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        let mut data = meta_data(&name, &q);
        data.extend_from_slice(&junk);
        let out = opt(&mut n, option, &data, &catalog);
        check_well_formed(option, FIXED, &out);
        let r = replies(&out);
        let last = r.last().unwrap();
        let syntax_ok = junk.is_empty()
            && queries.iter().all(|q| q.find(':').is_some_and(|i| i > 0) && !q.contains('\0'));
        let exists = !name.is_empty() && catalog.lookup(&name).is_ok();
        let ok = syntax_ok && exists && (sr || !set);
        prop_assert_eq!(last.reply_type == REP_ACK, ok, "{:?}", r);
        let asked = queries.iter().any(|q| q == "base:allocation")
            || (!set && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
        prop_assert_eq!(r.len() == 2, ok && asked);
        prop_assert_eq!(n.base_allocation_id().is_some(), ok && asked && set);
    }
}

// ----- Per-client authorization -----

/// A catalog as one client sees it: `denied` exports exist but this client may not open
/// them.
struct Guarded {
    all: Vec<ExportInfo>,
    denied: Vec<&'static str>,
}

impl ExportCatalog for Guarded {
    fn lookup(&self, name: &str) -> Result<ExportInfo, LookupError> {
        let export = self
            .all
            .iter()
            .find(|e| e.name == name)
            .ok_or(LookupError::Unknown)?;
        if self.denied.contains(&name) {
            return Err(LookupError::Denied(format!("test says no to {name}")));
        }
        Ok(export.clone())
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.all
            .iter()
            .filter(|e| !self.denied.contains(&e.name.as_str()))
            .cloned()
            .collect()
    }
    fn default_export(&self) -> Option<String> {
        match self.all.as_slice() {
            [only] => Some(only.name.clone()),
            _ => None,
        }
    }
}

fn guarded(names: &[&'static str], denied: &[&'static str]) -> Guarded {
    Guarded {
        all: names
            .iter()
            .map(|n| described(n, "hidden description"))
            .collect(),
        denied: denied.to_vec(),
    }
}

fn on(n: &mut Negotiation, option: u32, data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    let hdr = OptionHeader {
        option,
        len: data.len() as u32,
    };
    n.handle_option(&hdr, data, catalog)
}

fn assert_policy_refusal(out: &OptionOutcome, option: u32, export: &str) {
    assert_eq!(out.next, Next::Continue);
    let r = replies(out);
    assert_eq!(r.len(), 1, "one error reply, no information");
    assert_eq!(r[0].option, option);
    assert_eq!(r[0].reply_type, REP_ERR_POLICY);
    let msg = message(&r[0]);
    assert!(msg.contains("not permitted"), "{msg}");
    // Neither the server-side reason nor anything about the export is sent.
    assert!(!msg.contains("test says no"), "{msg}");
    assert!(!msg.contains("hidden"), "{msg}");
    assert_eq!(
        out.refusal,
        Some(Refusal {
            export: export.to_owned(),
            reason: format!("test says no to {export}"),
        })
    );
}

#[test]
fn denied_exports_are_hidden_from_list() {
    let catalog = guarded(&["open", "private"], &["private"]);
    let out = on(&mut Negotiation::new(FIXED), OPT_LIST, &[], &catalog);
    let names: Vec<_> = replies(&out)
        .iter()
        .filter(|r| r.reply_type == REP_SERVER)
        .map(|r| String::from_utf8_lossy(&r.payload[4..]).into_owned())
        .collect();
    assert_eq!(names.len(), 1);
    assert!(names[0].starts_with("open"), "{names:?}");
    assert_eq!(out.refusal, None);
}

#[test]
fn go_and_info_for_a_denied_export_get_err_policy_and_continue() {
    let catalog = guarded(&["open", "private"], &["private"]);
    let mut n = Negotiation::new(FIXED);
    for option in [OPT_INFO, OPT_GO] {
        let out = on(&mut n, option, &go_data("private", &[INFO_NAME]), &catalog);
        assert_policy_refusal(&out, option, "private");
    }
    // The same connection may still open an export it is allowed.
    let out = on(&mut n, OPT_GO, &go_data("open", &[]), &catalog);
    assert!(matches!(out.next, Next::Transmit { ref export, .. } if export.name == "open"));
    assert_eq!(out.refusal, None);
}

#[test]
fn unknown_export_stays_unknown_and_does_not_list_denied_ones() {
    let catalog = guarded(&["open", "private"], &["private"]);
    let out = on(
        &mut Negotiation::new(FIXED),
        OPT_GO,
        &go_data("nope", &[]),
        &catalog,
    );
    let r = replies(&out);
    assert_eq!(r[0].reply_type, REP_ERR_UNKNOWN);
    let msg = message(&r[0]);
    assert!(msg.ends_with("available: open"), "{msg}");
    assert_eq!(out.refusal, None);
}

#[test]
fn default_export_does_not_depend_on_who_asks() {
    // The only export, denied: "" names it, and the answer is a policy refusal.
    let one = guarded(&["private"], &["private"]);
    let out = on(
        &mut Negotiation::new(FIXED),
        OPT_GO,
        &go_data("", &[]),
        &one,
    );
    assert_policy_refusal(&out, OPT_GO, "private");
    // Two exports, one visible: still no default export, and only the visible one is named.
    let two = guarded(&["open", "private"], &["private"]);
    let out = on(
        &mut Negotiation::new(FIXED),
        OPT_GO,
        &go_data("", &[]),
        &two,
    );
    let r = replies(&out);
    assert_eq!(r[0].reply_type, REP_ERR_UNKNOWN);
    let msg = message(&r[0]);
    assert!(msg.contains("no default export"), "{msg}");
    assert!(!msg.contains("private"), "{msg}");
}

#[test]
fn export_name_for_a_denied_export_closes_and_records_the_refusal() {
    let catalog = guarded(&["open", "private"], &["private"]);
    for client in [FIXED, PLAIN] {
        let out = on(
            &mut Negotiation::new(client),
            OPT_EXPORT_NAME,
            b"private",
            &catalog,
        );
        assert_eq!(out.next, Next::Close);
        assert!(out.reply.is_empty());
        assert_eq!(
            out.refusal.map(|r| r.export),
            Some("private".to_owned()),
            "{client:?}"
        );
        let out = on(
            &mut Negotiation::new(client),
            OPT_EXPORT_NAME,
            b"open",
            &catalog,
        );
        assert!(matches!(out.next, Next::Transmit { .. }));
    }
}

#[test]
fn meta_context_options_for_a_denied_export_get_err_policy() {
    let catalog = guarded(&["open", "private"], &["private"]);
    let mut n = Negotiation::new(FIXED);
    let out = on(&mut n, OPT_STRUCTURED_REPLY, &[], &catalog);
    assert_eq!(out.reply, rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let out = on(
            &mut n,
            option,
            &meta_data("private", &["base:allocation"]),
            &catalog,
        );
        assert_policy_refusal(&out, option, "private");
    }
    assert!(n.meta_contexts().is_empty());
}

// ----- STARTTLS and the TLS modes -----

#[test]
fn tls_mode_parses_off_on_require_only() {
    assert_eq!(TlsMode::parse("off"), Ok(TlsMode::Off));
    assert_eq!(TlsMode::parse("on"), Ok(TlsMode::On));
    assert_eq!(TlsMode::parse("require"), Ok(TlsMode::Require));
    assert!(TlsMode::parse("yes").is_err());
    assert_eq!(TlsMode::default(), TlsMode::Off);
}

#[test]
fn starttls_without_tls_configured_is_unsupported() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::new(FIXED);
    let out = opt(&mut neg, OPT_STARTTLS, &[], &cat);
    assert_eq!(out.next, Next::Continue);
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_type, REP_ERR_UNSUP);
    assert!(!neg.tls_active());
}

#[test]
fn starttls_is_acknowledged_when_tls_is_on_then_a_second_one_is_invalid() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::On);
    let out = opt(&mut neg, OPT_STARTTLS, &[], &cat);
    assert_eq!(out.next, Next::StartTls);
    assert_eq!(out.reply, rep(OPT_STARTTLS, REP_ACK, &[]));
    neg.tls_started();
    assert!(neg.tls_active());
    let again = opt(&mut neg, OPT_STARTTLS, &[], &cat);
    assert_eq!(again.next, Next::Continue);
    assert_eq!(replies(&again)[0].reply_type, REP_ERR_INVALID);
    // Negotiation continues normally over TLS.
    let go = opt(&mut neg, OPT_GO, &go_data("a", &[]), &cat);
    assert!(matches!(go.next, Next::Transmit { .. }));
}

#[test]
fn starttls_with_data_is_invalid() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::Require);
    let out = opt(&mut neg, OPT_STARTTLS, b"x", &cat);
    assert_eq!(out.next, Next::Continue);
    assert_eq!(replies(&out)[0].reply_type, REP_ERR_INVALID);
}

#[test]
fn tls_on_still_serves_plaintext_clients() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::On);
    let list = opt(&mut neg, OPT_LIST, &[], &cat);
    assert_eq!(replies(&list)[0].reply_type, REP_SERVER);
    let go = opt(&mut neg, OPT_GO, &go_data("a", &[]), &cat);
    assert!(matches!(go.next, Next::Transmit { .. }));
    assert_eq!(neg.tls_refusals(), 0);
}

#[test]
fn tls_require_refuses_every_option_but_starttls_and_abort_before_tls() {
    let cat = Catalog(vec![export("secret", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::Require);
    let go = go_data("secret", &[]);
    let meta = meta_data("secret", &["base:allocation"]);
    for (option, data) in [
        (OPT_LIST, &[][..]),
        (OPT_INFO, &go[..]),
        (OPT_GO, &go[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (OPT_LIST_META_CONTEXT, &meta[..]),
        (OPT_SET_META_CONTEXT, &meta[..]),
        (999, &[][..]),
    ] {
        let out = opt(&mut neg, option, data, &cat);
        assert_eq!(out.next, Next::Continue, "{}", option_name(option));
        let r = replies(&out);
        assert_eq!(r.len(), 1, "{}", option_name(option));
        assert_eq!(r[0].option, option);
        assert_eq!(r[0].reply_type, REP_ERR_TLS_REQD, "{}", option_name(option));
        // Nothing about the export leaks.
        assert!(
            !out.reply.windows(6).any(|w| w == b"secret"),
            "{}",
            option_name(option)
        );
    }
    assert_eq!(neg.tls_refusals(), 7);
    // Oversized options are refused the same way.
    let big = neg.handle_oversized(&OptionHeader {
        option: OPT_LIST,
        len: MAX_OPTION_LEN + 1,
    });
    assert_eq!(replies(&big)[0].reply_type, REP_ERR_TLS_REQD);
    // STARTTLS is acknowledged; afterwards the options work.
    let tls = opt(&mut neg, OPT_STARTTLS, &[], &cat);
    assert_eq!(tls.next, Next::StartTls);
    neg.tls_started();
    let list = opt(&mut neg, OPT_LIST, &[], &cat);
    assert_eq!(replies(&list)[0].reply_type, REP_SERVER);
    let go = opt(&mut neg, OPT_GO, &go, &cat);
    assert!(matches!(go.next, Next::Transmit { .. }));
}

#[test]
fn tls_require_acknowledges_abort_before_tls() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::Require);
    let out = opt(&mut neg, OPT_ABORT, &[], &cat);
    assert_eq!(out.next, Next::Close);
    assert_eq!(out.reply, rep(OPT_ABORT, REP_ACK, &[]));
}

#[test]
fn tls_require_closes_on_export_name_before_tls() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::Require);
    let out = opt(&mut neg, OPT_EXPORT_NAME, b"a", &cat);
    assert_eq!(out.next, Next::Close);
    assert!(out.reply.is_empty());
    assert_eq!(neg.tls_refusals(), 1);
    // A plain (non-fixed) newstyle client cannot start TLS at all.
    let mut plain = Negotiation::with_tls(PLAIN, TlsMode::Require);
    let out = opt(&mut plain, OPT_EXPORT_NAME, b"a", &cat);
    assert_eq!(out.next, Next::Close);
    assert!(out.reply.is_empty());
}

#[test]
fn tls_require_allows_export_name_after_tls() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::Require);
    assert_eq!(opt(&mut neg, OPT_STARTTLS, &[], &cat).next, Next::StartTls);
    neg.tls_started();
    let out = opt(&mut neg, OPT_EXPORT_NAME, b"a", &cat);
    assert!(matches!(out.next, Next::Transmit { .. }));
}

#[test]
fn starttls_forgets_what_was_negotiated_in_plaintext() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::On);
    opt(&mut neg, OPT_STRUCTURED_REPLY, &[], &cat);
    let meta = meta_data("a", &["base:allocation"]);
    opt(&mut neg, OPT_SET_META_CONTEXT, &meta, &cat);
    assert!(neg.structured_replies());
    assert!(neg.base_allocation_id().is_some());
    assert_eq!(opt(&mut neg, OPT_STARTTLS, &[], &cat).next, Next::StartTls);
    neg.tls_started();
    assert!(!neg.structured_replies());
    assert_eq!(neg.base_allocation_id(), None);
}

#[test]
fn no_option_is_handled_between_starttls_and_the_tls_handshake() {
    let cat = Catalog(vec![export("a", 1 << 20)]);
    let mut neg = Negotiation::with_tls(FIXED, TlsMode::On);
    assert_eq!(opt(&mut neg, OPT_STARTTLS, &[], &cat).next, Next::StartTls);
    let out = opt(&mut neg, OPT_LIST, &[], &cat);
    assert_eq!(out.next, Next::Close);
    assert!(!neg.tls_active());
}
