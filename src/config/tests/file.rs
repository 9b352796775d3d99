//! Parsing the file: unknown keys, syntax and type errors, the shipped example.

use super::*;

#[test]
fn unknown_keys_are_refused_naming_key_and_file() {
    for (text, key) in [
        ("bogus = 1\n", "bogus"),
        ("[listen]\ntcpp = []\n", "tcpp"),
        (
            "[[export]]\nname = \"a\"\npath = \"b\"\nreadonly = true\n",
            "readonly",
        ),
        ("[server]\n", "server"),
    ] {
        let err = parse(text, Path::new("/x/c.toml")).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("/x/c.toml"), "{msg}");
        assert!(msg.contains(key), "{msg}");
    }
}

#[test]
fn syntax_and_type_errors_name_the_file() {
    for text in [
        "listen = [",
        "max_inflight = true\n[[export]]\nname = \"a\"\npath = \"p\"\n",
        "[[export]]\nname = 3\npath = \"p\"\n",
        "[[export]]\nname = \"a\"\n",
        "[listen]\ntcp = [\"nonsense\"]\n[[export]]\nname = \"a\"\npath = \"p\"\n",
        "[[export]]\nname = \"\"\npath = \"p\"\n",
        "",
    ] {
        let err = match parse(text, Path::new("/x/c.toml")) {
            Err(e) => e,
            Ok(f) => resolve(Some((Path::new("/x/c.toml"), f)), with_default_socket())
                .expect_err("invalid"),
        };
        assert!(err.to_string().contains("/x/c.toml"), "{err}");
    }
}

#[test]
fn the_shipped_example_parses_and_resolves() {
    let text = include_str!("../../../systemd/cryptvol.toml.example");
    let f = parse(text, Path::new("/etc/cryptvol/cryptvol.toml")).expect("example parses");
    let s = resolve(
        Some((Path::new("/etc/cryptvol/cryptvol.toml"), f)),
        CliOverrides::default(),
    )
    .expect("example resolves");
    assert!(!s.exports.is_empty());
    assert!(!s.listeners.is_empty());
}
