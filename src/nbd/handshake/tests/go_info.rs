//! `NBD_OPT_GO` and `NBD_OPT_INFO`, and the block sizes they advertise.

use super::*;

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
        // min 1 (any alignment is served), preferred 4096 (the sector size), max 32 MiB
        &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0],
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
    // Block size requested: minimum 1 (any alignment is served), preferred the sector size.
    let bs = replies(&info)
        .into_iter()
        .find(|r| r.payload.starts_with(&[0, 3]))
        .unwrap();
    assert_eq!(bs.payload, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
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
fn a_served_volume_advertises_minimum_1_and_its_sector_size_as_preferred() {
    // The server's exports (server/export.rs): any alignment is served by
    // read-modify-write, whole sectors avoid it; the maximum is capped at MAX_PAYLOAD.
    for sector in [512, 4096] {
        let e = ExportInfo {
            min_block: 1,
            preferred_block: sector,
            max_block: u32::MAX,
            ..export("e", 1 << 30)
        };
        for requested in [true, false] {
            assert_eq!(block_size_info(&e, requested), (1, sector, 32 * MIB));
        }
    }
}

#[test]
fn a_minimum_above_1_is_sent_only_to_clients_that_requested_block_sizes() {
    // A device that could not serve unaligned requests: only a client that asked for
    // NBD_INFO_BLOCK_SIZE promised to honour its minimum (spec, "Size constraints").
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
