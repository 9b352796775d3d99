//! `NBD_OPT_EXPORT_NAME`, `LIST`, `ABORT`, unsupported and oversized options, the
//! negotiation's state, and the 4096-byte limit on every reply.

use super::*;

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
