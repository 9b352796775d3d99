//! The clap front end: parses arguments, sets up logging and the runtime, and calls
//! into `ops` and `server`. No logic of its own beyond presentation.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::compliance::{self, CheckOptions, ItemReport, Scanner, Verdict};
use crate::config::{self, CliOverrides, ExportSpec};
use crate::keys::{
    Argon2Params, ExecSpec, KeyError, KeyInfo, KeyRef, KeyState, LocalKeystore, PassphraseSource,
    Permission, Principal, WrappedDek,
};
use crate::ops::{self, KeyOptions, KeyslotChange, NewKey};
use crate::server::control::{
    self as ctl, DataKeyMaker, HookError, ProgressEvent, Request, SnapshotJob, SnapshotTaker,
};
use crate::server::systemd::{self, ActivatedSocket};
use crate::server::{
    self, ControlHooks, ControlSocket, Export, Exports, Listener, ListenerSpec, ServerConfig,
    ServerError,
};
use crate::size::{format_size, parse_size};
use crate::volume::{OpenOptions, VolumeSpec, DEFAULT_SECTOR_SIZE};

const AFTER_HELP: &str = "\
Each volume has its own random 512-bit data key (AES-256-XTS). The data key is stored only
wrapped by a master key held by a key backend: the local keystore (default), an external
program (exec:NAME) or a passphrase. See docs/keys.md.

Examples:
  cryptvol create --size 10G vol.img              # wrapped by the default key
  cryptvol create --size 10G --key alias/db db.img
  cryptvol info vol.img
  cryptvol rekey vol.img --to-key alias/new       # rewrap the data key, data untouched
  cryptvol keyslot add vol.img --passphrase       # add a recovery passphrase
  cryptvol serve --unix /run/cryptvol.sock vol.img
  nbdinfo 'nbd+unix:///vol?socket=/run/cryptvol.sock'

Logging goes to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more detail.";

#[derive(Parser)]
#[command(name = "cryptvol", version, about = "Encrypted block volumes served over NBD", after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new encrypted volume file with a fresh random data key.
    Create(CreateArgs),
    /// Show a volume's header: size, sector size, UUID, cipher, keyslots, header health.
    Info(InfoArgs),
    /// Serve volumes over NBD (TCP and/or Unix sockets) until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
    /// Manage master keys: the local keystore, the default key, exec backends.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Rewrap a volume's data key under another master key (any backend to any backend),
    /// replacing one keyslot in a crash-safe header update. The data is not touched.
    Rekey(RekeyArgs),
    /// Add or remove keyslots (e.g. a recovery passphrase) of a volume.
    #[command(subcommand)]
    Keyslot(KeyslotCommand),
    /// Create a demo volume in a scratch directory and serve it, printing how to attach it.
    Demo(DemoArgs),
    /// Compliance scan: check volume files and directories for unencrypted images, key
    /// problems and damaged headers (reads headers and key metadata only).
    Check(CheckArgs),
    /// Encrypted, incremental snapshots in a local directory or an S3-compatible store:
    /// create, list, describe, delete, copy (restore: cryptvol create --from-snapshot).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Create an encrypted volume from an unencrypted disk: a raw image, a block device or an
    /// NBD export (e.g. qcow2/vmdk through qemu-nbd). Sparse, checksummed, resumable.
    Import(ImportArgs),
    /// Decrypt a volume to a raw file, a block device or an NBD export (migrating out).
    /// The result is PLAINTEXT.
    Export(ExportArgs),
    /// Re-encrypt a volume under a new data key: a served export online through the
    /// daemon (it stays attached), or a volume file that is not served.
    Reencrypt(ReencryptArgs),
    /// Show what a running daemon serves: exports, connections, re-encryptions.
    Status(StatusArgs),
}

#[derive(Args, Clone)]
struct KeystoreArgs {
    /// Local keystore directory [default: $CRYPTVOL_KEYSTORE, else /var/lib/cryptvol/keys
    /// for root, else $XDG_DATA_HOME/cryptvol/keys]
    #[arg(long, value_name = "DIR")]
    keystore: Option<PathBuf>,
    /// Append key audit records to PATH [default: audit.jsonl in the keystore directory].
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
}

/// How to unlock a volume whose keyslots include a passphrase (rekey, keyslot).
#[derive(Args, Clone)]
struct UnlockArgs {
    /// Unlock through a passphrase keyslot, reading the passphrase from FILE.
    #[arg(long, value_name = "FILE", group = "unlock")]
    unlock_passphrase_file: Option<PathBuf>,
    /// Unlock through a passphrase keyslot, reading the passphrase from descriptor N.
    #[arg(long, value_name = "N", group = "unlock")]
    unlock_passphrase_fd: Option<i32>,
    /// Unlock through a passphrase keyslot, prompting on the terminal.
    #[arg(long, group = "unlock")]
    unlock_passphrase: bool,
}

impl UnlockArgs {
    fn source(&self) -> Option<PassphraseSource> {
        passphrase_source(
            &self.unlock_passphrase_file,
            self.unlock_passphrase_fd,
            self.unlock_passphrase,
        )
    }
}

fn passphrase_source(
    file: &Option<PathBuf>,
    fd: Option<i32>,
    prompt: bool,
) -> Option<PassphraseSource> {
    if let Some(f) = file {
        Some(PassphraseSource::File(f.clone()))
    } else if let Some(fd) = fd {
        // The descriptor was opened by our caller without close-on-exec: mark it now, so
        // that no program we start (an exec key backend) inherits the passphrase source.
        // A descriptor that is not open is reported when it is read.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Some(PassphraseSource::Fd(fd))
    } else if prompt {
        Some(PassphraseSource::Prompt)
    } else {
        None
    }
}

#[derive(Args, Clone)]
struct PassphraseArgs {
    /// Read the passphrase from FILE (one trailing newline is ignored).
    #[arg(long, value_name = "FILE", group = "pass")]
    passphrase_file: Option<PathBuf>,
    /// Read the passphrase from file descriptor N until end of file.
    #[arg(long, value_name = "N", group = "pass")]
    passphrase_fd: Option<i32>,
    /// Prompt for the passphrase on the terminal.
    #[arg(long, group = "pass")]
    passphrase: bool,
    /// The most Argon2 memory (KiB) a passphrase keyslot may ask for on this host (it may
    /// use at most 16 passes of it), checked before any work since keyslots are not
    /// authenticated before they are opened [default: 1048576, 1 GiB].
    #[arg(long, value_name = "KIB", env = crate::keys::ARGON2_MAX_MEMORY_ENV,
          value_parser = clap::value_parser!(u32).range(8..=i64::from(crate::keys::ARGON2_MAX_MEMORY_KIB)))]
    max_argon2_memory: Option<u32>,
}

impl PassphraseArgs {
    /// The passphrase source; also installs `--max-argon2-memory` as this process's
    /// Argon2 limit.
    fn source(&self) -> Option<PassphraseSource> {
        if let Some(kib) = self.max_argon2_memory {
            crate::keys::set_host_max_memory_kib(kib);
        }
        passphrase_source(&self.passphrase_file, self.passphrase_fd, self.passphrase)
    }
}

#[derive(Args)]
struct CreateArgs {
    /// Volume size, e.g. 512M, 10G, 1T (binary units); a multiple of the sector size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg, required_unless_present = "from_snapshot", conflicts_with = "from_snapshot")]
    size: Option<u64>,
    /// Restore the volume from this snapshot (size and sector size come from it). The
    /// volume gets its own new data key, wrapped by --key (default: the snapshot's own
    /// master key), and every chunk is re-encrypted under it.
    #[arg(long, value_name = "SNAPSHOT-ID", requires = "store")]
    from_snapshot: Option<String>,
    /// The snapshot store of --from-snapshot.
    #[arg(long, value_name = "STORE", env = "CRYPTVOL_SNAPSHOT_STORE")]
    store: Option<String>,
    /// Master key to wrap the data key: a local key id (mk-…) or alias/NAME, exec:NAME[:KEY],
    /// or an AWS KMS key (arn:aws:kms:…, aws-kms:ID, aws-kms:alias/NAME) [default: the key set
    /// with `cryptvol key set-default`, else the local default key, created on first use].
    #[arg(
        long,
        visible_alias = "kms-key-id",
        value_name = "KEY",
        conflicts_with = "pass"
    )]
    key: Option<String>,
    /// Sector size: the XTS data unit and the smallest block clients should use.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SECTOR_SIZE, value_parser = parse_sector_size)]
    sector_size: u32,
    /// Write ciphertext over the whole data area now and mark it all allocated, so the
    /// file never reveals which blocks were written (uses the full size on disk, takes a
    /// full write; block status then reports no holes). Default: thin, never-written
    /// blocks read as zeros and take no space.
    #[arg(long)]
    preallocate: bool,
    /// Make a volume without an allocation map, in the original format that cryptvol
    /// before thin volumes can open (never-written blocks then read as random bytes, not
    /// zeros, and block status reports no holes). For compatibility and benchmarking.
    #[arg(long, hide_short_help = true)]
    no_allocation_map: bool,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    pass: PassphraseArgs,
    #[command(flatten)]
    kdf: KdfArgs,
    /// The volume file to create (refuses to overwrite an existing file).
    file: PathBuf,
}

#[derive(Args, Clone)]
struct KdfArgs {
    /// Argon2id memory cost in KiB for a new passphrase keyslot.
    #[arg(long, value_name = "KIB", default_value_t = Argon2Params::default().memory_kib)]
    pbkdf_memory: u32,
    /// Argon2id iterations for a new passphrase keyslot.
    #[arg(long, value_name = "N", default_value_t = Argon2Params::default().time)]
    pbkdf_time: u32,
    /// Argon2id lanes for a new passphrase keyslot.
    #[arg(long, value_name = "N", default_value_t = Argon2Params::default().lanes)]
    pbkdf_parallel: u32,
}

impl KdfArgs {
    fn params(&self) -> Argon2Params {
        Argon2Params {
            memory_kib: self.pbkdf_memory,
            time: self.pbkdf_time,
            lanes: self.pbkdf_parallel,
        }
    }
}

#[derive(Args)]
struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The volume file.
    file: PathBuf,
}

const SERVE_AFTER_HELP: &str = "\
Listeners: with no --tcp/--unix and none in the config file, cryptvol listens on one Unix
socket only (mode 0600): /run/cryptvol/nbd.sock when run as root, else
$XDG_RUNTIME_DIR/cryptvol/nbd.sock. TCP is opened only when asked for; a non-loopback TCP
address needs --tls require, or --insecure (plaintext for anyone on the network; the log
repeats a warning). Limits apply to each listener separately, and per peer (a uid on Unix
sockets, an IP address on TCP).

With --config FILE (TOML, see systemd/cryptvol.toml.example): VOLUME arguments are added to
the file's exports; --read-only/--discard apply to all exports; any --tcp/--unix replaces the
file's listeners; other flags override the file. Sockets passed by systemd socket activation
(LISTEN_FDS) replace all configured listeners. With NOTIFY_SOCKET set, READY=1 is sent once
every volume is unlocked and the listeners are open, STOPPING=1 on SIGTERM/SIGINT.

Who may open an export: a Unix-socket client running as the daemon's own user, plus those the
--allow-* options (for VOLUME arguments) or an [[export]] table's allow_* keys admit; a client
allowed by any of its identities is let in. Everyone else gets NBD_REP_ERR_POLICY, does not see
the export in a listing, and is recorded in the audit log. Plaintext TCP clients have no
identity: they need --allow-anyone.";

#[derive(Args)]
#[command(after_help = SERVE_AFTER_HELP)]
struct ServeArgs {
    /// Read listeners, exports, keystore and limits from a TOML file (the systemd unit uses
    /// /etc/cryptvol/cryptvol.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (repeatable; none by default). A non-loopback address needs
    /// --tls require or --insecure.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Vec<String>,
    /// Listen on a Unix socket at PATH (repeatable) [default, when no listener is
    /// configured: /run/cryptvol/nbd.sock for root, $XDG_RUNTIME_DIR/cryptvol/nbd.sock for
    /// other users].
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// Permissions of Unix sockets (octal) [default: 0600].
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,
    /// Allow non-loopback TCP listeners without TLS: anyone who can reach them can read and
    /// write the volumes. Logged as a warning at startup and repeatedly.
    #[arg(long)]
    insecure: bool,
    /// Deprecated name of --insecure.
    #[arg(long, hide = true)]
    allow_remote: bool,
    /// Connections at once on each listener; more are closed at once [default: 256].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: Option<u64>,
    /// Connections at once of one peer (a uid on Unix sockets, an IP address on TCP) on
    /// each listener; root and the daemon's own user are exempt on Unix sockets
    /// [default: 32, room for nbd-client -C 16 while it reconnects].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections_per_peer: Option<u64>,
    /// Seconds a client may take for the whole handshake [default: 30].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    handshake_timeout: Option<u64>,
    /// Close a connection that sent no request for SECS seconds (0: never) [default: 0].
    /// Not for kernel attaches: an idle /dev/nbdN sends no request for hours.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    idle_timeout: Option<u64>,
    /// TLS on every listener: off; on (offered: clients may send NBD_OPT_STARTTLS); require
    /// (plaintext clients are refused before any export is listed) [default: off].
    #[arg(long, value_name = "off|on|require", value_parser = crate::nbd::TlsMode::parse)]
    tls: Option<crate::nbd::TlsMode>,
    /// The server's TLS certificate chain (PEM, leaf first). Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM; keep it mode 0600). Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require client certificates (mutual TLS) signed by a CA in this PEM bundle.
    /// Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Serve every volume read-only.
    #[arg(long)]
    read_only: bool,
    /// Punch holes in the backing file on TRIM. Leaks which blocks are unused
    /// (like dm-crypt's allow_discards); discarded blocks read back as garbage.
    #[arg(long)]
    discard: bool,
    /// Bytes of request payload held in memory at once, across all connections [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    max_inflight: Option<u64>,
    /// Transmission threads per connection: requests of one connection served at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Let Unix-socket clients running as USER (name or uid) open the exports of VOLUME
    /// arguments, besides the daemon's own user (repeatable; root is not implied).
    #[arg(long, value_name = "USER")]
    allow_uid: Vec<String>,
    /// Let Unix-socket clients whose primary group (from SO_PEERCRED; supplementary groups
    /// are not visible) is GROUP (name or gid) open the exports of VOLUME arguments
    /// (repeatable).
    #[arg(long, value_name = "GROUP")]
    allow_gid: Vec<String>,
    /// Let TLS clients whose verified certificate has exactly this subject (e.g.
    /// "CN=client1,O=Example") open the exports of VOLUME arguments (repeatable). Without
    /// any --allow-tls-*, every certificate the client CA verifies is allowed.
    #[arg(long, value_name = "SUBJECT")]
    allow_tls_subject: Vec<String>,
    /// Let TLS clients whose verified certificate has exactly this subject alternative
    /// name (DNS:NAME, EMAIL:ADDR, IP:ADDR or URI:URI) open the exports of VOLUME arguments
    /// (repeatable).
    #[arg(long, value_name = "SAN")]
    allow_tls_san: Vec<String>,
    /// Let every client that can connect open the exports of VOLUME arguments, with no
    /// identity check. Plaintext TCP clients have no identity and are refused without it.
    #[arg(long)]
    allow_anyone: bool,
    /// Control socket for `cryptvol status`, `reencrypt EXPORT`, `snapshot create EXPORT`
    /// (mode 0600) [default: the config file's `control`, else /run/cryptvol/control.sock
    /// when running as root, else none].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    pass: PassphraseArgs,
    /// Volumes to serve: FILE (export name = file stem) or NAME=FILE.
    #[arg(value_name = "VOLUME", required_unless_present = "config")]
    volumes: Vec<String>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a new master key in the local keystore (you may do everything with it).
    Create {
        /// An alias for the key, written alias/NAME.
        #[arg(long, value_name = "alias/NAME")]
        alias: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// List the master keys of the local keystore (never key material).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Show a local key: state, aliases, material versions, policy.
    Describe {
        /// Key id or alias/NAME.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Add, retarget or remove aliases of local keys.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Enable a disabled key.
    Enable(KeyArg),
    /// Disable a key: volumes using it can no longer be attached (attached ones keep working).
    Disable(KeyArg),
    /// Schedule the destruction of a key after a waiting period; until then it is unusable.
    ScheduleDeletion {
        /// Key id or alias/NAME.
        key: String,
        /// Waiting period in days (7 to 30).
        #[arg(long, default_value_t = crate::keys::MAX_DELETION_DAYS)]
        days: u32,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Cancel a scheduled deletion; the key is left disabled (enable it to use it).
    CancelDeletion(KeyArg),
    /// Give a key new material: new wraps use it, existing keyslots still unwrap.
    Rotate(KeyArg),
    /// Destroy the keys whose deletion waiting period has passed (serve does this at start).
    Purge {
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Allow a Unix user to use a key for some operations.
    Grant(GrantArgs),
    /// Withdraw operations from a Unix user on a key.
    Revoke(GrantArgs),
    /// Set the key used when `create` is given none (any backend), or --reset to the local
    /// default key.
    #[command(group(ArgGroup::new("what").required(true).args(["key", "reset"])))]
    SetDefault {
        /// Key reference (local id or alias, exec:NAME[:KEY]).
        key: Option<String>,
        /// Go back to the local default key (alias/cryptvol/default).
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Show the key used when `create` is given none.
    GetDefault {
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Register external programs as key backends (exec:NAME).
    #[command(subcommand)]
    Exec(ExecCommand),
}

#[derive(Args)]
struct KeyArg {
    /// Key id or alias/NAME.
    key: String,
    #[command(flatten)]
    keystore: KeystoreArgs,
}

#[derive(Args)]
struct GrantArgs {
    /// Key id or alias/NAME.
    key: String,
    /// Unix user name or uid.
    #[arg(long, value_name = "USER")]
    principal: String,
    /// Comma-separated: generate (or wrap), unwrap, rewrap, administer, all.
    #[arg(long, value_name = "LIST")]
    operations: String,
    #[command(flatten)]
    keystore: KeystoreArgs,
}

#[derive(Subcommand)]
enum AliasCommand {
    /// Create alias/NAME pointing at a key.
    Add {
        alias: String,
        /// Key id or alias/NAME.
        key: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Point an existing alias at another key (existing volumes keep their key).
    Retarget {
        alias: String,
        /// Key id or alias/NAME.
        key: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Remove an alias (the key stays).
    Remove {
        alias: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

#[derive(Subcommand)]
enum ExecCommand {
    /// Register PROGRAM (absolute path) as exec backend NAME (replaces an existing one).
    Add {
        /// Backend name, used in key references as exec:NAME[:KEY].
        name: String,
        /// Seconds the program may take per operation.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        timeout: u64,
        /// Pass environment variable NAME on to the program (repeatable). It otherwise
        /// gets only PATH, LANG, LC_ALL, LC_CTYPE, TZ and CRYPTVOL_EXEC_PROTOCOL.
        #[arg(long = "env", value_name = "NAME")]
        env: Vec<String>,
        /// The program and its fixed arguments, after `--`.
        #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]")]
        command: Vec<String>,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Unregister exec backend NAME.
    Remove {
        name: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// List registered exec backends.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

#[derive(Args)]
#[command(group(ArgGroup::new("to").required(true)))]
struct RekeyArgs {
    /// The volume file.
    file: PathBuf,
    /// The new master key (local id or alias, exec:NAME[:KEY], an AWS KMS key).
    #[arg(long, value_name = "KEY", group = "to")]
    to_key: Option<String>,
    /// Rewrap under a passphrase read from FILE.
    #[arg(long, value_name = "FILE", group = "to")]
    to_passphrase_file: Option<PathBuf>,
    /// Rewrap under a passphrase read from descriptor N.
    #[arg(long, value_name = "N", group = "to")]
    to_passphrase_fd: Option<i32>,
    /// Rewrap under a passphrase typed on the terminal (asked twice).
    #[arg(long, group = "to")]
    to_passphrase: bool,
    /// The keyslot to replace [default: the only keyslot].
    #[arg(long, value_name = "N")]
    slot: Option<usize>,
    #[command(flatten)]
    unlock: UnlockArgs,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

#[derive(Subcommand)]
enum KeyslotCommand {
    /// Add a keyslot wrapping the data key under another key or a (recovery) passphrase.
    Add(KeyslotAddArgs),
    /// Remove keyslot SLOT (never the last; unlocks through a keyslot that remains).
    Remove {
        /// The volume file.
        file: PathBuf,
        /// The keyslot number (see `cryptvol info`).
        slot: usize,
        #[command(flatten)]
        unlock: UnlockArgs,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

#[derive(Args)]
#[command(group(ArgGroup::new("new").required(true).args(["key", "passphrase_file", "passphrase_fd", "passphrase"])))]
struct KeyslotAddArgs {
    /// The volume file.
    file: PathBuf,
    /// Master key of the new keyslot (local id or alias, exec:NAME[:KEY], an AWS KMS key).
    #[arg(long, visible_alias = "kms-key-id", value_name = "KEY")]
    key: Option<String>,
    /// Passphrase of the new keyslot, read from FILE.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Passphrase of the new keyslot, read from descriptor N.
    #[arg(long, value_name = "N")]
    passphrase_fd: Option<i32>,
    /// Passphrase of the new keyslot, typed on the terminal (asked twice).
    #[arg(long)]
    passphrase: bool,
    #[command(flatten)]
    unlock: UnlockArgs,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

const IMPORT_AFTER_HELP: &str = "\
The volume is built as .FILE.partial next to FILE, with a journal .FILE.import; FILE appears
only once the copy is complete and its SHA-256 matches the source's. Zero regions (64 KiB
units, and holes of sparse files) stay unallocated. The volume's size is the source's,
rounded up to the sector size (the tail is zero padding).

An interrupted import (Ctrl-C, kill, crash) continues from its last checkpoint when the same
command is run again (at most 32 MiB is redone). A different source refuses to resume;
--restart discards the interrupted import and starts over.

Examples:
  cryptvol import disk.raw vol.img
  cryptvol import /dev/sdb vol.img --key alias/db
  qemu-nbd --read-only --persistent -k /tmp/q.sock disk.qcow2 &
  cryptvol import 'nbd+unix:///?socket=/tmp/q.sock' vol.img";

#[derive(Args)]
#[command(after_help = IMPORT_AFTER_HELP)]
struct ImportArgs {
    /// The unencrypted source: a raw image file, a block device, or an NBD URI
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
    source: String,
    /// The volume file to create (never overwritten).
    file: PathBuf,
    /// Master key to wrap the data key (as for `cryptvol create`).
    #[arg(
        long,
        visible_alias = "kms-key-id",
        value_name = "KEY",
        conflicts_with = "pass"
    )]
    key: Option<String>,
    /// Sector size of the new volume [default: 4096, or the interrupted import's].
    #[arg(long, value_name = "BYTES", value_parser = parse_sector_size)]
    sector_size: Option<u32>,
    /// Only continue an interrupted import (fail if there is none).
    #[arg(long, conflicts_with = "restart")]
    resume: bool,
    /// Discard an interrupted import into FILE and start over.
    #[arg(long)]
    restart: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    pass: PassphraseArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

#[derive(Args)]
struct ExportArgs {
    /// The volume file (must not be open for writing elsewhere).
    file: PathBuf,
    /// Where the plaintext goes: a new raw file (sparse), an existing file or block device
    /// (with --force), or an NBD URI.
    dest: String,
    /// Overwrite an existing DEST file or block device.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keystore: KeystoreArgs,
    /// Unlock a passphrase keyslot with a passphrase from FILE / descriptor N / the terminal.
    #[command(flatten)]
    pass: PassphraseArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// Scratch directory for the keystore, the volume and the socket.
    #[arg(long, value_name = "DIR", default_value = "./cryptvol-demo")]
    dir: PathBuf,
    /// Size of the demo volume.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size_arg)]
    size: u64,
    /// Also listen on this loopback TCP address (plaintext: any local account can connect
    /// to it; the Unix socket in DIR is mode 0600). E.g. 127.0.0.1:10809.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Option<String>,
}

const CHECK_AFTER_HELP: &str = "\
Prints one line per item (with --json: one JSON object per line): PATH, the verdict
COMPLIANT, NON_COMPLIANT, ERROR (could not be checked) or SKIPPED (sockets, FIFOs,
character devices, the keystore directory), and the finding codes with their reasons.
A summary goes to stderr. Finding codes are listed in docs/compliance.md.

Never needs a data key or a passphrase and never writes anything (not even the audit log);
volumes being served are checked as they are.

Exit status (for cron and CI):
  0  every item checked is compliant (skipped items do not count)
  1  at least one item is NON_COMPLIANT, and everything could be checked
  2  usage error, or something could not be checked (an unreadable file, a key that could
     not be looked up); takes precedence over 1

Examples:
  cryptvol check /var/lib/cryptvol
  cryptvol check --json --require-key alias/prod --require-rotation /srv/volumes
  cryptvol check --no-default-key --max-key-age 90 vol1.img vol2.img";

#[derive(Args)]
#[command(after_help = CHECK_AFTER_HELP)]
struct CheckArgs {
    /// Print one JSON object per item and line.
    #[arg(long)]
    json: bool,
    /// Every keyslot backed by a master key must use KEY (a local key id or alias/NAME,
    /// exec:NAME[:KEY], an AWS KMS ARN, aws-kms:ID or aws-kms:alias/NAME); aliases are
    /// resolved. Repeatable: any of the keys given is accepted.
    #[arg(long, value_name = "KEY")]
    require_key: Vec<String>,
    /// No keyslot may use a default key (the local default key alias/cryptvol/default or
    /// the key set with `cryptvol key set-default`). Implied by --require-key unless the
    /// default key is the one required.
    #[arg(long)]
    no_default_key: bool,
    /// The newest material of each local master key must be younger than DAYS days
    /// (KEY_ROTATION_OVERDUE); 0 flags every key.
    #[arg(long, value_name = "DAYS")]
    max_key_age: Option<u32>,
    /// Each local master key must be rotated every --max-key-age days (default 365): a
    /// never-rotated key past that age is KEY_ROTATION_OFF, a rotated one
    /// KEY_ROTATION_OVERDUE.
    #[arg(long)]
    require_rotation: bool,
    /// Local keystore directory (also where exec backends are registered) [default:
    /// $CRYPTVOL_KEYSTORE, else /var/lib/cryptvol/keys for root, else
    /// $XDG_DATA_HOME/cryptvol/keys]
    #[arg(long, value_name = "DIR")]
    keystore: Option<PathBuf>,
    /// Volume files, block devices and directories (scanned recursively, symbolic links
    /// followed).
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<PathBuf>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "4096" => Ok(4096),
        "512" => Ok(512),
        _ => Err(format!("sector size must be 4096 or 512, not {s}")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    config::parse_mode(s)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Every command may hold key material (a DEK, a master key, a KEK, a passphrase), so
    // all of them, not only `serve`: no core dumps, no ptrace or /proc/PID/mem access by
    // other processes of the same uid. Programs we start (exec key backends) are
    // dumpable again after their execve, as usual.
    if let Err(e) = crate::crypto::harden_process() {
        tracing::warn!("could not harden the process against core dumps: {e}");
    }
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
    match rt.block_on(run(cli, activated)) {
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

async fn run(cli: Cli, activated: Result<Vec<ActivatedSocket>, ServerError>) -> Result<()> {
    match cli.command {
        Command::Create(a) => create(a).await,
        Command::Info(a) => info(a),
        Command::Serve(a) => serve(*a, activated?).await,
        Command::Key(k) => key(k),
        Command::Rekey(a) => rekey(a).await,
        Command::Keyslot(k) => keyslot(k).await,
        Command::Demo(a) => demo(a).await,
        Command::Check(a) => check(a).await,
        Command::Snapshot(c) => snapshot_cmd(c).await,
        Command::Import(a) => import(a).await,
        Command::Export(a) => export(a).await,
        Command::Reencrypt(a) => reencrypt(a).await,
        Command::Status(a) => status(a).await,
    }
}

fn key_options(
    keystore: &KeystoreArgs,
    pass: Option<&PassphraseArgs>,
    kdf: Argon2Params,
) -> KeyOptions {
    KeyOptions {
        keystore: keystore.keystore.clone(),
        passphrase: pass.and_then(PassphraseArgs::source),
        argon2: kdf,
        audit_log: keystore.audit_log.clone(),
    }
}

async fn create(a: CreateArgs) -> Result<()> {
    if a.from_snapshot.is_some() {
        return restore(a).await;
    }
    let keys = key_options(&a.keystore, Some(&a.pass), a.kdf.params());
    let new_key = new_volume_key(a.key.as_deref(), &keys)?;
    let spec = VolumeSpec {
        size: a.size.context("--size is required")?,
        sector_size: a.sector_size,
    };
    let opts = ops::CreateOptions {
        preallocate: a.preallocate,
        progress: true,
        no_allocation_map: a.no_allocation_map,
    };
    let header = ops::create_volume_with(&a.file, &spec, new_key, &keys, &opts)
        .await
        .with_context(|| format!("cannot create {}", a.file.display()))?;
    println!(
        "created {} ({}, {}-byte sectors, uuid {}), data key wrapped by {}",
        a.file.display(),
        format_size(header.size),
        header.sector_size,
        header.uuid,
        header
            .keyslots
            .first()
            .map(slot_label)
            .unwrap_or_else(|| "?".into())
    );
    Ok(())
}

/// The key a new volume's data key is wrapped under, from `--key` and the passphrase
/// options (`create`, `import`).
fn new_volume_key<'a>(key: Option<&str>, keys: &'a KeyOptions) -> Result<NewKey<'a>> {
    Ok(match &keys.passphrase {
        Some(source) => NewKey::Passphrase(source),
        None => NewKey::parse(key)?,
    })
}

/// `local key mk-…`, `passphrase`, `exec key vault:k1`.
fn slot_label(s: &WrappedDek) -> String {
    if s.key_id.is_empty() {
        s.backend.escape_debug().to_string()
    } else {
        format!(
            "{} key {}",
            s.backend.escape_debug(),
            s.key_id.escape_debug()
        )
    }
}

fn info(a: InfoArgs) -> Result<()> {
    let i = ops::info(&a.file)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &i)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "volume:       {}", i.path)?;
    writeln!(out, "format:       cryptvol v{}", i.format_version)?;
    writeln!(out, "uuid:         {}", i.uuid)?;
    writeln!(
        out,
        "size:         {} ({} bytes)",
        format_size(i.size),
        i.size
    )?;
    writeln!(out, "sector size:  {}", i.sector_size)?;
    writeln!(
        out,
        "cipher:       {} (512-bit key, IV = sector number from data start)",
        i.cipher
    )?;
    writeln!(out, "data offset:  {}", i.data_offset)?;
    writeln!(
        out,
        "header:       primary {}, secondary {} (sequence {})",
        i.header.primary, i.header.secondary, i.sequence
    )?;
    match &i.allocation {
        Some(al) => {
            let pct = if i.size == 0 {
                0.0
            } else {
                al.allocated_bytes as f64 * 100.0 / i.size as f64
            };
            writeln!(
                out,
                "allocated:    {} ({} bytes, {pct:.1}%; {} of {} chunks of {} KiB)",
                format_size(al.allocated_bytes),
                al.allocated_bytes,
                al.allocated_chunks,
                al.chunks,
                al.chunk_size / 1024
            )?;
            writeln!(out, "alloc map:    {}", al.map)?;
        }
        None => writeln!(
            out,
            "allocated:    everything (volume made before allocation maps; not thin)"
        )?,
    }
    writeln!(out, "keyslots:")?;
    for k in &i.keyslots {
        let id = if k.key_id.is_empty() {
            String::new()
        } else {
            format!(" key {}", k.key_id)
        };
        writeln!(out, "  {}: {}{}", k.slot, k.backend, id)?;
    }
    if let Some(r) = &i.reencrypt {
        info_reencrypt(&mut out, r)?;
    }
    Ok(())
}

/// `cryptvol info`: the re-encryption in progress.
fn info_reencrypt(out: &mut impl std::io::Write, r: &ops::ReencryptionInfo) -> Result<()> {
    let pct = if r.size == 0 {
        100.0
    } else {
        r.watermark as f64 * 100.0 / r.size as f64
    };
    writeln!(
        out,
        "re-encryption: in progress, {pct:.1}% under the new data key ({} of {}, watermark {} bytes)",
        format_size(r.watermark),
        format_size(r.size),
        r.watermark
    )?;
    if let Some(z) = &r.hotzone {
        writeln!(
            out,
            "  interrupted step: bytes {}..{} (finished when the volume is next opened for writing)",
            z.offset,
            z.offset.saturating_add(z.length)
        )?;
    }
    writeln!(
        out,
        "  new keyslots (replace the keyslots when it finishes):"
    )?;
    for k in &r.new_keyslots {
        let id = if k.key_id.is_empty() {
            String::new()
        } else {
            format!(" key {}", k.key_id)
        };
        writeln!(out, "    {}: {}{}", k.slot, k.backend, id)?;
    }
    writeln!(
        out,
        "  resume: `cryptvol reencrypt FILE` (offline) or serve the volume (resumes by itself)"
    )?;
    Ok(())
}

fn key(k: KeyCommand) -> Result<()> {
    let opts = |keystore: &KeystoreArgs| key_options(keystore, None, Argon2Params::default());
    match k {
        KeyCommand::Create {
            alias,
            json,
            keystore,
        } => {
            let ks = opts(&keystore).local(true)?;
            let info = ks.create_key(alias.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "created master key {}{} in {}",
                    info.key_id,
                    aliases_suffix(&info),
                    ks.dir().display()
                );
            }
        }
        KeyCommand::List { json, keystore } => {
            let ks = opts(&keystore).local(false)?;
            let list = ks.list_keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no master keys in {}", ks.dir().display());
            } else {
                println!("{:<36} {:<16} {:<21} ALIASES", "KEY ID", "STATE", "CREATED");
                for k in &list {
                    let mut aliases = k.aliases.join(",");
                    if k.default {
                        aliases.push_str(" (local default)");
                    }
                    println!(
                        "{:<36} {:<16} {:<21} {}",
                        k.key_id,
                        state_label(&k.state),
                        k.created_at,
                        aliases
                    );
                }
            }
        }
        KeyCommand::Describe {
            key,
            json,
            keystore,
        } => {
            let ks = local_admin(&keystore, &key)?;
            let d = ks.describe(&key)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "key id:     {}", d.key_id)?;
                writeln!(out, "state:      {}", state_label(&d.state))?;
                if let Some(date) = &d.deletion_date {
                    writeln!(out, "deletion:   {date} (the material is destroyed then)")?;
                }
                writeln!(out, "aliases:    {}", d.aliases.join(", "))?;
                writeln!(out, "created:    {} by {}", d.created_at, d.creator)?;
                writeln!(
                    out,
                    "material:   version {} (of {}; older versions still unwrap)",
                    d.current_material_version,
                    d.material_versions.len()
                )?;
                writeln!(out, "policy:     (root may always do everything)")?;
                for (op, who) in &d.policy {
                    writeln!(out, "  {op:<11} {}", who.join(", "))?;
                }
            }
        }
        KeyCommand::Alias(a) => match a {
            AliasCommand::Add {
                alias,
                key,
                keystore,
            } => {
                let id = local_admin(&keystore, &key)?.alias_add(&alias, &key)?;
                println!("alias {alias} now names key {id}");
            }
            AliasCommand::Retarget {
                alias,
                key,
                keystore,
            } => {
                let id = local_admin(&keystore, &key)?.alias_retarget(&alias, &key)?;
                println!("alias {alias} now names key {id} (existing volumes keep the key they were wrapped with)");
            }
            AliasCommand::Remove { alias, keystore } => {
                let id = opts(&keystore).local(false)?.alias_remove(&alias)?;
                println!("removed alias {alias} (it named key {id})");
            }
        },
        KeyCommand::Enable(a) => {
            let id = local_admin(&a.keystore, &a.key)?.enable(&a.key)?;
            println!("key {id} is enabled");
        }
        KeyCommand::Disable(a) => {
            let id = local_admin(&a.keystore, &a.key)?.disable(&a.key)?;
            println!(
                "key {id} is disabled: volumes wrapped by it cannot be attached until it is \
                    enabled again (volumes already being served keep working)"
            );
        }
        KeyCommand::ScheduleDeletion {
            key,
            days,
            keystore,
        } => {
            let date = local_admin(&keystore, &key)?.schedule_deletion(&key, days)?;
            println!(
                "key {key} is pending deletion: its material is destroyed after {date} (by \
                    `cryptvol key purge` or the next `cryptvol serve` start); until then \
                    `cryptvol key cancel-deletion {key}` keeps it. Volumes wrapped only by this key \
                    become unreadable: rekey them first (cryptvol rekey FILE --to-key KEY)."
            );
        }
        KeyCommand::CancelDeletion(a) => {
            let id = local_admin(&a.keystore, &a.key)?.cancel_deletion(&a.key)?;
            println!("deletion of key {id} cancelled; the key is disabled: `cryptvol key enable {id}` to use it");
        }
        KeyCommand::Rotate(a) => {
            let v = local_admin(&a.keystore, &a.key)?.rotate(&a.key)?;
            println!(
                "key {} has new material (version {v}); new wraps use it, existing keyslots still unwrap",
                a.key
            );
        }
        KeyCommand::Purge { keystore } => {
            let deleted = ops::purge_expired_keys(&opts(&keystore))?;
            if deleted.is_empty() {
                println!("no key is due for deletion");
            }
            for id in deleted {
                println!("destroyed key {id}");
            }
        }
        KeyCommand::Grant(g) => {
            let (ks, who, perms) = grant_parts(&g)?;
            let id = ks.grant(&g.key, &who, &perms)?;
            println!("{who} may now use key {id} for {}", perm_list(&perms));
        }
        KeyCommand::Revoke(g) => {
            let (ks, who, perms) = grant_parts(&g)?;
            let id = ks.revoke(&g.key, &who, &perms)?;
            println!("{who} may no longer use key {id} for {}", perm_list(&perms));
        }
        KeyCommand::SetDefault {
            key,
            reset,
            keystore,
        } => {
            let svc = opts(&keystore).service();
            let reference = match (&key, reset) {
                (Some(k), false) => Some(KeyRef::parse(k)?),
                _ => None,
            };
            svc.set_default_key(reference.as_ref())?;
            match reference {
                Some(r) => println!("new volumes are wrapped by {r} unless --key is given"),
                None => println!(
                    "new volumes are wrapped by the local default key ({}) unless --key is given",
                    crate::keys::DEFAULT_KEY_ALIAS
                ),
            }
        }
        KeyCommand::GetDefault { keystore } => {
            let svc = opts(&keystore).service();
            match svc.default_key()? {
                KeyRef::Local(None) => println!(
                    "{} (the local default key, created on first use)",
                    crate::keys::DEFAULT_KEY_ALIAS
                ),
                r => println!("{r}"),
            }
        }
        KeyCommand::Exec(e) => match e {
            ExecCommand::Add {
                name,
                timeout,
                env,
                command,
                keystore,
            } => {
                let (program, args) = command
                    .split_first()
                    .ok_or_else(|| anyhow::anyhow!("give the program after --"))?;
                let spec = ExecSpec {
                    program: PathBuf::from(program),
                    args: args.to_vec(),
                    timeout_secs: timeout,
                    env,
                };
                opts(&keystore).local(true)?.exec_add(&name, spec)?;
                println!("registered exec backend {name}: use it as --key exec:{name}[:KEY]");
            }
            ExecCommand::Remove { name, keystore } => {
                opts(&keystore).local(false)?.exec_remove(&name)?;
                println!("unregistered exec backend {name}");
            }
            ExecCommand::List { json, keystore } => {
                let list = opts(&keystore).local(false)?.exec_backends()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else if list.is_empty() {
                    println!("no exec backends registered");
                } else {
                    for (name, spec) in &list {
                        let env = if spec.env.is_empty() {
                            String::new()
                        } else {
                            format!(", environment {}", spec.env.join(" "))
                        };
                        println!(
                            "{name}: {} {} (timeout {} s{env})",
                            spec.program.display(),
                            spec.args.join(" "),
                            spec.timeout_secs
                        );
                    }
                }
            }
        },
    }
    Ok(())
}

fn state_label(s: &KeyState) -> &'static str {
    match s {
        KeyState::Enabled => "Enabled",
        KeyState::Disabled => "Disabled",
        KeyState::PendingDeletion => "PendingDeletion",
    }
}

/// Opens the keystore for an administrative command on a local key reference.
fn local_admin(keystore: &KeystoreArgs, key: &str) -> Result<LocalKeystore> {
    match KeyRef::parse(key)? {
        KeyRef::Local(_) => {}
        other => {
            return Err(KeyError::Unsupported(format!(
                "`cryptvol key` manages local keys; {other} belongs to the {} backend, which \
                 manages its keys itself",
                other.backend()
            ))
            .into())
        }
    }
    Ok(key_options(keystore, None, Argon2Params::default()).local(false)?)
}

fn grant_parts(g: &GrantArgs) -> Result<(LocalKeystore, Principal, Vec<Permission>)> {
    let ks = local_admin(&g.keystore, &g.key)?;
    let who = Principal::parse(&g.principal)?;
    let perms = Permission::parse_list(&g.operations)?;
    Ok((ks, who, perms))
}

fn perm_list(perms: &[Permission]) -> String {
    perms
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn rekey(a: RekeyArgs) -> Result<()> {
    let mut keys = key_options(&a.keystore, None, a.kdf.params());
    keys.passphrase = a.unlock.source();
    let to_pass = passphrase_source(&a.to_passphrase_file, a.to_passphrase_fd, a.to_passphrase);
    let target = match (&a.to_key, &to_pass) {
        (Some(k), _) => NewKey::Key(KeyRef::parse(k)?),
        (None, Some(source)) => NewKey::Passphrase(source),
        (None, None) => anyhow::bail!(
            "say which key to rewrap under: --to-key KEY or --to-passphrase-file FILE"
        ),
    };
    let change = ops::rekey(&a.file, &keys, target, a.slot)
        .await
        .with_context(|| format!("cannot rekey {}", a.file.display()))?;
    print_change("rekeyed", &a.file, &change);
    Ok(())
}

async fn keyslot(k: KeyslotCommand) -> Result<()> {
    match k {
        KeyslotCommand::Add(a) => {
            let mut keys = key_options(&a.keystore, None, a.kdf.params());
            keys.passphrase = a.unlock.source();
            let new_pass = passphrase_source(&a.passphrase_file, a.passphrase_fd, a.passphrase);
            let target = match (&a.key, &new_pass) {
                (Some(k), _) => NewKey::Key(KeyRef::parse(k)?),
                (None, Some(source)) => NewKey::Passphrase(source),
                (None, None) => anyhow::bail!(
                    "say what the new keyslot uses: --key KEY or --passphrase-file FILE"
                ),
            };
            let change = ops::keyslot_add(&a.file, &keys, target)
                .await
                .with_context(|| format!("cannot add a keyslot to {}", a.file.display()))?;
            print_change("added keyslot to", &a.file, &change);
        }
        KeyslotCommand::Remove {
            file,
            slot,
            unlock,
            keystore,
        } => {
            let mut keys = key_options(&keystore, None, Argon2Params::default());
            keys.passphrase = unlock.source();
            let change = ops::keyslot_remove(&file, &keys, slot)
                .await
                .with_context(|| format!("cannot remove keyslot {slot} of {}", file.display()))?;
            print_change("removed keyslot from", &file, &change);
        }
    }
    Ok(())
}

fn print_change(what: &str, file: &Path, c: &KeyslotChange) {
    let now = c
        .header
        .keyslots
        .get(c.slot)
        .map(slot_label)
        .unwrap_or_else(|| "(removed)".into());
    let was = c
        .old
        .as_ref()
        .map(|o| format!(" (was {})", slot_label(o)))
        .unwrap_or_default();
    let slots: Vec<String> = c
        .header
        .keyslots
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{i}: {}", slot_label(s)))
        .collect();
    if c.old.is_some() && what.starts_with("removed") {
        println!("{what} {}: keyslot {}{was}", file.display(), c.slot);
    } else {
        println!(
            "{what} {}: keyslot {} is {now}{was}",
            file.display(),
            c.slot
        );
    }
    println!("keyslots now: {}", slots.join("; "));
}

fn aliases_suffix(k: &KeyInfo) -> String {
    if k.aliases.is_empty() {
        String::new()
    } else {
        format!(" ({})", k.aliases.join(", "))
    }
}

async fn serve(a: ServeArgs, activated: Vec<ActivatedSocket>) -> Result<()> {
    let file = match &a.config {
        Some(path) => Some((path.as_path(), config::load(path)?)),
        None => None,
    };
    match server::raise_nofile_limit() {
        Ok(n) => tracing::debug!("open file limit: {n}"),
        Err(e) => tracing::warn!("cannot raise the open file limit: {e}"),
    }
    if a.allow_remote {
        tracing::warn!("--allow-remote is deprecated: use --insecure (same meaning)");
    }
    let overrides = CliOverrides {
        tcp: a.tcp.clone(),
        unix: a.unix.clone(),
        socket_mode: a.socket_mode,
        insecure: a.insecure || a.allow_remote,
        default_unix: config::default_unix_socket(
            nix::unistd::geteuid().is_root(),
            std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        ),
        max_connections: a.max_connections,
        max_connections_per_peer: a.max_connections_per_peer,
        handshake_timeout: a.handshake_timeout,
        idle_timeout: a.idle_timeout,
        read_only: a.read_only,
        discard: a.discard,
        max_inflight: a.max_inflight,
        keystore: a.keystore.keystore.clone(),
        audit_log: a.keystore.audit_log.clone(),
        passphrase: a.pass.source(),
        volumes: a.volumes.clone(),
        control: a.control.clone(),
        allow: config::AllowFlags {
            uid: a.allow_uid.clone(),
            gid: a.allow_gid.clone(),
            tls_subject: a.allow_tls_subject.clone(),
            tls_san: a.allow_tls_san.clone(),
            anyone: a.allow_anyone,
        },
        tls: a.tls,
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        tls_client_ca: a.tls_client_ca.clone(),
    };
    let settings = config::resolve(file, overrides)?;
    if settings.deprecated_allow_remote {
        tracing::warn!("allow_remote in the config file is deprecated: write insecure = true");
    }
    // Certificate problems are reported before any volume is unlocked.
    let tls = match settings.tls {
        Some(t) => {
            let setup = server::TlsSetup::load(t.mode, t.files).context("cannot set up TLS")?;
            tracing::info!("{}", setup.describe());
            Some(std::sync::Arc::new(setup))
        }
        None => None,
    };
    let keys = KeyOptions {
        keystore: settings.keystore,
        passphrase: settings.passphrase,
        argon2: Argon2Params::default(),
        audit_log: settings.audit_log,
    };
    // Keys whose deletion waiting period has passed are destroyed now (as KMS does on its
    // own schedule). A daemon that may not change the keystore only warns.
    match ops::purge_expired_keys(&keys) {
        Ok(deleted) => {
            for id in deleted {
                tracing::info!(key = %id, "destroyed master key: its deletion waiting period has passed");
            }
        }
        Err(e) => tracing::warn!("cannot destroy keys whose deletion is due: {e}"),
    }
    // Register inherited sockets first: a refused one should fail before any unlock.
    let mut inherited = Vec::new();
    for s in activated {
        let desc = s.describe();
        inherited.push(s.into_listener(settings.allow_remote)?);
        tracing::info!("socket activation: using {desc}");
    }
    let exports = open_exports(&settings.exports, &keys).await?;
    if inherited.is_empty() {
        if let Some((dir, mode)) = &settings.default_socket_dir {
            make_socket_dir(dir, *mode)?;
        }
    }
    // A control socket given explicitly must be opened; the implicit default (root) is
    // skipped with a warning when another daemon owns it or it cannot be made.
    let explicit = settings.control.is_some();
    let control_socket = match server::control::control_path(settings.control.clone()) {
        Some(path) => match ControlSocket::bind(&path).await {
            Ok(s) => Some(s),
            Err(e) if !explicit => {
                tracing::warn!(
                    "running without a control socket: the default {} cannot be used ({e}); \
                     give --control PATH to choose one",
                    path.display()
                );
                None
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot open the control socket {}", path.display())))
            }
        },
        None => None,
    };
    let control = server::Control {
        socket: control_socket,
        hooks: ControlHooks {
            keys: Some(std::sync::Arc::new(DaemonKeys {
                keys: KeyOptions {
                    keystore: keys.keystore.clone(),
                    passphrase: None,
                    argon2: keys.argon2,
                    audit_log: keys.audit_log.clone(),
                },
            })),
            snapshots: Some(std::sync::Arc::new(DaemonSnapshots)),
        },
    };
    let listeners = if inherited.is_empty() {
        match bind_all(&settings.listeners).await {
            Ok(l) => l,
            Err(e) => {
                if let Some(s) = &control.socket {
                    let _ = std::fs::remove_file(s.path());
                }
                return Err(e);
            }
        }
    } else {
        if !settings.listeners.is_empty() {
            tracing::info!(
                "socket activation: configured listeners are not opened (systemd passed {} socket(s))",
                inherited.len()
            );
        }
        inherited
    };
    let lim = settings.limits;
    let config = ServerConfig {
        max_inflight_bytes: usize::try_from(settings.max_inflight).unwrap_or(usize::MAX),
        threads_per_connection: usize::from(a.threads),
        max_connections: usize::try_from(lim.max_connections).unwrap_or(usize::MAX),
        max_connections_per_peer: usize::try_from(lim.max_connections_per_peer)
            .unwrap_or(usize::MAX),
        handshake_timeout: std::time::Duration::from_secs(lim.handshake_timeout_secs),
        idle_timeout: (lim.idle_timeout_secs > 0)
            .then(|| std::time::Duration::from_secs(lim.idle_timeout_secs)),
        insecure_tcp: settings.insecure,
        audit_log: Some(keys.service().audit_log().clone()),
        tls,
    };
    run_server(exports, listeners, config, control).await
}

/// Creates the directory of the default Unix socket with `mode` if it does not exist, and
/// refuses anything there that is not a directory (a symlink is not followed).
fn make_socket_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
            "cannot create {} for the default Unix socket; pass --unix PATH to listen elsewhere",
            dir.display()
        )))
        }
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!(
            "{} is not a directory: cannot put the default Unix socket there; pass --unix PATH",
            dir.display()
        );
    }
    Ok(())
}

async fn open_exports(specs: &[ExportSpec], keys: &KeyOptions) -> Result<Exports> {
    let mut exports: Vec<Export> = Vec::new();
    for spec in specs {
        let (name, path, opts) = (&spec.name, &spec.path, spec.options);
        let (vol, header, _) = ops::unlock(path, keys, opts)
            .await
            .with_context(|| format!("cannot open volume {} (export {name:?})", path.display()))?;
        vol.enable_change_tracking().with_context(|| {
            format!("cannot start changed-chunk tracking for {}", path.display())
        })?;
        tracing::info!(
            export = %name,
            path = %path.display(),
            uuid = %header.uuid,
            size = header.size,
            sector_size = header.sector_size,
            read_only = opts.read_only,
            access = %access_summary(&spec.access),
            "export opened"
        );
        exports.push(Export::new(name.clone(), vol).with_policy(spec.access.clone()));
    }
    Ok(Exports::new(exports))
}

/// Who may open an export, for the start-up log.
fn access_summary(p: &server::AccessPolicy) -> String {
    if p.allow_anyone {
        return "anyone who can connect".to_string();
    }
    let mut parts = vec!["the daemon's uid".to_string()];
    let list = |v: &[String]| v.join(" ");
    let nums = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    if !p.allow_uid.is_empty() {
        parts.push(format!("uid {}", nums(&p.allow_uid)));
    }
    if !p.allow_gid.is_empty() {
        parts.push(format!("gid {}", nums(&p.allow_gid)));
    }
    if !p.allow_tls_subject.is_empty() {
        parts.push(format!("TLS subject {}", list(&p.allow_tls_subject)));
    }
    if !p.allow_tls_san.is_empty() {
        parts.push(format!("TLS SAN {}", list(&p.allow_tls_san)));
    }
    if p.allow_tls_subject.is_empty() && p.allow_tls_san.is_empty() {
        parts.push("any verified TLS client certificate".to_string());
    }
    parts.join(", ")
}

async fn bind_all(specs: &[ListenerSpec]) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for s in specs {
        listeners.push(Listener::bind(s).await?);
    }
    Ok(listeners)
}

/// Serves until SIGTERM/SIGINT. Every volume is unlocked and every listener is open here,
/// so this is where systemd learns that the service is ready.
async fn run_server(
    exports: Exports,
    listeners: Vec<Listener>,
    config: ServerConfig,
    control: server::Control,
) -> Result<()> {
    for l in &listeners {
        tracing::info!("listening on {}", l.describe());
    }
    let n = exports.iter().count();
    systemd::notify_ready(&format!(
        "serving {n} export{}",
        if n == 1 { "" } else { "s" }
    ));
    tokio::spawn(reload_on_sighup(config.tls.clone()));
    let shutdown = server::shutdown_handle();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        systemd::notify_stopping();
        sd.shutdown();
    });
    server::serve_with(exports, listeners, config, shutdown, control).await?;
    tracing::info!("stopped; all volumes flushed");
    Ok(())
}

/// On each SIGHUP, re-reads the TLS certificate, key and client CA files (see
/// `server::reload_tls`; a failure keeps the old ones). Without TLS there is nothing to
/// reload, but SIGHUP (`systemctl reload`) must still not end the daemon.
async fn reload_on_sighup(tls: Option<std::sync::Arc<server::TlsSetup>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP, TLS certificates will not be reloaded: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: nothing to reload (TLS is not configured)");
            continue;
        };
        tracing::info!("SIGHUP: reloading TLS certificates");
        let t = tls.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || server::reload_tls(&t)).await {
            tracing::error!("TLS reload task failed: {e}");
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn demo(a: DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let keystore = dir.join("keys");
    let vol = dir.join("demo.img");
    let sock = dir.join("cryptvol.sock");
    let keys = KeyOptions {
        keystore: Some(keystore.clone()),
        passphrase: None,
        argon2: Argon2Params::default(),
        audit_log: None,
    };
    if !vol.exists() {
        let spec = VolumeSpec {
            size: a.size,
            sector_size: DEFAULT_SECTOR_SIZE,
        };
        ops::create_volume(&vol, &spec, NewKey::Key(KeyRef::Local(None)), &keys).await?;
    }
    let mut specs = vec![ListenerSpec::Unix {
        path: sock.clone(),
        mode: 0o600,
    }];
    if let Some(tcp) = &a.tcp {
        specs.push(ListenerSpec::Tcp {
            addr: config::parse_tcp(tcp).map_err(anyhow::Error::msg)?,
            allow_remote: false,
        });
    }
    print_demo_help(&dir, &keystore, &vol, &sock, a.tcp.as_deref());
    let export = ExportSpec {
        name: "demo".to_string(),
        path: vol.clone(),
        options: OpenOptions::default(),
        // The demo's user, and root for the kernel client (`sudo nbd-client`); root can
        // read this user's keystore anyway. `--tcp` asks for a plaintext loopback listener:
        // its clients have no identity, so they are let in only because it was asked for.
        access: server::AccessPolicy {
            allow_uid: vec![0],
            allow_anyone: a.tcp.is_some(),
            ..server::AccessPolicy::default()
        },
    };
    let exports = open_exports(&[export], &keys).await?;
    let listeners = bind_all(&specs).await?;
    let config = ServerConfig {
        audit_log: Some(keys.service().audit_log().clone()),
        ..ServerConfig::default()
    };
    run_server(exports, listeners, config, server::Control::default()).await
}

fn print_demo_help(dir: &Path, keystore: &Path, vol: &Path, sock: &Path, tcp: Option<&str>) {
    let tcp_line = match tcp {
        Some(t) => {
            let (host, port) = t.rsplit_once(':').unwrap_or((t, "10809"));
            format!("\n  # over TCP too (plaintext; every local account may use it):\n  nbdinfo 'nbd://{host}:{port}/demo'")
        }
        None => String::new(),
    };
    println!(
        "\
cryptvol demo: serving {vol} as export \"demo\"
  keystore (holds the master key; without it the volume is unreadable): {keystore}

Use it from another terminal:
  nbdinfo 'nbd+unix:///demo?socket={sock}'
  qemu-img info 'nbd+unix:///demo?socket={sock}'
  qemu-img convert -n -O raw some-disk.raw 'nbd+unix:///demo?socket={sock}'
  # a real filesystem through FUSE and a loop device (no nbd kernel module needed):
  mkdir -p {dir}/fuse && nbdfuse {dir}/fuse/disk 'nbd+unix:///demo?socket={sock}' &
  sudo losetup -f --show --sector-size 4096 {dir}/fuse/disk   # then mkfs.ext4 / mount the printed /dev/loopN
  # on a host with the nbd kernel module:
  sudo modprobe nbd && sudo nbd-client -u {sock} /dev/nbd0 -N demo -b 4096{tcp_line}

Stop with Ctrl-C (in-flight requests finish and the volume is flushed).",
        vol = vol.display(),
        keystore = keystore.display(),
        sock = sock.display(),
        dir = dir.display(),
    );
    let _ = std::io::stdout().flush();
}

/// A non-zero exit status `check` chose (its output has been printed already).
#[derive(Debug)]
struct CheckStatus(u8);

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for CheckStatus {}

async fn check(a: CheckArgs) -> Result<()> {
    let opts = CheckOptions {
        keystore_dir: a
            .keystore
            .clone()
            .unwrap_or_else(crate::keys::default_keystore_dir),
        require_keys: a.require_key.clone(),
        no_default_key: a.no_default_key,
        max_key_age_days: a.max_key_age,
        require_rotation: a.require_rotation,
    };
    let mut scanner = Scanner::new(&opts).await?;
    let mut write_err = None;
    let summary = {
        let mut out = std::io::stdout().lock();
        let mut emit = |r: &ItemReport| {
            let res = if a.json {
                serde_json::to_writer(&mut out, r)
                    .map_err(std::io::Error::from)
                    .and_then(|()| writeln!(out))
            } else {
                writeln!(out, "{}", check_line(r))
            };
            if let Err(e) = res.and_then(|()| out.flush()) {
                write_err.get_or_insert(e);
            }
        };
        scanner.scan(&a.paths, &mut emit).await
    };
    if let Some(e) = write_err {
        return Err(anyhow::Error::new(e).context("cannot write the report"));
    }
    eprintln!(
        "cryptvol check: {} item(s): {} compliant, {} non-compliant, {} error(s), {} skipped",
        summary.total(),
        summary.compliant,
        summary.non_compliant,
        summary.errors,
        summary.skipped
    );
    match summary.exit_code() {
        0 => Ok(()),
        code => Err(CheckStatus(code).into()),
    }
}

/// Control characters (from file names or headers) shown escaped, so one item stays on
/// one line.
fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// `PATH: VERDICT (details) [CODE: message; ...]`.
fn check_line(r: &ItemReport) -> String {
    let mut line = format!("{}: {}", r.path, r.verdict.as_str());
    if r.verdict == Verdict::Compliant {
        let keys: Vec<String> = r
            .keyslots
            .iter()
            .map(|k| {
                if k.key_id.is_empty() {
                    k.backend.clone()
                } else {
                    format!("{} {}", k.backend, k.key_id)
                }
            })
            .collect();
        line.push_str(&format!(
            " (volume {}, keys: {})",
            r.volume_uuid.as_deref().unwrap_or("?"),
            keys.join(", ")
        ));
    }
    for f in r.reasons.iter().chain(&r.notes) {
        line.push_str(&format!(" [{}: {}]", f.code.as_str(), f.message));
    }
    one_line(&line)
}

// ---------------------------------------------------------------------------------------
// Snapshots.

const SNAPSHOT_AFTER_HELP: &str = "\
Stores: file:///DIR or a plain directory path (default: $CRYPTVOL_SNAPSHOT_STORE, else
/var/lib/cryptvol/snapshots for root, else $XDG_DATA_HOME/cryptvol/snapshots), or
s3://BUCKET/PREFIX with the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL[_S3]; http:// endpoints only on
loopback). Chunks are stored encrypted under the volume's data key; see README, Snapshots.

Examples:
  cryptvol snapshot create vol.img --store /backup/snaps --description nightly
  cryptvol snapshot list --store /backup/snaps --volume vol.img
  cryptvol create --from-snapshot snap-0123456789abcdef0 --store /backup/snaps restored.img
  cryptvol snapshot copy snap-0123456789abcdef0 --store /backup/snaps --to-store s3://b/p --key alias/dr";

#[derive(Args, Clone)]
struct StoreArg {
    /// Snapshot store: file:///DIR, DIR, or s3://BUCKET/PREFIX [default: see below].
    #[arg(long, value_name = "STORE", env = "CRYPTVOL_SNAPSHOT_STORE")]
    store: Option<String>,
}

impl StoreArg {
    fn open(&self, create: bool) -> Result<crate::snapshot::Store> {
        let spec = self
            .store
            .clone()
            .unwrap_or_else(crate::snapshot::default_store);
        Ok(crate::snapshot::Store::open(&spec, create)?)
    }
}

#[derive(Subcommand)]
#[command(after_help = SNAPSHOT_AFTER_HELP)]
enum SnapshotCommand {
    /// Snapshot a volume: a file that is not being served is read directly; a served
    /// export is snapshotted through its daemon (crash-consistent: the daemon flushes and
    /// keeps serving writes, preserving old contents until they are copied).
    /// Incremental: chunks the store already holds are not uploaded.
    #[command(after_help = SNAPSHOT_AFTER_HELP)]
    Create {
        /// The volume file, or the name of an export served by the daemon at --control.
        #[arg(value_name = "FILE|EXPORT")]
        file: PathBuf,
        #[command(flatten)]
        control: ControlArg,
        #[command(flatten)]
        store: StoreArg,
        /// A free-text description stored in the manifest.
        #[arg(long, value_name = "TEXT", default_value = "")]
        description: String,
        /// Parent snapshot [default: the newest snapshot of this volume in the store;
        /// "none" for none].
        #[arg(long, value_name = "ID")]
        parent: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
        #[command(flatten)]
        pass: PassphraseArgs,
    },
    /// List the snapshots of a store (no key needed).
    #[command(after_help = SNAPSHOT_AFTER_HELP)]
    List {
        #[command(flatten)]
        store: StoreArg,
        /// Only snapshots of this volume: its UUID, or a volume file.
        #[arg(long, value_name = "UUID|FILE")]
        volume: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot (no key needed).
    Describe {
        id: String,
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot: its manifest, then the chunks no other snapshot uses.
    Delete {
        id: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Delete chunks no snapshot references (left by interrupted snapshots). Do not run it
    /// while a snapshot is being created or copied into the same store.
    Gc {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Copy a snapshot to another store, as it is or re-encrypted under another key.
    #[command(after_help = SNAPSHOT_AFTER_HELP)]
    Copy {
        id: String,
        #[command(flatten)]
        store: StoreArg,
        /// The destination store.
        #[arg(long, value_name = "STORE")]
        to_store: String,
        /// Re-encrypt under a new data key wrapped by this master key (a key other than the
        /// snapshot's); without it the snapshot is copied as it is (no key needed).
        #[arg(
            long,
            visible_alias = "kms-key-id",
            value_name = "KEY",
            conflicts_with = "pass"
        )]
        key: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
        #[command(flatten)]
        pass: PassphraseArgs,
        #[command(flatten)]
        kdf: KdfArgs,
    },
}

/// Runs `fut`, or stops at Ctrl-C (dropping it: partial work is cleaned up by its
/// destructors or left invisible and reused by the next run).
async fn interruptible<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = fut => r,
        _ = tokio::signal::ctrl_c() => {
            anyhow::bail!("{what} interrupted; nothing half-made is visible (run it again to resume: chunks already stored are reused)")
        }
    }
}

fn snapshot_id(s: &str) -> Result<crate::snapshot::SnapshotId> {
    Ok(crate::snapshot::SnapshotId::parse(s)?)
}

async fn restore(a: CreateArgs) -> Result<()> {
    let id = snapshot_id(a.from_snapshot.as_deref().unwrap_or_default())?;
    let store = StoreArg {
        store: a.store.clone(),
    }
    .open(false)?;
    let keys = key_options(&a.keystore, Some(&a.pass), a.kdf.params());
    let target = match (&keys.passphrase, &a.key) {
        (Some(source), _) => Some(NewKey::Passphrase(source)),
        (None, Some(k)) => Some(NewKey::Key(KeyRef::parse(k)?)),
        (None, None) => None,
    };
    let out = interruptible("restore", async {
        ops::restore_snapshot(&store, &id, &a.file, &keys, target)
            .await
            .with_context(|| format!("cannot restore {} from snapshot {id}", a.file.display()))
    })
    .await?;
    if out.header.sector_size != a.sector_size && a.sector_size != DEFAULT_SECTOR_SIZE {
        tracing::warn!(
            "--sector-size {} ignored: the volume has the snapshot's sector size {}",
            a.sector_size,
            out.header.sector_size
        );
    }
    println!(
        "created {} from snapshot {id} ({}, {}-byte sectors, uuid {}, {} of {} chunks with data), re-encrypted under a new data key, data key wrapped by {}",
        a.file.display(),
        format_size(out.header.size),
        out.header.sector_size,
        out.header.uuid,
        out.stats.data_chunks,
        out.stats.chunks,
        out.header
            .keyslots
            .first()
            .map(slot_label)
            .unwrap_or_else(|| "?".into())
    );
    Ok(())
}

/// What `snapshot list/describe` show (no key material; keyslots without their blobs).
#[derive(serde::Serialize)]
struct SnapshotView {
    id: String,
    volume_uuid: String,
    volume_size: u64,
    sector_size: u32,
    chunk_size: u32,
    chunks: u64,
    data_chunks: u64,
    stored_bytes: u64,
    parent: Option<String>,
    created_at: String,
    description: String,
    encryption_context: std::collections::BTreeMap<String, String>,
    keyslots: Vec<ops::KeyslotInfo>,
}

fn snapshot_view(m: &crate::snapshot::Manifest) -> SnapshotView {
    SnapshotView {
        id: m.id.to_string(),
        volume_uuid: m.volume_uuid.to_string(),
        volume_size: m.volume_size,
        sector_size: m.sector_size,
        chunk_size: m.chunk_size,
        chunks: m.chunk_count(),
        data_chunks: m.chunks.len() as u64,
        stored_bytes: m.chunks.keys().map(|&i| m.chunk_len(i) as u64).sum(),
        parent: m.parent.as_ref().map(|p| p.to_string()),
        created_at: m.created_at.clone(),
        description: m.description.clone(),
        encryption_context: m.encryption_context.0.clone(),
        keyslots: m
            .keyslots
            .iter()
            .enumerate()
            .map(|(slot, k)| ops::KeyslotInfo {
                slot,
                backend: k.backend.clone(),
                key_id: k.key_id.clone(),
                encryption_context: k.context.0.clone(),
            })
            .collect(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

async fn snapshot_cmd(c: SnapshotCommand) -> Result<()> {
    use crate::snapshot::{self as snap, CreateOptions, Parent};
    match c {
        SnapshotCommand::Create {
            file,
            control,
            store,
            description,
            parent,
            json,
            keystore,
            pass,
        } => {
            if control.control.is_some() || !file.is_file() {
                let export = file.to_string_lossy().into_owned();
                let spec = store
                    .store
                    .clone()
                    .unwrap_or_else(crate::snapshot::default_store);
                let parent = parent.filter(|p| p != "auto");
                return snapshot_create_online(
                    &control.path(),
                    &export,
                    &spec,
                    &description,
                    parent.as_deref(),
                    json,
                )
                .await;
            }
            let store = store.open(true)?;
            let keys = key_options(&keystore, Some(&pass), Argon2Params::default());
            let parent = match parent.as_deref() {
                None => Parent::Auto,
                Some("none") => Parent::None,
                Some(p) => Parent::Id(snapshot_id(p)?),
            };
            let opts = CreateOptions {
                parent,
                changed: None,
                description,
            };
            let st = interruptible("snapshot", async {
                ops::snapshot_create(&file, &keys, &store, &opts)
                    .await
                    .with_context(|| format!("cannot snapshot {}", file.display()))
            })
            .await?;
            if json {
                return print_json(&st);
            }
            println!(
                "snapshot {} of {} in {}: {} chunks, {} with data, {} uploaded ({}){}",
                st.id,
                file.display(),
                store.url(),
                st.chunks,
                st.data_chunks,
                st.uploaded,
                format_size(st.uploaded_bytes),
                match &st.parent {
                    Some(p) => format!(", incremental to {p}"),
                    None => String::new(),
                }
            );
            Ok(())
        }
        SnapshotCommand::List {
            store,
            volume,
            json,
        } => {
            let store = store.open(false)?;
            let filter = match volume.as_deref() {
                None => None,
                Some(v) => Some(match uuid::Uuid::try_parse(v) {
                    Ok(u) => u,
                    Err(_) => ops::info(Path::new(v))
                        .with_context(|| format!("--volume {v}: not a UUID nor a readable volume"))?
                        .uuid
                        .parse()?,
                }),
            };
            let all = snap::list_snapshots(&store).await?;
            let views: Vec<SnapshotView> = all
                .iter()
                .filter(|m| filter.is_none_or(|u| m.volume_uuid == u))
                .map(snapshot_view)
                .collect();
            if json {
                return print_json(&views);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<22}  {:<27}  {:<36}  {:>9}  {:>9}  {:<22}  DESCRIPTION",
                "ID", "CREATED", "VOLUME", "SIZE", "STORED", "PARENT"
            )?;
            for v in &views {
                writeln!(
                    out,
                    "{:<22}  {:<27}  {:<36}  {:>9}  {:>9}  {:<22}  {}",
                    v.id,
                    v.created_at,
                    v.volume_uuid,
                    format_size(v.volume_size),
                    format_size(v.stored_bytes),
                    v.parent.as_deref().unwrap_or("-"),
                    v.description.escape_debug()
                )?;
            }
            Ok(())
        }
        SnapshotCommand::Describe { id, store, json } => {
            let store = store.open(false)?;
            let m = snap::restore::load_manifest(&store, &snapshot_id(&id)?).await?;
            let v = snapshot_view(&m);
            if json {
                return print_json(&v);
            }
            let mut out = std::io::stdout().lock();
            writeln!(out, "snapshot:     {}", v.id)?;
            writeln!(out, "store:        {}", store.url())?;
            writeln!(out, "created:      {}", v.created_at)?;
            writeln!(out, "description:  {}", v.description.escape_debug())?;
            writeln!(out, "volume:       {}", v.volume_uuid)?;
            writeln!(
                out,
                "size:         {} ({} bytes), {}-byte sectors",
                format_size(v.volume_size),
                v.volume_size,
                v.sector_size
            )?;
            writeln!(
                out,
                "chunks:       {} of {} bytes, {} with data ({}), {} holes",
                v.chunks,
                v.chunk_size,
                v.data_chunks,
                format_size(v.stored_bytes),
                v.chunks - v.data_chunks
            )?;
            writeln!(out, "parent:       {}", v.parent.as_deref().unwrap_or("-"))?;
            let ctx: Vec<String> = v
                .encryption_context
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(out, "key context:  {}", ctx.join(", "))?;
            writeln!(out, "keyslots:")?;
            for k in &v.keyslots {
                let id = if k.key_id.is_empty() {
                    String::new()
                } else {
                    format!(" key {}", k.key_id)
                };
                writeln!(out, "  {}: {}{}", k.slot, k.backend, id)?;
            }
            Ok(())
        }
        SnapshotCommand::Delete { id, store } => {
            let store = store.open(false)?;
            let id = snapshot_id(&id)?;
            let st = snap::delete_snapshot(&store, &id).await?;
            println!(
                "deleted snapshot {id} from {}: {} chunks removed, {} kept (used by other snapshots)",
                store.url(),
                st.chunks_deleted,
                st.chunks_kept
            );
            Ok(())
        }
        SnapshotCommand::Gc { store } => {
            let store = store.open(false)?;
            let st = snap::collect_garbage(&store).await?;
            println!(
                "{}: {} unreferenced chunks removed, {} in use",
                store.url(),
                st.chunks_deleted,
                st.chunks_kept
            );
            Ok(())
        }
        SnapshotCommand::Copy {
            id,
            store,
            to_store,
            key,
            json,
            keystore,
            pass,
            kdf,
        } => {
            let from = store.open(false)?;
            let to = StoreArg {
                store: Some(to_store),
            }
            .open(true)?;
            let id = snapshot_id(&id)?;
            let keys = key_options(&keystore, Some(&pass), kdf.params());
            let target = match (&keys.passphrase, &key) {
                (Some(source), _) => Some(NewKey::Passphrase(source)),
                (None, Some(k)) => Some(NewKey::Key(KeyRef::parse(k)?)),
                (None, None) => None,
            };
            let st = interruptible("copy", async {
                ops::snapshot_copy(&from, &id, &to, &keys, target)
                    .await
                    .with_context(|| format!("cannot copy snapshot {id} to {}", to.url()))
            })
            .await?;
            if json {
                return print_json(&st);
            }
            println!(
                "copied snapshot {id} to {} as {}{}: {} chunks transferred, {} already there",
                to.url(),
                st.id,
                if st.reencrypted {
                    " (re-encrypted under a new data key)"
                } else {
                    ""
                },
                st.chunks_copied,
                st.chunks_present
            );
            Ok(())
        }
    }
}
/// Sets `cancel` on SIGINT/SIGTERM, so a long copy stops at the next block with its
/// progress saved.
fn cancel_on_signal(what: &'static str) -> crate::migrate::Cancel {
    let cancel = crate::migrate::Cancel::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::warn!(
            "interrupted: stopping the {what} after the current block (again to quit at once)"
        );
        c.cancel();
        wait_for_signal().await;
        eprintln!("cryptvol: interrupted twice: quitting now");
        std::process::exit(130);
    });
    cancel
}

async fn import(a: ImportArgs) -> Result<()> {
    use crate::migrate::{ImportRequest, ResumeMode};
    let keys = key_options(&a.keystore, Some(&a.pass), a.kdf.params());
    let key = new_volume_key(a.key.as_deref(), &keys)?;
    let key_label = match (&keys.passphrase, &a.key) {
        (Some(_), _) => "passphrase".to_string(),
        (None, Some(k)) => format!("key:{k}"),
        (None, None) => "default".to_string(),
    };
    let req = ImportRequest {
        source: &a.source,
        target: &a.file,
        sector_size: a.sector_size,
        key_label,
        mode: if a.restart {
            ResumeMode::Restart
        } else if a.resume {
            ResumeMode::Require
        } else {
            ResumeMode::Auto
        },
    };
    let cancel = cancel_on_signal("import");
    let r = crate::migrate::import(&req, key, &keys, &cancel)
        .await
        .with_context(|| format!("cannot import {} into {}", a.source, a.file.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let wrapped_by = ops::info(&a.file)
        .ok()
        .and_then(|i| i.keyslots.into_iter().next())
        .map(|k| {
            if k.key_id.is_empty() {
                k.backend
            } else {
                format!("{} key {}", k.backend, k.key_id)
            }
        })
        .unwrap_or_else(|| "?".into());
    println!(
        "imported {} into {} ({}, {}-byte sectors, uuid {}), data key wrapped by {}",
        r.source.location,
        r.volume,
        format_size(r.volume_size),
        r.sector_size,
        r.uuid,
        wrapped_by
    );
    if r.padding > 0 {
        println!(
            "  note: the source's size ({} bytes) is not a multiple of the sector size: the volume is {} bytes, its last {} bytes are zero padding",
            r.source_size, r.volume_size, r.padding
        );
    }
    if let Some(from) = r.resumed_from {
        println!("  resumed an interrupted import at offset {from}");
    }
    println!(
        "  data written: {} bytes; zeros left unallocated: {} bytes",
        r.written, r.skipped_zero
    );
    println!("  source SHA-256: {}", r.source_sha256);
    println!("  volume SHA-256: {} (matches)", r.volume_sha256);
    Ok(())
}

async fn export(a: ExportArgs) -> Result<()> {
    use crate::migrate::ExportRequest;
    let keys = key_options(&a.keystore, Some(&a.pass), Argon2Params::default());
    let req = ExportRequest {
        volume: &a.file,
        dest: &a.dest,
        force: a.force,
    };
    crate::migrate::export::precheck(&req)
        .with_context(|| format!("cannot export {} to {}", a.file.display(), a.dest))?;
    eprintln!(
        "cryptvol: warning: {} will hold the decrypted PLAINTEXT of {}: anyone who can read it \
         can read the volume's data. Protect it, and destroy it when it is no longer needed.",
        a.dest,
        a.file.display()
    );
    let cancel = cancel_on_signal("export");
    let r = crate::migrate::export(&req, &keys, &cancel)
        .await
        .with_context(|| format!("cannot export {} to {}", a.file.display(), a.dest))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "exported {} to {} ({}, {} bytes; {} bytes of data, {} bytes of zeros{})",
        r.volume,
        r.dest,
        r.dest_kind,
        r.size,
        r.written,
        r.zero,
        if r.dest_kind == "file" {
            " left as holes"
        } else {
            ""
        }
    );
    println!("  plaintext SHA-256: {}", r.sha256);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The daemon's control channel: status, online re-encryption, snapshots of served exports.

/// The daemon's side of online re-encryption: a new data key wrapped for every keyslot
/// of the volume under the same master keys (never passphrases: those are refused).
struct DaemonKeys {
    keys: KeyOptions,
}

#[async_trait::async_trait]
impl DataKeyMaker for DaemonKeys {
    async fn new_data_key(
        &self,
        volume: &crate::volume::Volume,
    ) -> std::result::Result<(crate::crypto::Dek, Vec<WrappedDek>), HookError> {
        let path = Path::new(volume.path());
        let (header, _) = crate::volume::read_header(path)?;
        Ok(ops::reencrypt_new_dek(path, &header, &self.keys, None).await?)
    }
}

/// The daemon's side of `cryptvol snapshot create EXPORT`.
struct DaemonSnapshots;

#[async_trait::async_trait]
impl SnapshotTaker for DaemonSnapshots {
    async fn take(
        &self,
        job: SnapshotJob,
        progress: &crate::progress::Progress,
    ) -> std::result::Result<serde_json::Value, HookError> {
        let stats = ops::snapshot_served(
            &job.volume,
            job.view,
            &job.store,
            &job.description,
            job.parent.as_deref(),
            progress,
        )
        .await?;
        // The daemon answers {"export": …, "snapshot": <this>}.
        Ok(serde_json::to_value(&stats)?)
    }
}

#[derive(Args, Clone)]
struct ControlArg {
    /// The daemon's control socket [default: /run/cryptvol/control.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl ControlArg {
    fn path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| PathBuf::from(ctl::DEFAULT_CONTROL_PATH))
    }
}

const REENCRYPT_AFTER_HELP: &str = "\
Online (EXPORT is an export of a running `cryptvol serve`, reached through its control
socket): the daemon generates a new data key, wraps it for every keyslot of the volume
under the same master keys, and re-encrypts the volume in the background while clients
keep using it. The progress is recorded in the volume header: after a crash or a restart
the daemon resumes by itself. At the end the old keyslots and the old data key are gone.
One re-encryption per export at a time (another request is refused while one runs);
read-only exports are refused.
Volumes with a passphrase keyslot cannot be re-encrypted online (the daemon does not keep
passphrases): re-encrypt them offline.

Offline (FILE is an existing volume file that is not served, or --offline): the same,
in this process, with a progress bar; Ctrl-C stops between steps and the next run resumes
from the watermark (`cryptvol info FILE` shows it). Passphrase keyslots are re-wrapped with the passphrase given (--passphrase-file).

Examples:
  cryptvol reencrypt vol1                     # online, shows progress until done
  cryptvol reencrypt vol1 --no-wait           # online, returns once started
  cryptvol reencrypt --status vol1
  cryptvol reencrypt /var/lib/cryptvol/vol1.img --passphrase-file /root/pass";

#[derive(Args)]
#[command(after_help = REENCRYPT_AFTER_HELP)]
struct ReencryptArgs {
    /// A served export (online, through the daemon) or a volume file (offline).
    #[arg(value_name = "EXPORT|FILE")]
    target: String,
    /// Treat the argument as a volume file to re-encrypt offline.
    #[arg(long, conflicts_with_all = ["status", "no_wait", "control"])]
    offline: bool,
    /// Show the re-encryption progress of a served export and return.
    #[arg(long)]
    status: bool,
    /// Return as soon as the re-encryption has started (it goes on in the daemon).
    #[arg(long, conflicts_with = "status")]
    no_wait: bool,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: ControlArg,
    /// Offline: the passphrase of the volume's passphrase keyslot(s), read from FILE
    /// (unlocks the volume and wraps the new data key for those keyslots).
    #[arg(long, value_name = "FILE", group = "repass")]
    passphrase_file: Option<PathBuf>,
    /// Offline: prompt for that passphrase on the terminal (asked again to wrap the new
    /// data key).
    #[arg(long, group = "repass")]
    passphrase: bool,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

/// Runs one control request on a blocking thread, showing progress events as a bar (or
/// log lines) named `what`.
async fn control_call(
    path: PathBuf,
    req: Request,
    what: String,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let shown = path.display().to_string();
    let answer = tokio::task::spawn_blocking(move || {
        let mut bar: Option<crate::progress::Progress> = None;
        let mut last_error: Option<String> = None;
        let mut total = 0;
        let r = ctl::request(&path, &req, |ev: &ProgressEvent| {
            total = ev.total;
            bar.get_or_insert_with(|| crate::progress::Progress::new(what.clone(), ev.total))
                .set_done(ev.done);
            if ev.error.is_some() && ev.error != last_error {
                if let Some(e) = &ev.error {
                    eprintln!("cryptvol: warning: {}: {e} (the daemon retries)", ev.export);
                }
            }
            last_error.clone_from(&ev.error);
        });
        if let Some(b) = bar {
            // Progress events are sampled: a job that succeeded is complete.
            if r.is_ok() {
                b.set_done(total);
            }
            b.finish();
        }
        r
    })
    .await
    .context("control request task failed")?;
    answer.with_context(|| format!("control socket {shown}"))
}

async fn reencrypt(a: ReencryptArgs) -> Result<()> {
    let as_file = Path::new(&a.target);
    if a.offline || (a.control.control.is_none() && !a.status && as_file.is_file()) {
        return reencrypt_offline(&a, as_file).await;
    }
    if a.passphrase_file.is_some() || a.passphrase {
        anyhow::bail!(
            "--passphrase-file/--passphrase apply to offline re-encryption of a volume file; \
             the daemon re-encrypts served exports with the keys it has (no passphrases)"
        );
    }
    let path = a.control.path();
    let export = a.target.clone();
    if a.status {
        let m = control_call(
            path,
            Request::ReencryptStatus {
                export: export.clone(),
            },
            String::new(),
        )
        .await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&m)?);
            return Ok(());
        }
        let info: Option<ctl::ReencryptInfo> = m
            .get("reencrypt")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok());
        match info {
            Some(i) if i.finished => println!("{export}: re-encryption complete"),
            Some(i) => println!("{export}: {}", reencrypt_line(&i)),
            None => println!("{export}: no re-encryption in progress"),
        }
        return Ok(());
    }
    let m = control_call(
        path,
        Request::Reencrypt {
            export: export.clone(),
            wait: !a.no_wait,
        },
        format!("re-encrypt {export}"),
    )
    .await
    .with_context(|| {
        if export.contains('/') && !as_file.exists() {
            format!(
                "cannot re-encrypt {export:?}: there is no volume file at that path (to \
                 re-encrypt a file offline, give its path), and as an export name"
            )
        } else {
            format!("cannot re-encrypt export {export:?}")
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else if a.no_wait {
        println!(
            "{export}: re-encryption running in the daemon (follow it with `cryptvol reencrypt --status {export}`)"
        );
    } else {
        println!("{export}: re-encrypted under a new data key; the old data key is destroyed");
    }
    Ok(())
}

fn reencrypt_line(i: &ctl::ReencryptInfo) -> String {
    let pct = if i.size == 0 {
        100.0
    } else {
        i.watermark as f64 * 100.0 / i.size as f64
    };
    let mut s = format!(
        "re-encrypting: {pct:.1}% ({} of {}){}",
        format_size(i.watermark),
        format_size(i.size),
        if i.running { "" } else { ", not running" }
    );
    if let Some(e) = &i.last_error {
        s.push_str(&format!(", last error: {e}"));
    }
    s
}

async fn reencrypt_offline(a: &ReencryptArgs, file: &Path) -> Result<()> {
    if a.no_wait || a.status {
        anyhow::bail!("--no-wait and --status apply to served exports (online re-encryption)");
    }
    let source = || passphrase_source(&a.passphrase_file, None, a.passphrase);
    let mut keys = key_options(&a.keystore, None, a.kdf.params());
    keys.passphrase = source();
    let (vol, header, _) = ops::unlock(file, &keys, OpenOptions::default())
        .await
        .with_context(|| {
            format!(
                "cannot open {} to re-encrypt it (if it is being served, re-encrypt the export \
                 online: cryptvol reencrypt EXPORT)",
                file.display()
            )
        })?;
    let vol = std::sync::Arc::new(vol);
    match vol.reencrypt_status() {
        Some(st) => eprintln!(
            "resuming the re-encryption of {} at {} of {} (watermark {} bytes)",
            file.display(),
            format_size(st.watermark),
            format_size(st.size),
            st.watermark
        ),
        None => {
            let pass_slots: Vec<String> = header
                .keyslots
                .iter()
                .enumerate()
                .filter(|(_, k)| k.backend == crate::keys::PASSPHRASE)
                .map(|(i, _)| i.to_string())
                .collect();
            let pb = if pass_slots.is_empty() {
                None
            } else {
                let Some(src) = source() else {
                    anyhow::bail!(
                        "{}: keyslot {} is a passphrase keyslot: give its passphrase with \
                         --passphrase-file FILE (or --passphrase) so the new data key can be \
                         wrapped for it, or remove that keyslot first",
                        file.display(),
                        pass_slots.join(", ")
                    );
                };
                if matches!(src, crate::keys::PassphraseSource::Prompt) {
                    eprintln!("Enter the passphrase again to wrap the new data key.");
                }
                Some(crate::keys::PassphraseBackend::new(
                    src.read(false)?,
                    keys.argon2,
                ))
            };
            let (dek, slots) = ops::reencrypt_new_dek(file, &header, &keys, pb.as_ref())
                .await
                .with_context(|| format!("cannot re-encrypt {}", file.display()))?;
            let v = vol.clone();
            tokio::task::spawn_blocking(move || v.reencrypt_begin(dek, slots))
                .await
                .context("re-encryption task failed")?
                .with_context(|| format!("cannot start re-encrypting {}", file.display()))?;
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop2.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let v = vol.clone();
    let what = format!("re-encrypt {}", file.display());
    let outcome = tokio::task::spawn_blocking(move || {
        let progress = crate::progress::Progress::new(what, v.size());
        if let Some(st) = v.reencrypt_status() {
            progress.set_done(st.watermark);
        }
        let r = loop {
            crate::server::reencrypt_test_step_delay();
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break Ok(v.reencrypt_status());
            }
            match v.reencrypt_step() {
                Ok(Some(st)) => progress.set_done(st.watermark),
                Ok(None) => break Ok(None),
                Err(e) => break Err(e),
            }
        };
        progress.finish();
        r.and_then(|left| v.flush().map(|()| left))
    })
    .await
    .context("re-encryption task failed")?;
    ctrl_c.abort();
    match outcome.with_context(|| {
        format!(
            "re-encryption of {} failed (run the same command again to resume)",
            file.display()
        )
    })? {
        None => {
            let h = crate::volume::read_header(file).map(|(h, _)| h)?;
            let slots: Vec<String> = h
                .keyslots
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{i}: {}", slot_label(s)))
                .collect();
            println!(
                "re-encrypted {} under a new data key; the old data key is destroyed",
                file.display()
            );
            println!("keyslots now: {}", slots.join("; "));
            Ok(())
        }
        Some(st) => anyhow::bail!(
            "re-encryption of {} interrupted at {} of {} ({} bytes under the new data key, \
             recorded in the header); run the same command again to resume from there",
            file.display(),
            format_size(st.watermark),
            format_size(st.size),
            st.watermark
        ),
    }
}

#[derive(Args)]
struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: ControlArg,
}

async fn status(a: StatusArgs) -> Result<()> {
    let m = control_call(a.control.path(), Request::Status, String::new()).await?;
    let reply: ctl::StatusReply = serde_json::from_value(serde_json::Value::Object(m))
        .context("the daemon's status answer is not understood (version mismatch?)")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    println!(
        "cryptvol daemon pid {}: {} export(s), {} connection(s)",
        reply.pid,
        reply.exports.len(),
        reply.connections
    );
    for e in &reply.exports {
        println!(
            "{}: {} ({}, {}-byte sectors{}), {} connection(s), allocated {}",
            e.name,
            e.path,
            format_size(e.size),
            e.sector_size,
            if e.read_only { ", read-only" } else { "" },
            e.connections,
            if e.thin {
                format_size(e.allocated_bytes)
            } else {
                "everything (not thin)".into()
            }
        );
        if let Some(r) = &e.reencrypt {
            if r.finished {
                println!("  re-encryption complete");
            } else {
                println!("  {}", reencrypt_line(r));
            }
        }
    }
    Ok(())
}

/// `cryptvol snapshot create EXPORT` through the daemon.
async fn snapshot_create_online(
    control: &Path,
    export: &str,
    store: &str,
    description: &str,
    parent: Option<&str>,
    json: bool,
) -> Result<()> {
    let store = absolute_store(store)?;
    let m = control_call(
        control.to_path_buf(),
        Request::Snapshot {
            export: export.to_string(),
            store: store.clone(),
            description: description.to_string(),
            parent: parent.map(str::to_string),
        },
        format!("snapshot {export}"),
    )
    .await
    .with_context(|| format!("cannot snapshot export {export:?}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        let snap = m.get("snapshot").cloned().unwrap_or_default();
        let id = snap
            .get("id")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| snap.to_string());
        let n = |k: &str| snap.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        println!(
            "snapshot {id} of export {export} in {store}: {} chunks, {} with data, {} read, {} uploaded ({}){}",
            n("chunks"),
            n("data_chunks"),
            n("read"),
            n("uploaded"),
            format_size(n("uploaded_bytes")),
            match snap.get("parent").and_then(|v| v.as_str()) {
                Some(p) => format!(", incremental to {p}"),
                None => String::new(),
            }
        );
    }
    Ok(())
}

/// A store as the daemon should see it: URLs as given, a directory made absolute.
fn absolute_store(store: &str) -> Result<String> {
    if store.contains("://") {
        return Ok(store.to_string());
    }
    let p = std::path::absolute(store)
        .with_context(|| format!("cannot make the store path {store:?} absolute"))?;
    Ok(p.display().to_string())
}
