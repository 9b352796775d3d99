//! The clap front end: parses arguments, sets up logging and the runtime, and calls
//! into `ops` and `server`. No logic of its own beyond presentation.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{self, CliOverrides, ExportSpec};
use crate::keys::{Argon2Params, KeyInfo, PassphraseSource};
use crate::ops::{self, KeyOptions, NewKey};
use crate::server::systemd::{self, ActivatedSocket};
use crate::server::{self, Export, Exports, Listener, ListenerSpec, ServerConfig, ServerError};
use crate::size::{format_size, parse_size};
use crate::volume::{OpenOptions, VolumeSpec, DEFAULT_SECTOR_SIZE};

const AFTER_HELP: &str = "\
Each volume has its own random 512-bit data key (AES-256-XTS). The data key is stored only
wrapped by a master key held by a key backend: the local keystore (default) or a passphrase.

Examples:
  cryptvol create --size 10G vol.img              # wrapped by the default local master key
  cryptvol info vol.img
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
    Serve(ServeArgs),
    /// Manage master keys in the local keystore.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Create a demo volume in a scratch directory and serve it, printing how to attach it.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct KeystoreArgs {
    /// Local keystore directory [default: $CRYPTVOL_KEYSTORE, else /var/lib/cryptvol/keys
    /// for root, else $XDG_DATA_HOME/cryptvol/keys]
    #[arg(long, value_name = "DIR")]
    keystore: Option<PathBuf>,
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
}

impl PassphraseArgs {
    fn source(&self) -> Option<PassphraseSource> {
        if let Some(f) = &self.passphrase_file {
            Some(PassphraseSource::File(f.clone()))
        } else if let Some(fd) = self.passphrase_fd {
            Some(PassphraseSource::Fd(fd))
        } else if self.passphrase {
            Some(PassphraseSource::Prompt)
        } else {
            None
        }
    }
}

#[derive(Args)]
struct CreateArgs {
    /// Volume size, e.g. 512M, 10G, 1T (binary units); a multiple of the sector size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    size: u64,
    /// Local master key to wrap the data key: a key id or alias/NAME [default: the default key,
    /// created on first use].
    #[arg(
        long,
        visible_alias = "kms-key-id",
        value_name = "KEY_ID_OR_ALIAS",
        conflicts_with = "pass"
    )]
    key: Option<String>,
    /// Sector size: the XTS data unit and the smallest block clients should use.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SECTOR_SIZE, value_parser = parse_sector_size)]
    sector_size: u32,
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
With --config FILE (TOML, see systemd/cryptvol.toml.example): VOLUME arguments are added to
the file's exports; --read-only/--discard apply to all exports; any --tcp/--unix replaces the
file's listeners; other flags override the file. Sockets passed by systemd socket activation
(LISTEN_FDS) replace all configured listeners. With NOTIFY_SOCKET set, READY=1 is sent once
every volume is unlocked and the listeners are open, STOPPING=1 on SIGTERM/SIGINT.";

#[derive(Args)]
#[command(after_help = SERVE_AFTER_HELP)]
struct ServeArgs {
    /// Read listeners, exports, keystore and limits from a TOML file (the systemd unit uses
    /// /etc/cryptvol/cryptvol.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (repeatable) [default: 127.0.0.1:10809 when no listener is
    /// configured].
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Vec<String>,
    /// Listen on a Unix socket at PATH (repeatable).
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// Permissions of Unix sockets (octal) [default: 0600].
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,
    /// Allow TCP listeners on non-loopback addresses (NBD has no TLS here: anyone on the
    /// network can read and write the volume).
    #[arg(long)]
    allow_remote: bool,
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
    /// Create a new master key in the local keystore.
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
}

#[derive(Args)]
struct DemoArgs {
    /// Scratch directory for the keystore, the volume and the socket.
    #[arg(long, value_name = "DIR", default_value = "./cryptvol-demo")]
    dir: PathBuf,
    /// Size of the demo volume.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size_arg)]
    size: u64,
    /// TCP address to listen on too.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:10809")]
    tcp: String,
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
    match rt.block_on(run(cli, activated)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cryptvol: error: {e:#}");
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
        Command::Serve(a) => serve(a, activated?).await,
        Command::Key(k) => key(k),
        Command::Demo(a) => demo(a).await,
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
    }
}

async fn create(a: CreateArgs) -> Result<()> {
    let keys = key_options(&a.keystore, Some(&a.pass), a.kdf.params());
    let new_key = if keys.passphrase.is_some() {
        NewKey::Passphrase
    } else {
        NewKey::Local(a.key.as_deref())
    };
    let spec = VolumeSpec {
        size: a.size,
        sector_size: a.sector_size,
    };
    let header = ops::create_volume(&a.file, &spec, new_key, &keys)
        .await
        .with_context(|| format!("cannot create {}", a.file.display()))?;
    let slot = header.keyslots.first();
    println!(
        "created {} ({}, {}-byte sectors, uuid {}), data key wrapped by {}{}",
        a.file.display(),
        format_size(header.size),
        header.sector_size,
        header.uuid,
        slot.map(|s| s.backend.as_str()).unwrap_or("?"),
        slot.filter(|s| !s.key_id.is_empty())
            .map(|s| format!(" key {}", s.key_id))
            .unwrap_or_default()
    );
    Ok(())
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
    writeln!(out, "keyslots:")?;
    for k in &i.keyslots {
        let id = if k.key_id.is_empty() {
            String::new()
        } else {
            format!(" key {}", k.key_id)
        };
        writeln!(out, "  {}: {}{}", k.slot, k.backend, id)?;
    }
    Ok(())
}

fn key(k: KeyCommand) -> Result<()> {
    match k {
        KeyCommand::Create {
            alias,
            json,
            keystore,
        } => {
            let keys = key_options(&keystore, None, Argon2Params::default());
            let ks = keys.local(true)?;
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
            let keys = key_options(&keystore, None, Argon2Params::default());
            let ks = keys.local(false)?;
            let list = ks.list_keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no master keys in {}", ks.dir().display());
            } else {
                println!("{:<40} {:<22} ALIASES", "KEY ID", "CREATED");
                for k in &list {
                    let mut aliases = k.aliases.join(",");
                    if k.default {
                        aliases.push_str(" (default)");
                    }
                    println!("{:<40} {:<22} {}", k.key_id, k.created_at, aliases);
                }
            }
        }
    }
    Ok(())
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
    let overrides = CliOverrides {
        tcp: a.tcp.clone(),
        unix: a.unix.clone(),
        socket_mode: a.socket_mode,
        allow_remote: a.allow_remote,
        read_only: a.read_only,
        discard: a.discard,
        max_inflight: a.max_inflight,
        keystore: a.keystore.keystore.clone(),
        passphrase: a.pass.source(),
        volumes: a.volumes.clone(),
    };
    let settings = config::resolve(file, overrides)?;
    let keys = KeyOptions {
        keystore: settings.keystore,
        passphrase: settings.passphrase,
        argon2: Argon2Params::default(),
    };
    // Register inherited sockets first: a refused one should fail before any unlock.
    let mut inherited = Vec::new();
    for s in activated {
        let desc = s.describe();
        inherited.push(s.into_listener(settings.allow_remote)?);
        tracing::info!("socket activation: using {desc}");
    }
    let exports = open_exports(&settings.exports, &keys).await?;
    let listeners = if inherited.is_empty() {
        bind_all(&settings.listeners).await?
    } else {
        if !settings.listeners.is_empty() {
            tracing::info!(
                "socket activation: configured listeners are not opened (systemd passed {} socket(s))",
                inherited.len()
            );
        }
        inherited
    };
    let config = ServerConfig {
        max_inflight_bytes: usize::try_from(settings.max_inflight).unwrap_or(usize::MAX),
        threads_per_connection: usize::from(a.threads),
        ..ServerConfig::default()
    };
    run_server(exports, listeners, config).await
}

async fn open_exports(specs: &[ExportSpec], keys: &KeyOptions) -> Result<Exports> {
    let mut exports: Vec<Export> = Vec::new();
    for spec in specs {
        let (name, path, opts) = (&spec.name, &spec.path, spec.options);
        let (vol, header, _) = ops::unlock(path, keys, opts)
            .await
            .with_context(|| format!("cannot open volume {} (export {name:?})", path.display()))?;
        tracing::info!(
            export = %name,
            path = %path.display(),
            uuid = %header.uuid,
            size = header.size,
            sector_size = header.sector_size,
            read_only = opts.read_only,
            "export opened"
        );
        exports.push(Export::new(name.clone(), vol));
    }
    Ok(Exports::new(exports))
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
) -> Result<()> {
    for l in &listeners {
        tracing::info!("listening on {}", l.describe());
    }
    let n = exports.iter().count();
    systemd::notify_ready(&format!(
        "serving {n} export{}",
        if n == 1 { "" } else { "s" }
    ));
    let shutdown = server::shutdown_handle();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        systemd::notify_stopping();
        sd.shutdown();
    });
    server::serve(exports, listeners, config, shutdown).await?;
    tracing::info!("stopped; all volumes flushed");
    Ok(())
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
    };
    if !vol.exists() {
        let spec = VolumeSpec {
            size: a.size,
            sector_size: DEFAULT_SECTOR_SIZE,
        };
        ops::create_volume(&vol, &spec, NewKey::Local(None), &keys).await?;
    }
    print_demo_help(&dir, &keystore, &vol, &sock, &a.tcp);
    let specs = vec![
        ListenerSpec::Unix {
            path: sock.clone(),
            mode: 0o600,
        },
        ListenerSpec::Tcp {
            addr: config::parse_tcp(&a.tcp).map_err(anyhow::Error::msg)?,
            allow_remote: false,
        },
    ];
    let export = ExportSpec {
        name: "demo".to_string(),
        path: vol.clone(),
        options: OpenOptions::default(),
    };
    let exports = open_exports(&[export], &keys).await?;
    let listeners = bind_all(&specs).await?;
    run_server(exports, listeners, ServerConfig::default()).await
}

fn print_demo_help(dir: &Path, keystore: &Path, vol: &Path, sock: &Path, tcp: &str) {
    let (host, port) = tcp.rsplit_once(':').unwrap_or((tcp, "10809"));
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
  sudo modprobe nbd && sudo nbd-client {host} {port} /dev/nbd0 -N demo -b 4096

Stop with Ctrl-C (in-flight requests finish and the volume is flushed).",
        vol = vol.display(),
        keystore = keystore.display(),
        sock = sock.display(),
        dir = dir.display(),
    );
    let _ = std::io::stdout().flush();
}
