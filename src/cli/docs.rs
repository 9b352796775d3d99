//! `cryptvol completions SHELL` and `cryptvol man --out DIR`: shell completion scripts and
//! man pages generated from the clap definitions ([`clap_complete`], [`clap_mangen`]).
//! `scripts/install-docs.sh` installs both.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap_complete::Shell;
use clap_mangen::Man;

use crate::fsutil::{write_atomically, Durability};

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  cryptvol completions bash > /usr/local/share/bash-completion/completions/cryptvol
  cryptvol completions zsh > /usr/local/share/zsh/site-functions/_cryptvol
  cryptvol completions fish > /usr/local/share/fish/vendor_completions.d/cryptvol.fish
  scripts/install-docs.sh          # completions for bash, zsh and fish, and the man pages")]
pub(super) struct CompletionsArgs {
    /// The shell to write a completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  sudo cryptvol man --out /usr/local/share/man/man1 && man cryptvol-create")]
pub(super) struct ManArgs {
    /// Directory to write the pages to (created if missing), e.g.
    /// /usr/local/share/man/man1. Existing pages of the same name are replaced.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Prints the completion script of `args.shell` for `cli` (the whole command tree).
pub(super) fn completions(args: CompletionsArgs, mut cli: clap::Command) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cli, "cryptvol", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        // A reader that stops early (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write the completion script to standard output"),
    }
}

/// Writes one man page per command and subcommand of `cli` into `args.out`, printing
/// each path written.
pub(super) fn man(args: ManArgs, cli: clap::Command) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the directory {}", args.out.display()))?;
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let mut pages = Vec::new();
    render_pages(&cli, &mut pages).context("cannot render the man pages")?;
    for (name, page) in pages {
        let path = args.out.join(name);
        write_page(&path, &page)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// The pages of `cmd` and of its visible subcommands, recursively: `(file name, roff)`,
/// named `cryptvol.1`, `cryptvol-create.1`, `cryptvol-key-create.1`, ...
fn render_pages(cmd: &clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
    let man = Man::new(cmd.clone())
        .manual("cryptvol manual")
        .source(concat!("cryptvol ", env!("CARGO_PKG_VERSION")));
    let mut page = Vec::new();
    man.render(&mut page)?;
    pages.push((man.get_filename(), page));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_pages(sub, pages)?;
    }
    Ok(())
}

/// Replaces `path` with `page` (a fresh temporary renamed into place: a symlink at `path`
/// is replaced, never written through).
fn write_page(path: &Path, page: &[u8]) -> Result<()> {
    write_atomically(path, page, 0o644, Durability::Durable)
        .with_context(|| format!("cannot write the man page {}", path.display()))
}
