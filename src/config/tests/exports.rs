//! Exports: file tables and VOLUME arguments, unique names, access keys and --allow-* flags.

use super::*;

#[test]
fn cli_volumes_are_added_and_flags_apply_to_all() {
    let cli = CliOverrides {
        volumes: vec!["extra=/tmp/e.img".into(), "/tmp/plain.img".into()],
        read_only: true,
        ..CliOverrides::default()
    };
    let s = resolve_full(cli).expect("resolves");
    let names: Vec<_> = s.exports.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["data", "backup", "extra", "plain"]);
    assert!(s.exports.iter().all(|e| e.options.read_only));
    assert!(s.exports[1].options.discard && !s.exports[2].options.discard);
}

#[test]
fn duplicate_export_names_are_refused() {
    let cli = CliOverrides {
        volumes: vec!["data=/tmp/other.img".into()],
        ..CliOverrides::default()
    };
    let err = resolve_full(cli).expect_err("duplicate");
    assert!(err.to_string().contains("\"data\" is used twice"), "{err}");
}

#[test]
fn nothing_to_serve_is_an_error() {
    let err = resolve(None, with_default_socket()).expect_err("no exports");
    assert!(err.to_string().contains("nothing to serve"), "{err}");
    let f = file("[listen]\nunix = [\"/tmp/s\"]\n");
    let err =
        resolve(Some((Path::new("/c.toml"), f)), CliOverrides::default()).expect_err("no exports");
    assert!(err.to_string().contains("[[export]]"), "{err}");
}

#[test]
fn export_access_keys_resolve_numbers_and_names() {
    let text = r#"
[[export]]
name = "a"
path = "/a"
allow_uid = [1001, "root"]
allow_gid = ["0", 2000]
allow_tls_subject = ["CN=client1,O=Example"]
allow_tls_san = ["DNS:c.example.org", "IP:192.0.2.7"]

[[export]]
name = "b"
path = "/b"
allow_anyone = true
"#;
    let s = resolve(
        Some((Path::new("/c.toml"), file(text))),
        with_default_socket(),
    )
    .expect("resolves");
    let a = &s.exports[0].access;
    assert_eq!(a.allow_uid, [1001, 0]);
    assert_eq!(a.allow_gid, [0, 2000]);
    assert_eq!(a.allow_tls_subject, ["CN=client1,O=Example"]);
    assert_eq!(a.allow_tls_san, ["DNS:c.example.org", "IP:192.0.2.7"]);
    assert!(!a.allow_anyone);
    assert_eq!(
        s.exports[1].access,
        AccessPolicy {
            allow_anyone: true,
            ..AccessPolicy::default()
        }
    );
}

#[test]
fn bad_export_access_keys_are_refused_naming_file_export_and_key() {
    for (bad, key) in [
        ("allow_uid = [-1]", "allow_uid"),
        ("allow_uid = [4294967296]", "allow_uid"),
        (
            "allow_uid = [\"no-such-user-cryptvol\"]",
            "no-such-user-cryptvol",
        ),
        (
            "allow_gid = [\"no-such-group-cryptvol\"]",
            "no-such-group-cryptvol",
        ),
        ("allow_gid = [true]", "allow_gid"),
        ("allow_tls_subject = [\" \"]", "allow_tls_subject"),
        ("allow_tls_san = [\"c.example.org\"]", "allow_tls_san"),
        ("allow_tls_san = [\"DNS:\"]", "allow_tls_san"),
    ] {
        let text = format!("[[export]]\nname = \"v\"\npath = \"/v\"\n{bad}\n");
        let err = resolve(
            Some((Path::new("/c.toml"), file(&text))),
            with_default_socket(),
        )
        .expect_err(bad);
        let msg = err.to_string();
        assert!(msg.contains("/c.toml"), "{msg}");
        assert!(msg.contains("export \"v\""), "{msg}");
        assert!(msg.contains(key), "{msg}");
    }
}

#[test]
fn allow_flags_apply_to_volume_arguments_only() {
    let cli = CliOverrides {
        volumes: vec!["extra=/tmp/e.img".into()],
        allow: AllowFlags {
            uid: vec!["65534".into(), "root".into()],
            gid: vec!["root".into()],
            tls_san: vec!["EMAIL:a@example.org".into()],
            ..AllowFlags::default()
        },
        ..with_default_socket()
    };
    let s = resolve_full(cli).expect("resolves");
    assert_eq!(s.exports[0].access, AccessPolicy::default(), "file export");
    let extra = &s.exports[2].access;
    assert_eq!(extra.allow_uid, [65534, 0]);
    assert_eq!(extra.allow_gid, [0]);
    assert_eq!(extra.allow_tls_san, ["EMAIL:a@example.org"]);

    // Without a VOLUME argument the flags would do nothing: an error says where to
    // put them instead.
    let cli = CliOverrides {
        allow: AllowFlags {
            anyone: true,
            ..AllowFlags::default()
        },
        ..with_default_socket()
    };
    let err = resolve_full(cli).expect_err("flags without volumes");
    assert!(err.to_string().contains("[[export]]"), "{err}");

    let cli = CliOverrides {
        volumes: vec!["/tmp/v.img".into()],
        allow: AllowFlags {
            uid: vec!["no-such-user-cryptvol".into()],
            ..AllowFlags::default()
        },
        ..with_default_socket()
    };
    let err = resolve(None, cli).expect_err("unknown user");
    assert!(err.to_string().contains("--allow-uid"), "{err}");
}

#[test]
fn volume_args() {
    assert_eq!(
        parse_volume_arg("a=/x/y.img"),
        Ok(("a".to_string(), PathBuf::from("/x/y.img")))
    );
    assert_eq!(
        parse_volume_arg("/x/disk.img"),
        Ok(("disk".to_string(), PathBuf::from("/x/disk.img")))
    );
    assert!(parse_volume_arg("=x").is_err());
    assert!(parse_volume_arg("a=").is_err());
    assert!(parse_volume_arg("/").is_err());
}
