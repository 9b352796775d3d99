//! Per-client authorization: exports a client may not open are hidden, refused with
//! `NBD_REP_ERR_POLICY` and recorded.

use super::*;

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
