//! Listeners: command-line addresses replacing the file's, the default socket, remote TCP, socket modes.

use super::*;

#[test]
fn cli_listeners_replace_the_files() {
    let cli = CliOverrides {
        unix: vec!["/tmp/s.sock".into()],
        ..CliOverrides::default()
    };
    let s = resolve_full(cli).expect("resolves");
    assert!(tcp_addrs(&s).is_empty());
    // The file's socket_mode still applies to CLI sockets unless --socket-mode is given.
    assert_eq!(unix_paths(&s), [(PathBuf::from("/tmp/s.sock"), 0o660)]);
    let cli = CliOverrides {
        tcp: vec!["127.0.0.1:7000".into()],
        socket_mode: Some(0o600),
        ..CliOverrides::default()
    };
    let s = resolve_full(cli).expect("resolves");
    assert_eq!(tcp_addrs(&s), ["127.0.0.1:7000"]);
    assert!(unix_paths(&s).is_empty());
}

#[test]
fn default_socket_of_a_user_is_in_the_runtime_directory() {
    assert_eq!(
        default_unix_socket(false, Some(std::ffi::OsStr::new("/run/user/1000"))),
        Some((PathBuf::from("/run/user/1000/cryptvol/nbd.sock"), 0o700))
    );
    assert_eq!(default_unix_socket(false, None), None);
    assert_eq!(
        default_unix_socket(false, Some(std::ffi::OsStr::new("relative"))),
        None
    );
}

#[test]
fn non_loopback_tcp_needs_insecure_and_allow_remote_still_works() {
    let text = "[[export]]\nname=\"a\"\npath=\"/a\"\n[listen]\ntcp=[\"0.0.0.0:10809\"]\n";
    let s = resolve(
        Some((Path::new("/c.toml"), file(text))),
        CliOverrides::default(),
    )
    .expect("ok");
    assert!(matches!(
        s.listeners[..],
        [ListenerSpec::Tcp {
            allow_remote: false,
            ..
        }]
    ));
    let old = format!("{text}allow_remote = true\n");
    let s = resolve(
        Some((Path::new("/c.toml"), file(&old))),
        CliOverrides::default(),
    )
    .expect("ok");
    assert!(s.allow_remote && s.insecure && s.deprecated_allow_remote);
    let new = format!("{text}insecure = true\n");
    let s = resolve(
        Some((Path::new("/c.toml"), file(&new))),
        CliOverrides::default(),
    )
    .expect("ok");
    assert!(s.allow_remote && s.insecure && !s.deprecated_allow_remote);
}

#[test]
fn modes_and_sizes_in_either_form() {
    let f = file("max_inflight = 1048576\n[listen]\nsocket_mode = 0o640\n[[export]]\nname=\"a\"\npath=\"/a\"\n");
    let cli = CliOverrides {
        default_unix: Some(("/tmp/d/nbd.sock".into(), 0o700)),
        ..CliOverrides::default()
    };
    let s = resolve(Some((Path::new("/c.toml"), f)), cli).expect("ok");
    assert_eq!(s.max_inflight, 1 << 20);
    assert_eq!(unix_paths(&s), [(PathBuf::from("/tmp/d/nbd.sock"), 0o640)]);
    for bad in [
        "max_inflight = -1\n",
        "max_inflight = 0\n",
        "max_inflight = \"lots\"\n",
        "[listen]\nsocket_mode = \"0999\"\nunix=[\"/s\"]\n",
        "[listen]\nsocket_mode = 4096\nunix=[\"/s\"]\n",
        "[listen]\nsocket_mode = true\nunix=[\"/s\"]\n",
    ] {
        let text = format!("{bad}[[export]]\nname=\"a\"\npath=\"/a\"\n");
        // Tables must follow top-level keys, so put the export first when [listen] is used.
        let text = if bad.starts_with('[') {
            format!("[[export]]\nname=\"a\"\npath=\"/a\"\n{bad}")
        } else {
            text
        };
        let f = file(&text);
        let err = resolve(Some((Path::new("/c.toml"), f)), with_default_socket()).expect_err(bad);
        assert!(err.to_string().contains("/c.toml"), "{err}");
    }
}

#[test]
fn parse_mode_accepts_octal_only() {
    assert_eq!(parse_mode("0600"), Ok(0o600));
    assert_eq!(parse_mode("0o660"), Ok(0o660));
    assert_eq!(parse_mode("777"), Ok(0o777));
    for bad in ["", "0o", "0800", "1000", "rw", "-1"] {
        assert!(parse_mode(bad).is_err(), "{bad}");
    }
}
