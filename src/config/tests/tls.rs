//! TLS: the [tls] section, command-line overrides, and inconsistent settings.

use super::*;

const TLS_FILE: &str = r#"
[tls]
mode = "require"
cert = "tls/server-cert.pem"
key = "/etc/ssl/private/server-key.pem"
client_ca = "tls/ca.pem"

[[export]]
name = "data"
path = "data.img"
"#;

#[test]
fn tls_section_resolves_with_paths_relative_to_the_file() {
    let path = Path::new("/etc/cryptvol/cryptvol.toml");
    let s = resolve(Some((path, file(TLS_FILE))), with_default_socket()).expect("resolves");
    assert_eq!(
        s.tls,
        Some(TlsSettings {
            mode: TlsMode::Require,
            files: TlsFiles {
                cert: "/etc/cryptvol/tls/server-cert.pem".into(),
                key: "/etc/ssl/private/server-key.pem".into(),
                client_ca: Some("/etc/cryptvol/tls/ca.pem".into()),
            },
        })
    );
    // The command line overrides each key.
    let cli = CliOverrides {
        tls: Some(TlsMode::On),
        tls_cert: Some("/c.pem".into()),
        ..with_default_socket()
    };
    let s = resolve(Some((path, file(TLS_FILE))), cli).expect("resolves");
    let tls = s.tls.expect("tls");
    assert_eq!(tls.mode, TlsMode::On);
    assert_eq!(tls.files.cert, PathBuf::from("/c.pem"));
    assert_eq!(
        tls.files.key,
        PathBuf::from("/etc/ssl/private/server-key.pem")
    );
}

#[test]
fn tls_is_off_by_default() {
    let s = resolve_full(CliOverrides::default()).expect("resolves");
    assert_eq!(s.tls, None);
}

#[test]
fn tls_on_without_certificate_and_key_is_a_clear_error() {
    for (cert, key) in [(None, None), (Some("/c.pem"), None), (None, Some("/k.pem"))] {
        let cli = CliOverrides {
            tls: Some(TlsMode::Require),
            tls_cert: cert.map(PathBuf::from),
            tls_key: key.map(PathBuf::from),
            volumes: vec!["/v.img".into()],
            ..CliOverrides::default()
        };
        let e = resolve(None, cli).expect_err("refused").to_string();
        assert!(
            e.contains("--tls require needs") && e.contains("--tls-key"),
            "{e}"
        );
    }
}

#[test]
fn tls_files_with_tls_off_are_refused() {
    let cli = CliOverrides {
        tls_client_ca: Some("/ca.pem".into()),
        volumes: vec!["/v.img".into()],
        ..CliOverrides::default()
    };
    let e = resolve(None, cli).expect_err("refused").to_string();
    assert!(e.contains("TLS is off"), "{e}");
}

#[test]
fn tls_mode_and_unknown_tls_keys_are_checked() {
    let bad = "[tls]\nmode = \"maybe\"\n[[export]]\nname = \"d\"\npath = \"d.img\"\n";
    let e = resolve(
        Some((Path::new("/x.toml"), file(bad))),
        CliOverrides::default(),
    )
    .expect_err("refused")
    .to_string();
    assert!(e.contains("tls.mode") && e.contains("maybe"), "{e}");
    let e = parse("[tls]\ncertificate = \"x\"\n", Path::new("/x.toml"))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("certificate"), "{e}");
}
