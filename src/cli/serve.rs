//! `cryptvol serve`: settings from flags and the config file, socket activation, the
//! control socket and the daemon's hooks behind it (online re-encryption, snapshots of
//! served exports), the listeners, readiness, SIGHUP reload and shutdown on a signal.
//! Also the pieces `demo` shares (opening exports, binding listeners, running).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{parse_mode, parse_size_arg, AllowArgs, KeystoreArgs, PassphraseArgs};
use super::live_exports::{ConfigReload, DaemonExports};
use super::serve_ublk::UblkDevices;
use super::signals::DaemonSignals;
use crate::config::{self, CliOverrides, ExportSpec};
use crate::keys::{Argon2Params, WrappedDek};
use crate::ops::{self, KeyOptions};
use crate::server::control::{DataKeyMaker, HookError, SnapshotJob, SnapshotTaker};
use crate::server::systemd::{self, ActivatedSocket};
use crate::server::{
    self, ControlHooks, ControlSocket, Export, Exports, Listener, ListenerSpec, ServerConfig,
};

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

impl ServeArgs {
    /// The --config file, for settings read before the daemon starts (`log_format`).
    pub(super) fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// `--takeover`: take RBD images over from a dead server.
    pub(super) fn takeover(&self) -> bool {
        self.takeover
    }
}

/// `cryptvol serve`.
#[derive(Args, Clone)]
#[command(after_help = SERVE_AFTER_HELP)]
pub(super) struct ServeArgs {
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
    /// (like dm-crypt's allow_discards); discarded blocks read back as zeros (as random
    /// bytes on a volume made with --no-allocation-map).
    #[arg(long)]
    discard: bool,
    /// Bytes of request payload held in memory at once, across all connections [default: 64M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    max_inflight: Option<u64>,
    /// The backing files' I/O engine: uring (io_uring), threads (pread/pwrite), or auto
    /// (the engine measured faster on buffered files: threads today; the choice is logged)
    /// [default: the config file's `engine`, else auto].
    #[arg(long, value_name = "ENGINE", value_parser = parse_engine_arg)]
    engine: Option<crate::volume::EngineChoice>,
    /// Read and write the backing files' data with O_DIRECT (aligned 4 KiB ranges; the
    /// rest buffered), bypassing the page cache. A filesystem that refuses O_DIRECT
    /// (tmpfs, some FUSE) makes the export fail to open [default: the config file's
    /// `direct`, else off].
    #[arg(long)]
    direct: bool,
    /// Transmission threads per connection: requests of one connection served at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Who may open the exports of VOLUME arguments.
    #[command(flatten)]
    allow: AllowArgs,
    /// Control socket for `cryptvol status`, `exports`, `reencrypt EXPORT`, `snapshot create
    /// EXPORT` (mode 0600) [default: the config file's `control`, else
    /// /run/cryptvol/control.sock when running as root, else none].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (per export: requests, bytes
    /// and latency by command, errors, connections, allocation, re-encryption and
    /// snapshot progress; per key backend: calls, failures, latency) [default: the config
    /// file's `metrics`, else none]. Port 0 picks a free port (logged).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Also expose export EXPORT as /dev/ublkbN through the kernel's ublk driver (Linux
    /// 6.0+, `modprobe ublk_drv`; repeatable). With :ID the device is /dev/ublkbID, and a
    /// device ID that a killed daemon left quiesced is recovered: the I/O that waited is
    /// served. See docs/ublk.md.
    #[arg(long, value_name = "EXPORT[:ID]", value_parser = super::serve_ublk::parse_ublk_spec)]
    ublk: Vec<super::serve_ublk::UblkSpec>,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    pass: PassphraseArgs,
    /// Failover for rbd:POOL/IMAGE volumes whose server's host is dead: take each image's
    /// exclusive lock over from its holder, which is blocklisted by the cluster (its
    /// writes fail from then on, for the cluster's blocklist time, one hour by default).
    /// Only when the old server is really gone or must be fenced: without this flag an
    /// image held by another server is refused, naming the holder.
    #[arg(long)]
    takeover: bool,
    /// Volumes to serve: FILE (export name = file stem) or NAME=FILE; FILE may be an RBD
    /// image, rbd:POOL/IMAGE (export name = the image name).
    #[arg(value_name = "VOLUME", required_unless_present = "config")]
    volumes: Vec<String>,
}

/// `cryptvol serve`: resolves the settings (flags over the config file), unlocks every
/// volume, opens the control socket and the listeners, and serves until a signal. The
/// signal handlers come first: SIGTERM during start-up is a clean exit (status 0).
pub(super) async fn serve(a: ServeArgs, activated: Vec<ActivatedSocket>) -> Result<()> {
    let mut signals = DaemonSignals::register()?;
    let config_file = a.config.clone();
    let args = a.clone();
    let Some(d) = signals.unless_stopped(start(a, activated)).await? else {
        tracing::info!("stop requested during start-up: exiting before serving");
        return Ok(());
    };
    let reload = config_file
        .map(|path| ConfigReload::new(path, Box::new(move || overrides(&args)), d.specs, d.opener));
    run_server(
        d.exports,
        d.listeners,
        d.config,
        d.control,
        signals,
        reload,
        d.ublk,
    )
    .await
}

/// What `serve` has ready once start-up is done.
struct Started {
    exports: Exports,
    listeners: Vec<Listener>,
    config: ServerConfig,
    control: server::Control,
    /// The exports as configured (what a config reload compares with).
    specs: Vec<ExportSpec>,
    /// Opens the exports added while serving.
    opener: Arc<DaemonExports>,
    /// The `--ublk` devices, live.
    ublk: UblkDevices,
}

/// Start-up: settings, TLS, keys, sockets, unlocked volumes, control socket, listeners.
async fn start(a: ServeArgs, activated: Vec<ActivatedSocket>) -> Result<Started> {
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
    let mut settings = config::resolve(file, overrides(&a))?;
    if settings.deprecated_allow_remote {
        tracing::warn!("allow_remote in the config file is deprecated: write insecure = true");
    }
    // Certificate problems are reported before any volume is unlocked.
    let tls = load_tls(settings.tls.take())?;
    let keys = KeyOptions {
        keystore: settings.keystore.take(),
        passphrase: settings.passphrase.take(),
        argon2: Argon2Params::default(),
        audit_log: settings.audit_log.take(),
    };
    purge_due_keys(&keys);
    // Register inherited sockets first: a refused one should fail before any unlock.
    let inherited = adopt_sockets(activated, settings.allow_remote)?;
    let exports = open_exports(&settings.exports, &keys).await?;
    if inherited.is_empty() {
        if let Some((dir, mode)) = &settings.default_socket_dir {
            make_socket_dir(dir, *mode)?;
        }
    }
    let daemon_options = crate::volume::OpenOptions {
        read_only: a.read_only,
        discard: a.discard,
        engine: settings.engine,
        direct: settings.direct,
    };
    let opener = Arc::new(DaemonExports::new(&keys, daemon_options));
    let mut control = daemon_control(settings.control.clone(), &keys).await?;
    control.hooks.exports = Some(opener.clone());
    control.metrics = open_metrics(settings.metrics.as_deref()).await?;
    let listeners = open_listeners(inherited, &settings.listeners, &control).await?;
    let config = server_config(&settings, a.threads, &keys, tls);
    let ublk = UblkDevices::start(&a.ublk, &exports).await?;
    Ok(Started {
        exports,
        listeners,
        config,
        control,
        specs: settings.exports,
        opener,
        ublk,
    })
}

/// The `serve` flags as overrides of the config file.
fn overrides(a: &ServeArgs) -> CliOverrides {
    CliOverrides {
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
        metrics: a.metrics.clone(),
        allow: config::AllowFlags {
            uid: a.allow.uid.clone(),
            gid: a.allow.gid.clone(),
            tls_subject: a.allow.tls_subject.clone(),
            tls_san: a.allow.tls_san.clone(),
            anyone: a.allow.anyone,
        },
        tls: a.tls,
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        tls_client_ca: a.tls_client_ca.clone(),
        engine: a.engine,
        direct: a.direct,
    }
}

/// `--engine auto|threads|uring`.
fn parse_engine_arg(s: &str) -> Result<crate::volume::EngineChoice, String> {
    s.parse()
}

/// Loads the certificate, key and client CA when TLS is configured.
fn load_tls(tls: Option<config::TlsSettings>) -> Result<Option<Arc<server::TlsSetup>>> {
    let Some(t) = tls else {
        return Ok(None);
    };
    let setup = server::TlsSetup::load(t.mode, t.files).context("cannot set up TLS")?;
    tracing::info!("{}", setup.describe());
    Ok(Some(Arc::new(setup)))
}

/// Keys whose deletion waiting period has passed are destroyed at start (as KMS does on
/// its own schedule). A daemon that may not change the keystore only warns.
fn purge_due_keys(keys: &KeyOptions) {
    match ops::purge_expired_keys(keys) {
        Ok(deleted) => {
            for id in deleted {
                tracing::info!(key = %id, "destroyed master key: its deletion waiting period has passed");
            }
        }
        Err(e) => tracing::warn!("cannot destroy keys whose deletion is due: {e}"),
    }
}

/// The listeners of the sockets systemd passed (socket activation).
fn adopt_sockets(activated: Vec<ActivatedSocket>, allow_remote: bool) -> Result<Vec<Listener>> {
    let mut inherited = Vec::new();
    for s in activated {
        let desc = s.describe();
        inherited.push(s.into_listener(allow_remote)?);
        tracing::info!("socket activation: using {desc}");
    }
    Ok(inherited)
}

/// The control socket and the daemon's hooks behind it (online re-encryption and
/// snapshots of served exports).
async fn daemon_control(control: Option<PathBuf>, keys: &KeyOptions) -> Result<server::Control> {
    let socket = open_control_socket(control).await?;
    Ok(server::Control {
        socket,
        hooks: ControlHooks {
            keys: Some(Arc::new(DaemonKeys {
                keys: KeyOptions {
                    keystore: keys.keystore.clone(),
                    passphrase: None,
                    argon2: keys.argon2,
                    audit_log: keys.audit_log.clone(),
                },
            })),
            snapshots: Some(Arc::new(DaemonSnapshots)),
            exports: None,
        },
        metrics: None,
    })
}

/// The `--metrics` endpoint, bound now so that a bad address fails start-up; the bound
/// address is logged (port 0 picks one).
async fn open_metrics(addr: Option<&str>) -> Result<Option<server::MetricsListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = server::MetricsListener::bind(addr).await?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("metrics endpoint {addr}"))?;
    tracing::info!("metrics endpoint listening on http://{bound}/metrics");
    Ok(Some(listener))
}

/// A control socket given explicitly must be opened; the implicit default (root) is
/// skipped with a warning when another daemon owns it or it cannot be made.
async fn open_control_socket(control: Option<PathBuf>) -> Result<Option<ControlSocket>> {
    let explicit = control.is_some();
    let Some(path) = server::control::control_path(control) else {
        return Ok(None);
    };
    match ControlSocket::bind(&path).await {
        Ok(s) => Ok(Some(s)),
        Err(e) if !explicit => {
            tracing::warn!(
                "running without a control socket: the default {} cannot be used ({e}); \
                 give --control PATH to choose one",
                path.display()
            );
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e)
            .context(format!("cannot open the control socket {}", path.display()))),
    }
}

/// The sockets systemd passed if any, else the configured listeners, bound now (the
/// control socket is removed again if one cannot be bound).
async fn open_listeners(
    inherited: Vec<Listener>,
    specs: &[ListenerSpec],
    control: &server::Control,
) -> Result<Vec<Listener>> {
    if inherited.is_empty() {
        return match bind_all(specs).await {
            Ok(l) => Ok(l),
            Err(e) => {
                if let Some(s) = &control.socket {
                    let _ = std::fs::remove_file(s.path());
                }
                Err(e)
            }
        };
    }
    if !specs.is_empty() {
        tracing::info!(
            "socket activation: configured listeners are not opened (systemd passed {} socket(s))",
            inherited.len()
        );
    }
    Ok(inherited)
}

/// The server's limits, timeouts, audit log and TLS.
fn server_config(
    settings: &config::ServeSettings,
    threads: u16,
    keys: &KeyOptions,
    tls: Option<Arc<server::TlsSetup>>,
) -> ServerConfig {
    let lim = settings.limits;
    ServerConfig {
        max_inflight_bytes: usize::try_from(settings.max_inflight).unwrap_or(usize::MAX),
        threads_per_connection: usize::from(threads),
        max_connections: usize::try_from(lim.max_connections).unwrap_or(usize::MAX),
        max_connections_per_peer: usize::try_from(lim.max_connections_per_peer)
            .unwrap_or(usize::MAX),
        handshake_timeout: std::time::Duration::from_secs(lim.handshake_timeout_secs),
        idle_timeout: (lim.idle_timeout_secs > 0)
            .then(|| std::time::Duration::from_secs(lim.idle_timeout_secs)),
        insecure_tcp: settings.insecure,
        audit_log: Some(keys.service().audit_log().clone()),
        tls,
    }
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

/// How many exports `serve` opens at once at start-up. Opening one is mostly waiting:
/// for the audit record's `fdatasync`, the changed-chunk sidecar, the key backend (a KMS
/// round trip). Opened a few at a time, those waits overlap, and the audit records of
/// exports opened together share one sync (the audit log's group commit). A few, not
/// all: the key backend sees at most this many requests at once, and a start-up with
/// hundreds of exports does not start hundreds of threads.
const OPEN_AT_ONCE: usize = 4;

/// Unlocks every volume of `specs` and starts its changed-chunk tracking, a few at a time
/// ([`OPEN_AT_ONCE`]), and returns them in the order of `specs`. Nothing is served before
/// all are open (the listeners are bound after), so every export's audit record is on
/// disk before its first byte is served, as when they were opened one by one. With a
/// passphrase, one at a time: it may be read from a terminal or a pipe, and Argon2id's
/// memory cost should not be paid several times over.
pub(super) async fn open_exports(specs: &[ExportSpec], keys: &KeyOptions) -> Result<Exports> {
    use futures::StreamExt as _;
    if keys.passphrase.is_some() || specs.len() < 2 {
        let mut exports: Vec<Export> = Vec::new();
        for spec in specs {
            exports.push(open_export(spec, keys).await?);
        }
        return Ok(Exports::new(exports));
    }
    // The same key options, owned, for the opening threads (no passphrase here).
    let shared = Arc::new(KeyOptions {
        keystore: keys.keystore.clone(),
        passphrase: None,
        argon2: keys.argon2,
        audit_log: keys.audit_log.clone(),
    });
    let handle = tokio::runtime::Handle::current();
    // Each open runs on a blocking thread of its own (its file I/O blocks: on the async
    // workers it would not overlap), driving its async key calls with the runtime.
    let opened: Vec<Result<Export>> = futures::stream::iter(specs.iter().cloned())
        .map(|spec| {
            let (keys, handle) = (shared.clone(), handle.clone());
            async move {
                tokio::task::spawn_blocking(move || handle.block_on(open_export(&spec, &keys)))
                    .await
                    .map_err(|e| anyhow::anyhow!("the task opening an export failed: {e}"))?
            }
        })
        .buffered(OPEN_AT_ONCE)
        .collect()
        .await;
    // All are awaited before the first error is reported: none is left half-open.
    let exports = opened.into_iter().collect::<Result<Vec<Export>>>()?;
    Ok(Exports::new(exports))
}

/// Unlocks the volume of one export and starts its changed-chunk tracking (at start-up,
/// and for exports added while serving).
pub(super) async fn open_export(spec: &ExportSpec, keys: &KeyOptions) -> Result<Export> {
    let (name, path, opts) = (&spec.name, &spec.path, spec.options);
    let (vol, header, _) = ops::unlock(path, keys, opts)
        .await
        .with_context(|| format!("cannot open volume {} (export {name:?})", path.display()))?;
    vol.enable_change_tracking()
        .with_context(|| format!("cannot start changed-chunk tracking for {}", path.display()))?;
    tracing::info!(
        export = %name,
        path = %path.display(),
        uuid = %header.uuid,
        size = header.size,
        sector_size = header.sector_size,
        read_only = opts.read_only,
        engine = vol.engine_name(),
        access = %access_summary(&spec.access),
        "export opened"
    );
    Ok(Export::new(name.clone(), vol).with_policy(spec.access.clone()))
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

/// Binds every listener of `specs`.
pub(super) async fn bind_all(specs: &[ListenerSpec]) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for s in specs {
        listeners.push(Listener::bind(s).await?);
    }
    Ok(listeners)
}

/// Serves until SIGTERM/SIGINT. Every volume is unlocked and every listener is open here,
/// so this is where systemd learns that the service is ready.
pub(super) async fn run_server(
    exports: Exports,
    listeners: Vec<Listener>,
    config: ServerConfig,
    control: server::Control,
    mut signals: DaemonSignals,
    reload: Option<ConfigReload>,
    mut ublk: UblkDevices,
) -> Result<()> {
    for l in &listeners {
        tracing::info!("listening on {}", l.describe());
    }
    let n = exports.iter().count();
    systemd::notify_ready(&format!(
        "serving {n} export{}",
        if n == 1 { "" } else { "s" }
    ));
    if let Some(interval) = server::watchdog::from_env() {
        tokio::spawn(server::watchdog::keep_alive(interval));
    }
    let shutdown = server::shutdown_handle();
    let live = server::LiveExports::new(exports, &shutdown);
    let reload = reload.map(|r| (r, live.clone()));
    tokio::spawn(reload_on_sighup(
        config.tls.clone(),
        signals.take_hangup(),
        reload,
    ));
    let sd = shutdown.clone();
    tokio::spawn(async move {
        signals.stop_requested().await;
        tracing::info!("shutting down: no new connections; finishing in-flight requests");
        systemd::notify_stopping();
        sd.shutdown();
    });
    let served = server::serve_live(live, listeners, config, shutdown, control).await;
    // The ublk devices stop after the NBD server (each then flushes its volume again).
    ublk.stop().await;
    served?;
    tracing::info!("stopped; all volumes flushed");
    Ok(())
}

/// On each SIGHUP, re-reads the TLS certificate, key and client CA files (see
/// `server::reload_tls`; a failure keeps the old ones) and, with `--config FILE`, the
/// exports of the config file (see `live_exports::ConfigReload`). With neither there is
/// nothing to reload, but SIGHUP (`systemctl reload`) must still not end the daemon.
async fn reload_on_sighup(
    tls: Option<Arc<server::TlsSetup>>,
    hup: Option<tokio::signal::unix::Signal>,
    mut reload: Option<(ConfigReload, Arc<server::LiveExports>)>,
) {
    let Some(mut hup) = hup else {
        return;
    };
    while hup.recv().await.is_some() {
        if let Some((r, live)) = &mut reload {
            r.reload(live).await;
        }
        let Some(tls) = &tls else {
            if reload.is_some() {
                continue;
            }
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
