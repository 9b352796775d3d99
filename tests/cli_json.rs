//! `--json` conventions: every command that prints a listing or a record takes `--json`
//! (checked on the clap command tree, so a new command must be classified), and the
//! output of each is one JSON document (JSON Lines for `check`) with snake_case fields;
//! errors stay on stderr.

mod common;

use std::path::Path;

use common::*;
use cryptvol::cli::json_policy::{
    find, has_json_flag, leaf_commands, JSON_COMMANDS, NO_JSON_COMMANDS,
};
use serde_json::Value;

#[test]
fn every_listing_or_record_command_has_json() {
    let cmd = cryptvol::cli::command();
    let leaves = leaf_commands(&cmd);
    assert!(leaves.len() > 30, "too few commands found: {leaves:?}");
    for leaf in &leaves {
        let json = JSON_COMMANDS.contains(&leaf.as_str());
        let no_json = NO_JSON_COMMANDS.iter().any(|(c, _)| c == leaf);
        assert!(
            json != no_json,
            "command `{leaf}` must be in exactly one list of src/cli/json_policy.rs \
             (JSON_COMMANDS if it prints a listing or a record, with --json)"
        );
    }
    for path in JSON_COMMANDS {
        let c = find(&cmd, path).unwrap_or_else(|| panic!("no command `{path}`"));
        assert!(
            has_json_flag(c),
            "`{path}` prints a record but has no --json"
        );
    }
    for (path, _) in NO_JSON_COMMANDS {
        assert!(find(&cmd, path).is_some(), "no command `{path}`");
    }
}

/// Every object key in `v` is snake_case, except the keys of an encryption context (a
/// map of data, e.g. `cryptvol:volume-uuid`, not field names).
fn assert_snake_case(v: &Value, what: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k.ends_with("context") {
                    continue;
                }
                assert!(
                    !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                    "{what}: field {k:?} is not snake_case"
                );
                assert_snake_case(x, what);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| assert_snake_case(x, what)),
        _ => {}
    }
}

/// `cryptvol ARGS` (with --json among them): stdout parsed as one JSON document.
fn json(env: &Env, args: &[&str]) -> Value {
    let out = run_ok(env.cmd().args(args));
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}):\n{out}"));
    assert_snake_case(&v, &args.join(" "));
    v
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

#[test]
fn key_commands_print_json() {
    let env = Env::new();
    let k = json(&env, &["key", "create", "--json", "--alias", "alias/j"]);
    let id = str_of(&k, "key_id").to_string();
    assert!(id.starts_with("mk-"), "{k}");
    let list = json(&env, &["key", "list", "--json"]);
    let text = list.to_string();
    assert!(text.contains(&id) && text.contains("alias/j"), "{list}");
    let d = json(&env, &["key", "describe", "--json", "alias/j"]);
    assert_eq!(str_of(&d, "key_id"), id);
    let g = json(&env, &["key", "get-default", "--json"]);
    assert_eq!(str_of(&g, "source"), "built-in");
    assert_eq!(str_of(&g, "backend"), "local");
    run_ok(env.cmd().args(["key", "set-default", "alias/j"]));
    let g = json(&env, &["key", "get-default", "--json"]);
    assert_eq!(str_of(&g, "source"), "keystore");
    assert_eq!(str_of(&g, "key"), "alias/j");
    let e = json(&env, &["key", "exec", "list", "--json"]);
    assert!(e.is_array() || e.is_object(), "{e}");
}

/// A passphrase file with cheap Argon2 parameters for a test keyslot.
fn pass_args(env: &Env) -> Vec<String> {
    let pf = env.path("pass");
    std::fs::write(&pf, "correct horse\n").expect("write passphrase");
    [
        "--passphrase-file",
        s(&pf),
        "--pbkdf-memory",
        "64",
        "--pbkdf-time",
        "1",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

#[test]
fn volume_and_keyslot_commands_print_json() {
    let env = Env::new();
    let vol = env.path("v.img");
    let c = json(&env, &["create", "--json", "--size", "1M", s(&vol)]);
    assert_eq!(c["size"], 1 << 20, "{c}");
    let uuid = str_of(&c, "uuid").to_string();
    let i = json(&env, &["info", "--json", s(&vol)]);
    assert_eq!(str_of(&i, "uuid"), uuid);
    assert_eq!(i["keyslots"].as_array().map(Vec::len), Some(1), "{i}");

    let mut add = vec!["keyslot", "add", "--json", s(&vol)];
    let pass = pass_args(&env);
    add.extend(pass.iter().map(String::as_str));
    let a = json(&env, &add);
    assert_eq!(a["keyslots"].as_array().map(Vec::len), Some(2), "{a}");
    assert_eq!(str_of(&a["keyslots"][1], "backend"), "passphrase");
    let r = json(&env, &["keyslot", "remove", "--json", s(&vol), "1"]);
    assert_eq!(r["keyslots"].as_array().map(Vec::len), Some(1), "{r}");
    run_ok(env.cmd().args(["key", "create", "--alias", "alias/r"]));
    let rk = json(&env, &["rekey", "--json", s(&vol), "--to-key", "alias/r"]);
    let described = json(&env, &["key", "describe", "--json", "alias/r"]);
    assert_eq!(rk["keyslots"][0]["key_id"], described["key_id"], "{rk}");

    // check: JSON Lines, one object per item.
    let out = run(env.cmd().args(["check", "--json", s(&vol)]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let item: Value = serde_json::from_str(lines[0]).expect("check line is JSON");
    assert_snake_case(&item, "check");
    assert!(item.to_string().contains("v.img"), "{item}");
}

#[test]
fn snapshot_commands_print_json() {
    let env = Env::new();
    let vol = env.create("v.img", "1M", &[]);
    let store = env.path("snaps");
    let st = ["--store", s(&store)];
    let c = json(
        &env,
        &[&["snapshot", "create", "--json", s(&vol)][..], &st].concat(),
    );
    let id = str_of(&c, "id").to_string();
    let l = json(&env, &[&["snapshot", "list", "--json"][..], &st].concat());
    assert!(l.to_string().contains(&id), "{l}");
    let d = json(
        &env,
        &[&["snapshot", "describe", "--json", &id][..], &st].concat(),
    );
    assert!(d.to_string().contains(&id), "{d}");
    let del = json(
        &env,
        &[&["snapshot", "delete", "--json", &id][..], &st].concat(),
    );
    assert!(del["chunks_deleted"].is_u64(), "{del}");
    let gc = json(&env, &[&["snapshot", "gc", "--json"][..], &st].concat());
    assert_eq!(gc["chunks_deleted"], 0, "{gc}");
    let l = json(&env, &[&["snapshot", "list", "--json"][..], &st].concat());
    assert_eq!(l.as_array().map(Vec::len), Some(0), "{l}");
}

#[test]
fn json_errors_go_to_stderr_with_a_failure_status() {
    let env = Env::new();
    let missing = env.path("missing.img");
    for args in [
        vec!["info", "--json", s(&missing)],
        vec!["key", "describe", "--json", "alias/none"],
    ] {
        let out = run(env.cmd().args(&args));
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} wrote to stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error"), "{args:?}: {err}");
    }
    assert!(!Path::new(&missing).exists());
}
