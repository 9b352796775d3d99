//! The protocol as pure functions: requests, replies, validation, the socket path.

use super::*;

#[test]
fn parses_each_op() {
    assert_eq!(
        parse_request(br#"{"op":"status"}"#).unwrap(),
        Request::Status
    );
    assert_eq!(
        parse_request(b"{\"op\":\"reencrypt\",\"export\":\"vol\"}\n").unwrap(),
        Request::Reencrypt {
            export: "vol".into(),
            wait: true
        }
    );
    assert_eq!(
        parse_request(br#"{"op":"reencrypt","export":"vol","wait":false}"#).unwrap(),
        Request::Reencrypt {
            export: "vol".into(),
            wait: false
        }
    );
    assert_eq!(
        parse_request(br#"{"op":"reencrypt-status","export":"a b"}"#).unwrap(),
        Request::ReencryptStatus {
            export: "a b".into()
        }
    );
    assert_eq!(
        parse_request(
            br#"{"op":"snapshot","export":"v","store":"file:///s","description":"nightly","parent":"snap-1"}"#
        )
        .unwrap(),
        Request::Snapshot {
            export: "v".into(),
            store: "file:///s".into(),
            description: "nightly".into(),
            parent: Some("snap-1".into())
        }
    );
    assert_eq!(
        parse_request(br#"{"op":"snapshot","export":"v","store":"/s"}"#).unwrap(),
        Request::Snapshot {
            export: "v".into(),
            store: "/s".into(),
            description: String::new(),
            parent: None
        }
    );
}

#[test]
fn requests_round_trip_through_their_line() {
    let reqs = [
        Request::Status,
        Request::Reencrypt {
            export: "x\"y".into(),
            wait: false,
        },
        Request::ReencryptStatus {
            export: "vol".into(),
        },
        Request::Snapshot {
            export: "v".into(),
            store: "s3://b/p".into(),
            description: "d é".into(),
            parent: None,
        },
    ];
    for r in reqs {
        let line = r.to_line();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert_eq!(parse_request(line.as_bytes()).unwrap(), r);
    }
}

#[test]
fn refuses_malformed_requests_with_clear_errors() {
    let e = |b: &[u8]| parse_request(b).unwrap_err();
    assert_eq!(e(b""), ProtocolError::Empty);
    assert_eq!(e(b"  \n"), ProtocolError::Empty);
    assert!(matches!(e(b"{not json"), ProtocolError::BadJson(_)));
    assert!(matches!(e(&[0xff, 0xfe]), ProtocolError::BadJson(_)));
    assert_eq!(e(b"[1,2]"), ProtocolError::NotAnObject);
    assert_eq!(e(b"\"status\""), ProtocolError::NotAnObject);
    assert_eq!(e(b"{}"), ProtocolError::MissingOp);
    assert_eq!(e(br#"{"op":5}"#), ProtocolError::MissingOp);
    let unknown = e(br#"{"op":"format-disk"}"#);
    assert_eq!(unknown, ProtocolError::UnknownOp("format-disk".into()));
    assert!(unknown.to_string().contains("known ops: status, reencrypt"));
    // Missing and unknown fields, wrong types.
    for bad in [
        &br#"{"op":"reencrypt"}"#[..],
        br#"{"op":"reencrypt","export":"v","force":true}"#,
        br#"{"op":"reencrypt","export":7}"#,
        br#"{"op":"status","export":"v"}"#,
        br#"{"op":"snapshot","export":"v"}"#,
        br#"{"op":"reencrypt","export":"v","wait":"yes"}"#,
    ] {
        assert!(
            matches!(e(bad), ProtocolError::BadFields { .. }),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // Field values.
    for (bad, field) in [
        (&br#"{"op":"reencrypt","export":""}"#[..], "export"),
        (br#"{"op":"reencrypt","export":"a\nb"}"#, "export"),
        (br#"{"op":"snapshot","export":"v","store":""}"#, "store"),
        (
            br#"{"op":"snapshot","export":"v","store":"s","parent":""}"#,
            "parent",
        ),
    ] {
        match e(bad) {
            ProtocolError::BadValue { field: f, .. } => assert_eq!(f, field),
            other => panic!("{other:?}"),
        }
    }
    let long = format!(
        r#"{{"op":"snapshot","export":"v","store":"s","description":"{}"}}"#,
        "d".repeat(MAX_DESCRIPTION_LEN + 1)
    );
    assert!(matches!(
        e(long.as_bytes()),
        ProtocolError::BadValue {
            field: "description",
            ..
        }
    ));
    // An unknown op is echoed shortened.
    let op = "x".repeat(1000);
    let msg = e(format!(r#"{{"op":"{op}"}}"#).as_bytes()).to_string();
    assert!(msg.len() < 300, "{msg}");
}

#[test]
fn refuses_oversized_requests() {
    let big = format!(
        r#"{{"op":"status","pad":"{}"}}"#,
        "x".repeat(MAX_REQUEST_BYTES)
    );
    assert_eq!(
        parse_request(big.as_bytes()).unwrap_err(),
        ProtocolError::TooLarge {
            limit: MAX_REQUEST_BYTES
        }
    );
    let export = "e".repeat(MAX_EXPORT_LEN + 1);
    let r = Request::ReencryptStatus { export };
    assert!(matches!(
        validate(&r),
        Err(ProtocolError::BadValue {
            field: "export",
            ..
        })
    ));
}

#[test]
fn replies_parse() {
    let ev = ProgressEvent::new("reencrypt", "vol", 10, 100, None);
    let line = serde_json::to_string(&ev).unwrap();
    assert!(!line.contains("error"), "{line}");
    assert_eq!(parse_reply(&line).unwrap(), Reply::Progress(ev));
    let ok = ok_line(serde_json::json!({"export": "vol", "ok": false, "done": true}));
    match parse_reply(&ok).unwrap() {
        Reply::Ok(m) => {
            assert_eq!(m["export"], "vol");
            assert_eq!(m["done"], true);
            assert!(!m.contains_key("ok"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parse_reply(&err_line("no export named \"x\"")).unwrap(),
        Reply::Err("no export named \"x\"".into())
    );
    for bad in [
        "",
        "nope",
        "[]",
        r#"{"event":"progress"}"#,
        r#"{"ok":"yes"}"#,
    ] {
        assert!(
            matches!(parse_reply(bad), Err(ProtocolError::BadReply(_))),
            "{bad}"
        );
    }
}

#[test]
fn control_path_defaults_only_for_root_with_a_usable_directory() {
    let given = PathBuf::from("/tmp/x.sock");
    assert_eq!(
        choose_control_path(Some(given.clone()), false, || false),
        Some(given.clone())
    );
    assert_eq!(
        choose_control_path(Some(given.clone()), true, || panic!("not consulted")),
        Some(given)
    );
    assert_eq!(
        choose_control_path(None, true, || true),
        Some(PathBuf::from(DEFAULT_CONTROL_PATH))
    );
    assert_eq!(choose_control_path(None, true, || false), None);
    assert_eq!(choose_control_path(None, false, || true), None);
}

#[test]
fn status_reply_serializes_as_documented() {
    let r = StatusReply {
        pid: 1,
        connections: 2,
        exports: vec![ExportStatus {
            name: "vol".into(),
            path: "/v.img".into(),
            uuid: "u".into(),
            size: 4096,
            sector_size: 4096,
            read_only: false,
            connections: 1,
            allocated_bytes: 0,
            thin: true,
            reencrypt: None,
        }],
    };
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["exports"][0]["name"], "vol");
    assert!(v["exports"][0]["reencrypt"].is_null());
    let back: StatusReply = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
}
