//! The clap front end: parses arguments, sets up logging and the runtime, and calls
//! into `ops` and `server`. This module holds the top-level [`Cli`]/[`Command`] types,
//! the binary's entry point and the dispatch to one module per command family;
//! argument groups shared by several commands are in [`args`].

mod args;
mod attach;
mod break_glass;
mod check;
mod control;
mod defaults;
mod demo;
mod docs;
mod exports;
pub mod json_policy;
mod keys;
mod keyslots;
mod live_exports;
mod logging;
mod migrate;
mod print;
mod reencrypt;
mod resize;
mod serve;
mod serve_ublk;
mod signals;
mod snapshots;
mod volume;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory as _, Parser, Subcommand};

use crate::compliance;
use crate::server::systemd::{self, ActivatedSocket};
use crate::server::ServerError;

use check::CheckStatus;

const AFTER_HELP: &str = "\
Each volume has its own random 512-bit data key (AES-256-XTS). The data key is stored only
wrapped by a master key held by a key backend: the local keystore (default), a passphrase,
AWS KMS (arn:aws:kms:…, aws-kms:ID, aws-kms:alias/NAME) or an external program
(exec:NAME[:KEY]). See docs/keys.md.

Examples:
  cryptvol create --size 10G vol.img              # wrapped by the default key
  cryptvol create --size 10G --key alias/db db.img
  cryptvol create --size 10G --key aws-kms:alias/db db.img
  cryptvol info vol.img
  cryptvol rekey vol.img --to-key alias/new       # rewrap the data key, data untouched
  cryptvol keyslot add vol.img --passphrase       # add a recovery passphrase
  cryptvol serve --unix /run/cryptvol.sock vol.img
  nbdinfo 'nbd+unix:///vol?socket=/run/cryptvol.sock'

Settings: the keystore, audit log, default key, bare key references and snapshot store come
from `cryptvol --config FILE`, else $CRYPTVOL_CONFIG, else /etc/cryptvol/cryptvol.toml if it
exists; flags > environment variables > file > built-in defaults. Every command that prints
a listing or a record takes --json.

Logging goes to stderr (--log-format text|json|journald); set RUST_LOG (e.g. RUST_LOG=debug) for more detail.";

#[derive(Parser)]
#[command(name = "cryptvol", version, about = "Encrypted block volumes served over NBD", after_help = AFTER_HELP)]
struct Cli {
    /// Form of the log output on stderr: text, json (one object a line), or journald
    /// (native journal entries with structured fields) [default: journald when stderr is
    /// systemd's journal stream, else text; `serve` also reads `log_format` from --config].
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<logging::LogFormat>,
    /// Configuration file (TOML) with the keystore, audit log, default key, bare key
    /// references and snapshot store of every command (flags and their environment
    /// variables override it) [default: /etc/cryptvol/cryptvol.toml if it exists].
    /// `serve` reads its exports and listeners from its own `serve --config`.
    #[arg(long, value_name = "FILE", env = crate::config::CONFIG_ENV)]
    config: Option<std::path::PathBuf>,
    /// What a bare alias/NAME or key id (UUID) names: local (the local keystore, default)
    /// or aws-kms (AWS KMS, as in the AWS CLI). local:…, mk-…, arn:…, aws-kms:… and exec:…
    /// keep their meaning [config: [keys] bare_key_refs].
    #[arg(long, value_name = "local|aws-kms", env = defaults::BARE_KEY_REFS_ENV)]
    bare_key_refs: Option<crate::keys::BareRefs>,
    /// Ceph configuration file for rbd:POOL/IMAGE volumes [default: $CEPH_CONF, else
    /// /etc/ceph/ceph.conf]; the cephx keyring is the one it names (keys never go on the
    /// command line).
    #[arg(long, global = true, value_name = "PATH")]
    ceph_conf: Option<std::path::PathBuf>,
    /// Ceph user (without `client.`) for rbd:POOL/IMAGE volumes [default: $CEPH_ID, else
    /// admin].
    #[arg(long, global = true, value_name = "ID")]
    ceph_id: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The clap definition of the whole command line (for tests and generated docs).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Subcommand)]
enum Command {
    /// Create a new encrypted volume file with a fresh random data key.
    Create(volume::CreateArgs),
    /// Show a volume's header: size, sector size, UUID, cipher, keyslots, header health.
    Info(volume::InfoArgs),
    /// Serve volumes over NBD (TCP and/or Unix sockets) until SIGTERM or SIGINT.
    Serve(Box<serve::ServeArgs>),
    /// Manage master keys: the local keystore, the default key, exec backends.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Rewrap a volume's data key under another master key (any backend to any backend),
    /// replacing one keyslot in a crash-safe header update. The data is not touched.
    Rekey(keyslots::RekeyArgs),
    /// Add or remove keyslots (e.g. a recovery passphrase) of a volume.
    #[command(subcommand)]
    Keyslot(keyslots::KeyslotCommand),
    /// Create a demo volume in a scratch directory and serve it, printing how to attach it.
    Demo(demo::DemoArgs),
    /// Compliance scan: check volume files and directories for unencrypted images, key
    /// problems and damaged headers (reads headers and key metadata only).
    Check(check::CheckArgs),
    /// Encrypted, incremental snapshots in a local directory or an S3-compatible store:
    /// create, list, describe, delete, copy (restore: cryptvol create --from-snapshot).
    #[command(subcommand)]
    Snapshot(snapshots::SnapshotCommand),
    /// Create an encrypted volume from an unencrypted disk: a raw image, a block device or an
    /// NBD export (e.g. qcow2/vmdk through qemu-nbd). Sparse, checksummed, resumable.
    Import(migrate::ImportArgs),
    /// Decrypt a volume to a raw file, a block device or an NBD export (migrating out).
    /// The result is PLAINTEXT.
    Export(migrate::ExportArgs),
    /// Re-encrypt a volume under a new data key: a served export online through the
    /// daemon (it stays attached), or a volume file that is not served.
    Reencrypt(reencrypt::ReencryptArgs),
    /// Show what a running daemon serves: exports, connections, re-encryptions.
    Status(control::StatusArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write the man pages (one per command and subcommand) into a directory.
    Man(docs::ManArgs),
    /// Break-glass recovery: write a volume's data key to an open descriptor and print the
    /// cryptsetup/dmsetup line that opens the volume file with dm-crypt (audited; root or
    /// the file's owner, and the key policy's unwrap permission).
    BreakGlass(break_glass::BreakGlassArgs),
    /// Grow a volume (never shrink): a volume file that is not served, or a served export
    /// online through the daemon's control socket (--control PATH EXPORT).
    Resize(resize::ResizeArgs),
    /// Add, remove and list the exports of a running daemon without restarting it.
    #[command(subcommand)]
    Exports(exports::ExportsCommand),
    /// Attach an export to a kernel nbd device (/dev/nbdN) over the kernel's netlink
    /// interface; reconnect it after a daemon restart (--reconnect, or stay resident with
    /// --watch), pick up a new size (--refresh-size), or detach it (--detach).
    Attach(attach::AttachArgs),
    /// Disconnect a kernel nbd device attached with `cryptvol attach` (or nbd-client).
    Detach(attach::DetachArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match &cli.command {
        Command::Serve(a) => a.config_path(),
        _ => None,
    };
    let (format, warning) = logging::choose(cli.log_format, config);
    logging::init(format, warning);
    if let Err(e) = defaults::init(cli.config.clone(), cli.bare_key_refs) {
        eprintln!("cryptvol: error: {e:#}");
        return ExitCode::FAILURE;
    }
    // Every command may hold key material (a DEK, a master key, a KEK, a passphrase), so
    // all of them, not only `serve`: no core dumps, no ptrace or /proc/PID/mem access by
    // other processes of the same uid. Programs we start (exec key backends) are
    // dumpable again after their execve, as usual.
    if let Err(e) = crate::crypto::harden_process() {
        tracing::warn!("could not harden the process against core dumps: {e}");
    }
    crate::volume::set_rbd_settings(crate::volume::RbdSettings {
        conf: cli.ceph_conf.clone(),
        client_id: cli.ceph_id.clone(),
        takeover: matches!(&cli.command, Command::Serve(a) if a.takeover()),
    });
    // Socket activation: adopt the sockets systemd passed while this process still has a
    // single thread (the LISTEN_* variables are removed from the environment).
    let activated = match cli.command {
        Command::Serve(_) => systemd::take_listen_fds(),
        _ => Ok(Vec::new()),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .thread_name("cryptvol")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cryptvol: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let is_check = matches!(cli.command, Command::Check(_));
    let result = rt.block_on(run(cli, activated));
    // Every command awaits its own blocking work, except a daemon stopped during start-up,
    // which abandons a key backend call still running (an exec program or KMS request
    // that does not answer): dropping the runtime would wait for it, up to its timeout.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(CheckStatus(code)) = e.downcast_ref::<CheckStatus>() {
                return ExitCode::from(*code);
            }
            eprintln!("cryptvol: error: {e:#}");
            if is_check {
                // `check` reserves 1 for "non-compliant": any failure is a scan error.
                return ExitCode::from(compliance::EXIT_ERROR);
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, activated: Result<Vec<ActivatedSocket>, ServerError>) -> Result<()> {
    match cli.command {
        Command::Create(a) => volume::create(a).await,
        Command::Info(a) => volume::info(a),
        Command::Serve(a) => serve::serve(*a, activated?).await,
        Command::Key(k) => keys::key(k),
        Command::Rekey(a) => keyslots::rekey(a).await,
        Command::Keyslot(k) => keyslots::keyslot(k).await,
        Command::Demo(a) => demo::demo(a).await,
        Command::Check(a) => check::check(a).await,
        Command::Snapshot(c) => snapshots::snapshot(c).await,
        Command::Import(a) => migrate::import(a).await,
        Command::Export(a) => migrate::export(a).await,
        Command::Reencrypt(a) => reencrypt::reencrypt(a).await,
        Command::Status(a) => control::status(a).await,
        Command::Completions(a) => docs::completions(a, Cli::command()),
        Command::Man(a) => docs::man(a, Cli::command()),
        Command::BreakGlass(a) => break_glass::break_glass(a).await,
        Command::Resize(a) => resize::resize(a).await,
        Command::Exports(c) => exports::exports(c).await,
        Command::Attach(a) => attach::attach(a).await,
        Command::Detach(a) => attach::detach(a).await,
    }
}
