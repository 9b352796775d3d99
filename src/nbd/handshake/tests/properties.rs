//! Property tests: every option reply well formed, whatever the client sends.

use super::*;

/// Checks the framing of an outcome: a sequence of option replies that echo the option,
/// have consistent lengths, stay under 4096 bytes, and end with exactly one final reply.
pub(super) fn check_well_formed(option: u32, client: ClientFlags, out: &OptionOutcome) {
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

pub(super) fn prop_catalog() -> Catalog {
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
