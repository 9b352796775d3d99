//! Shell completions and man pages generated from the clap definitions (issue 16 item 6):
//! `cryptvol completions SHELL`, `cryptvol man --out DIR` and `scripts/install-docs.sh`,
//! checked with the real bash completion machinery and the real `man`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The subcommands `cryptvol [PARENT] --help` lists (without `help`): what the pages and
/// completions must cover, taken from the binary rather than a list in this test.
fn subcommands(parent: &[&str]) -> Vec<String> {
    let help = run_ok(Command::new(bin()).args(parent).arg("--help"));
    let listing = help
        .split("Commands:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no Commands: section in the help of {parent:?}:\n{help}"));
    let names: Vec<String> = listing
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 2, "too few subcommands parsed:\n{help}");
    names
}

/// Asks the bash completion function what completes `words` (the last one being typed).
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let line = words.join(" ");
    let program = format!(
        "source {}; COMP_WORDS=({line}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
         _cryptvol cryptvol '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len() - 2],
    );
    run_ok(Command::new("bash").args(["--norc", "-c", &program]))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `man ARGS` rendered as plain text, without hyphenation, runs of blanks made one space
/// (man justifies lines).
fn render_man(args: &[&std::ffi::OsStr]) -> String {
    let text = run_ok(
        Command::new("man")
            .args(["-P", "cat"])
            .args(args)
            .env("MANWIDTH", "250")
            .env("MANROFFOPT", "-rHY=0"),
    );
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `man -l PAGE`.
fn render_page(page: &Path) -> String {
    render_man(&["-l".as_ref(), page.as_os_str()])
}

#[test]
fn bash_completion_completes_the_subcommands() {
    require("bash");
    let env = Env::new();
    let script = run_ok(Command::new(bin()).args(["completions", "bash"]));
    let path = env.path("cryptvol.bash");
    std::fs::write(&path, &script).expect("write script");

    let top = subcommands(&[]);
    for name in ["create", "serve", "snapshot", "key", "completions", "man"] {
        assert!(top.iter().any(|n| n == name), "{name} missing from {top:?}");
    }
    let offered = bash_complete(&path, &["cryptvol", ""]);
    for name in &top {
        assert!(
            offered.contains(name),
            "`cryptvol <TAB>` lacks {name}: {offered:?}"
        );
    }
    assert_eq!(bash_complete(&path, &["cryptvol", "sna"]), ["snapshot"]);
    let key = bash_complete(&path, &["cryptvol", "key", ""]);
    for name in subcommands(&["key"]) {
        assert!(
            key.contains(&name),
            "`cryptvol key <TAB>` lacks {name}: {key:?}"
        );
    }
    let opts = bash_complete(&path, &["cryptvol", "create", "--si"]);
    assert_eq!(opts, ["--size"], "options of create");
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_one_is_refused() {
    for (shell, marker) in [
        ("bash", "complete -F _cryptvol"),
        ("zsh", "#compdef cryptvol"),
        ("fish", "complete -c cryptvol"),
        ("elvish", "edit:completion:arg-completer[cryptvol]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let script = run_ok(Command::new(bin()).args(["completions", shell]));
        assert!(script.contains(marker), "{shell}: no {marker:?}:\n{script}");
        assert!(script.contains("snapshot"), "{shell}: no subcommands");
    }
    let out = run(Command::new(bin()).args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'tcsh'") && err.contains("bash"),
        "{err}"
    );
}

#[test]
fn man_writes_a_parsable_page_per_command_and_subcommand() {
    require("man");
    let env = Env::new();
    let dir = env.path("man1");
    let printed = run_ok(Command::new(bin()).args(["man", "--out"]).arg(&dir));

    let mut pages = vec![(
        "cryptvol".to_owned(),
        "Encrypted block volumes served over NBD",
    )];
    for name in subcommands(&[]) {
        pages.push((format!("cryptvol-{name}"), ""));
    }
    for name in subcommands(&["key"]) {
        pages.push((format!("cryptvol-key-{name}"), ""));
    }
    for name in subcommands(&["snapshot"]) {
        pages.push((format!("cryptvol-snapshot-{name}"), ""));
    }
    pages.push((
        "cryptvol-create".to_owned(),
        "Create a new encrypted volume file with a fresh random data key",
    ));
    pages.push((
        "cryptvol-key-create".to_owned(),
        "Create a new master key in the local keystore",
    ));
    for (name, about) in &pages {
        let path = dir.join(format!("{name}.1"));
        assert!(
            printed.lines().any(|l| Path::new(l) == path),
            "{} not printed:\n{printed}",
            path.display()
        );
        let roff = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("no page {}: {e}", path.display()));
        assert!(roff.contains(&format!(".TH {name} 1")), "{name}: no .TH");
        let text = render_page(&path);
        assert!(
            text.contains(&format!("{name} - ")),
            "{name}: NAME:\n{text}"
        );
        assert!(text.contains("SYNOPSIS"), "{name}: no SYNOPSIS:\n{text}");
        assert!(text.contains(about), "{name}: no {about:?}:\n{text}");
    }
    // The create page documents its options.
    let create = render_page(&dir.join("cryptvol-create.1"));
    assert!(create.contains("--size"), "{create}");
}

#[test]
fn install_docs_installs_completions_and_man_pages_man_finds() {
    require("man");
    require("bash");
    let env = Env::new();
    let root = env.path("stage");
    let install = || {
        run_ok(
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-docs.sh"))
                .args(["--prefix", "/usr", "--destdir"])
                .arg(&root)
                .arg("--cryptvol")
                .arg(bin()),
        )
    };
    let out = install();
    let share = root.join("usr/share");
    let bash = share.join("bash-completion/completions/cryptvol");
    for f in [
        bash.clone(),
        share.join("zsh/site-functions/_cryptvol"),
        share.join("fish/vendor_completions.d/cryptvol.fish"),
        share.join("man/man1/cryptvol.1"),
        share.join("man/man1/cryptvol-key-create.1"),
    ] {
        assert!(f.is_file(), "{} not installed:\n{out}", f.display());
    }
    assert_eq!(bash_complete(&bash, &["cryptvol", "ser"]), ["serve"]);
    // man finds the installed pages by name under the staged man directory.
    let man_dir = share.join("man");
    let page = render_man(&[
        "-M".as_ref(),
        man_dir.as_os_str(),
        "cryptvol-serve".as_ref(),
    ]);
    assert!(
        page.contains("cryptvol-serve - Serve volumes over NBD"),
        "{page}"
    );
    // Installing again replaces the files (an upgrade), leaving no temporaries behind.
    install();
    let leftovers: Vec<_> = std::fs::read_dir(bash.parent().expect("dir"))
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, ["cryptvol"], "completions dir after a reinstall");
}
