//! Which commands print JSON: every command that prints a listing or a record takes
//! `--json` and then writes one JSON document (snake_case field names) to stdout, errors
//! still going to stderr with a non-zero exit. `check --json` is the one stream: one
//! JSON object per scanned item and line (JSON Lines), so a scan of many files can be
//! read as it goes.
//!
//! The two lists below classify every leaf command; `tests/cli_json.rs` walks the clap
//! command tree and fails when a command is in neither list (a new command must be
//! classified) or a listed one lacks `--json`.

/// Commands that print a listing or a record, each with `--json`.
pub const JSON_COMMANDS: &[&str] = &[
    "create",
    "info",
    "rekey",
    "keyslot add",
    "keyslot remove",
    "key create",
    "key list",
    "key describe",
    "key get-default",
    "key exec list",
    "check",
    "snapshot create",
    "snapshot list",
    "snapshot describe",
    "snapshot delete",
    "snapshot gc",
    "snapshot copy",
    "import",
    "export",
    "reencrypt",
    "status",
    "exports list",
    "break-glass",
];

/// Commands that print no listing or record (a daemon, or a one-line confirmation of a
/// change), with the reason.
pub const NO_JSON_COMMANDS: &[(&str, &str)] = &[
    ("serve", "a daemon; `status --json` reports on it"),
    ("demo", "a daemon for trying cryptvol out"),
    (
        "exports add",
        "confirmation; `exports list --json` shows the result",
    ),
    (
        "exports remove",
        "confirmation; `exports list --json` shows the result",
    ),
    ("resize", "confirmation; `info --json` shows the new size"),
    (
        "attach",
        "prints the device name; `nbd-client -c` / sysfs show its state",
    ),
    ("detach", "confirmation"),
    ("completions", "prints a shell script"),
    ("man", "writes man pages into a directory"),
    (
        "key alias add",
        "confirmation; `key describe --json` shows the result",
    ),
    (
        "key alias retarget",
        "confirmation; `key describe --json` shows the result",
    ),
    (
        "key alias remove",
        "confirmation; `key list --json` shows the result",
    ),
    (
        "key enable",
        "confirmation; `key describe --json` shows the result",
    ),
    (
        "key disable",
        "confirmation; `key describe --json` shows the result",
    ),
    (
        "key schedule-deletion",
        "confirmation; `key describe --json` shows the result",
    ),
    (
        "key cancel-deletion",
        "confirmation; `key describe --json` shows the result",
    ),
    (
        "key rotate",
        "confirmation; `key describe --json` shows the result",
    ),
    (
        "key purge",
        "confirmation; `key list --json` shows the result",
    ),
    (
        "key grant",
        "confirmation; `key describe --json` shows the policy",
    ),
    (
        "key revoke",
        "confirmation; `key describe --json` shows the policy",
    ),
    (
        "key set-default",
        "confirmation; `key get-default --json` shows the result",
    ),
    (
        "key exec add",
        "confirmation; `key exec list --json` shows the result",
    ),
    (
        "key exec remove",
        "confirmation; `key exec list --json` shows the result",
    ),
];

/// The leaf commands of `cmd` as space-separated paths ("key exec list"), skipping
/// clap's generated `help` subcommands.
pub fn leaf_commands(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    collect_leaves(cmd, "", &mut out);
    out
}

fn collect_leaves(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
    let subs: Vec<&clap::Command> = cmd
        .get_subcommands()
        .filter(|c| c.get_name() != "help")
        .collect();
    for sub in &subs {
        let path = if prefix.is_empty() {
            sub.get_name().to_string()
        } else {
            format!("{prefix} {}", sub.get_name())
        };
        if sub.has_subcommands() {
            collect_leaves(sub, &path, out);
        } else {
            out.push(path);
        }
    }
}

/// The leaf command at `path` under `cmd`.
pub fn find<'a>(cmd: &'a clap::Command, path: &str) -> Option<&'a clap::Command> {
    path.split(' ')
        .try_fold(cmd, |c, name| c.find_subcommand(name))
}

/// Whether a command takes `--json`.
pub fn has_json_flag(cmd: &clap::Command) -> bool {
    cmd.get_arguments().any(|a| a.get_long() == Some("json"))
}
