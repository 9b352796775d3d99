//! Structured replies and metadata contexts (`base:allocation`).

use super::*;

/// `u32 namelen, name, u32 n, n × (u32 len, query)`, built independently of the parser.
pub(super) fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
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

pub(super) fn opt(
    n: &mut Negotiation,
    option: u32,
    data: &[u8],
    catalog: &Catalog,
) -> OptionOutcome {
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
