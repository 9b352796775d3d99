//! Resolving the scalar settings and limits: file values, command-line overrides, defaults, bounds.

use super::*;

#[test]
fn full_file_resolves_with_paths_relative_to_the_file() {
    let s = resolve_full(CliOverrides::default()).expect("resolves");
    assert_eq!(tcp_addrs(&s), ["127.0.0.1:10809", "[::1]:10810"]);
    assert_eq!(
        unix_paths(&s),
        [(PathBuf::from("/run/cryptvol/nbd.sock"), 0o660)]
    );
    assert_eq!(s.keystore, Some(PathBuf::from("/etc/cryptvol/keys")));
    assert_eq!(
        s.audit_log,
        Some(PathBuf::from("/var/log/cryptvol/audit.jsonl"))
    );
    assert!(
        matches!(&s.passphrase, Some(PassphraseSource::File(p)) if p == Path::new("/etc/cryptvol/pass"))
    );
    assert_eq!(s.max_inflight, 128 << 20);
    assert_eq!(s.exports.len(), 2);
    assert_eq!(s.exports[0].name, "data");
    assert_eq!(s.exports[0].path, PathBuf::from("/etc/cryptvol/data.img"));
    assert!(!s.exports[0].options.read_only && !s.exports[0].options.discard);
    assert_eq!(s.exports[1].path, PathBuf::from("/srv/backup.img"));
    assert!(s.exports[1].options.read_only && s.exports[1].options.discard);
    assert!(!s.allow_remote);
    assert_eq!(
        s.limits,
        Limits {
            max_connections: 100,
            max_connections_per_peer: 8,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 600,
        }
    );
    assert!(s.default_socket_dir.is_none());
}

#[test]
fn cli_scalars_override_the_file() {
    let cli = CliOverrides {
        max_inflight: Some(1 << 20),
        keystore: Some("/k".into()),
        audit_log: Some("/a.jsonl".into()),
        passphrase: Some(PassphraseSource::Fd(5)),
        insecure: true,
        max_connections: Some(7),
        idle_timeout: Some(0),
        ..CliOverrides::default()
    };
    let s = resolve_full(cli).expect("resolves");
    assert_eq!(s.limits.max_connections, 7);
    assert_eq!(s.limits.max_connections_per_peer, 8);
    assert_eq!(s.limits.idle_timeout_secs, 0);
    assert!(s.insecure && !s.deprecated_allow_remote);
    assert_eq!(s.max_inflight, 1 << 20);
    assert_eq!(s.keystore, Some(PathBuf::from("/k")));
    assert_eq!(s.audit_log, Some(PathBuf::from("/a.jsonl")));
    assert!(matches!(s.passphrase, Some(PassphraseSource::Fd(5))));
    assert!(s.allow_remote);
    assert!(s.listeners.iter().all(|l| !matches!(
        l,
        ListenerSpec::Tcp {
            allow_remote: false,
            ..
        }
    )));
}

#[test]
fn control_socket_from_file_or_flag() {
    let text = "control = \"run/ctl.sock\"\n[[export]]\nname = \"v\"\npath = \"v.img\"\n";
    let file = parse(text, Path::new("/etc/cv/c.toml")).expect("parses");
    let s = resolve(
        Some((Path::new("/etc/cv/c.toml"), file)),
        with_default_socket(),
    )
    .expect("resolves");
    assert_eq!(s.control, Some(PathBuf::from("/etc/cv/run/ctl.sock")));
    let file = parse(text, Path::new("/etc/cv/c.toml")).expect("parses");
    let cli = CliOverrides {
        control: Some("/tmp/c.sock".into()),
        ..with_default_socket()
    };
    let s = resolve(Some((Path::new("/etc/cv/c.toml"), file)), cli).expect("resolves");
    assert_eq!(s.control, Some(PathBuf::from("/tmp/c.sock")));
}

#[test]
fn defaults_without_a_file() {
    let cli = CliOverrides {
        volumes: vec!["v.img".into()],
        ..CliOverrides::default()
    };
    let err = resolve(None, cli).expect_err("no default socket");
    assert!(err.to_string().contains("--unix PATH"), "{err}");
    let cli = CliOverrides {
        volumes: vec!["v.img".into()],
        default_unix: default_unix_socket(true, None),
        ..CliOverrides::default()
    };
    let s = resolve(None, cli).expect("resolves");
    // No TCP unless asked for: only the root default Unix socket, mode 0600.
    assert!(tcp_addrs(&s).is_empty());
    assert_eq!(
        unix_paths(&s),
        [(PathBuf::from(DEFAULT_ROOT_SOCKET), DEFAULT_SOCKET_MODE)]
    );
    assert_eq!(
        s.default_socket_dir,
        Some((PathBuf::from("/run/cryptvol"), 0o755))
    );
    assert!(!s.allow_remote && !s.insecure);
    assert_eq!(
        s.limits,
        Limits {
            max_connections: 256,
            max_connections_per_peer: 32,
            handshake_timeout_secs: 30,
            idle_timeout_secs: 0,
        }
    );
    assert_eq!(s.max_inflight, DEFAULT_MAX_INFLIGHT);
    assert!(s.keystore.is_none() && s.passphrase.is_none() && s.audit_log.is_none());
    assert_eq!(s.exports[0].name, "v");
    assert_eq!(s.exports[0].path, PathBuf::from("v.img"));
}

#[test]
fn limits_are_bounded() {
    for bad in [
        "max_connections = 0\n",
        "max_connections_per_peer = 0\n",
        "handshake_timeout = 0\n",
        "handshake_timeout = 100000\n",
        "idle_timeout = 100000\n",
        "max_connections = 10000000\n",
    ] {
        let text = format!("[[export]]\nname=\"a\"\npath=\"/a\"\n[listen]\nunix=[\"/s\"]\n{bad}");
        let err = resolve(
            Some((Path::new("/c.toml"), file(&text))),
            CliOverrides::default(),
        )
        .expect_err(bad);
        assert!(err.to_string().contains("/c.toml"), "{err}");
    }
}

#[test]
fn metrics_address_from_file_or_flag() {
    let text = "metrics = \"127.0.0.1:9477\"\n[[export]]\nname = \"v\"\npath = \"v.img\"\n";
    let at = Path::new("/etc/cv/c.toml");
    let s = resolve(
        Some((at, parse(text, at).expect("parses"))),
        with_default_socket(),
    )
    .expect("resolves");
    assert_eq!(s.metrics.as_deref(), Some("127.0.0.1:9477"));
    let cli = CliOverrides {
        metrics: Some("[::1]:0".into()),
        ..with_default_socket()
    };
    let s = resolve(Some((at, parse(text, at).expect("parses"))), cli).expect("resolves");
    assert_eq!(s.metrics.as_deref(), Some("[::1]:0"));
    let none = "[[export]]\nname = \"v\"\npath = \"v.img\"\n";
    let s = resolve(
        Some((at, parse(none, at).expect("parses"))),
        with_default_socket(),
    )
    .expect("resolves");
    assert_eq!(s.metrics, None);
}
