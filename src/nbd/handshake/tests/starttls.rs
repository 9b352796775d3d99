//! `NBD_OPT_STARTTLS` and the TLS modes (off, on, require).

use super::*;

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
