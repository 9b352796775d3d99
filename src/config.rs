//! The `cryptvol serve` configuration file (TOML) and how it combines with the command line.
//!
//! The file (see `systemd/cryptvol.toml.example`) holds the listeners, the exports, the
//! keystore directory, an optional passphrase file and the in-flight memory budget. The
//! command line combines with it as follows (documented in `docs/attach.md`):
//!
//! - exports: the file's `[[export]]` tables, then every `VOLUME` argument (added); an export
//!   name used twice is an error. `--read-only` / `--discard` apply to every export.
//! - access: each `[[export]]` has its own `allow_*` keys; the `--allow-*` flags apply to
//!   the exports named by `VOLUME` arguments only (giving them without one is an error).
//!   User and group names are resolved once, here, at start-up.
//! - listeners: any `--tcp` or `--unix` flag replaces the file's `[listen]` addresses; with
//!   none anywhere, one Unix socket (mode `socket_mode`, default 0600): for root
//!   `/run/cryptvol/nbd.sock` (directory created 0755 if missing), for other users
//!   `$XDG_RUNTIME_DIR/cryptvol/nbd.sock` (directory 0700), and without `XDG_RUNTIME_DIR`
//!   an error asking for `--unix PATH`. TCP is only opened when asked for; a non-loopback
//!   TCP address needs TLS required (`--tls require`) or `--insecure`. Sockets passed by
//!   systemd socket activation replace all of them (see `server::systemd`).
//! - scalars (`--socket-mode`, `--max-inflight`, `--keystore`, `--audit-log`, a passphrase
//!   option, the connection limits and timeouts) override the file; `--insecure` is or-ed
//!   with the file's `insecure` (`allow_remote`, its former name, is still read, with a
//!   warning).
//! - TLS: `--tls`, `--tls-cert`, `--tls-key`, `--tls-client-ca` each override the file's
//!   `[tls]` key of the same name (`mode`, `cert`, `key`, `client_ca`).
//! - relative paths in the file are relative to the directory of the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::keys::PassphraseSource;
use crate::nbd::TlsMode;
use crate::server::{AccessPolicy, ListenerSpec, TlsFiles};
use crate::size::parse_size;
use crate::volume::OpenOptions;

/// The configuration file the systemd unit passes to `cryptvol serve --config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cryptvol/cryptvol.toml";
/// The NBD port: the TCP address `demo --tcp` and the docs use.
pub const DEFAULT_TCP: &str = "127.0.0.1:10809";
/// The Unix socket a daemon running as root listens on when nothing else is configured.
pub const DEFAULT_ROOT_SOCKET: &str = "/run/cryptvol/nbd.sock";
/// Default permissions of Unix sockets.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Default bytes of request payload in memory at once.
pub const DEFAULT_MAX_INFLIGHT: u64 = 64 * 1024 * 1024;

/// Why a configuration could not be loaded or combined.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The file as written. Unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Local keystore directory.
    pub keystore: Option<PathBuf>,
    /// File holding the passphrase for passphrase keyslots.
    pub passphrase_file: Option<PathBuf>,
    /// Key audit log (default: `audit.jsonl` in the keystore directory).
    pub audit_log: Option<PathBuf>,
    /// Bytes of request payload in memory at once: an integer or a size string ("64M").
    pub max_inflight: Option<toml::Value>,
    /// The control socket (`cryptvol status`, `reencrypt`, `snapshot create` talk to the
    /// daemon through it) [default: /run/cryptvol/control.sock when running as root].
    pub control: Option<PathBuf>,
    /// Where to listen.
    pub listen: Option<ListenSection>,
    /// TLS on the listeners.
    pub tls: Option<TlsSection>,
    /// The volumes to serve.
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportSection>,
}

/// `[listen]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// TCP `HOST:PORT` addresses.
    #[serde(default)]
    pub tcp: Vec<String>,
    /// Unix socket paths.
    #[serde(default)]
    pub unix: Vec<PathBuf>,
    /// Permissions of the Unix sockets: a string "0600" or an integer written 0o600.
    pub socket_mode: Option<toml::Value>,
    /// Serve plaintext NBD on non-loopback TCP addresses although TLS is not required.
    #[serde(default)]
    pub insecure: bool,
    /// Deprecated name of `insecure`.
    #[serde(default)]
    pub allow_remote: bool,
    /// Connections at once on each listener.
    pub max_connections: Option<u64>,
    /// Connections at once of one peer (a uid on Unix sockets, an IP address on TCP) on
    /// each listener.
    pub max_connections_per_peer: Option<u64>,
    /// Seconds a client may take to finish the handshake.
    pub handshake_timeout: Option<u64>,
    /// Seconds without a request after which a connection is closed (0: never).
    pub idle_timeout: Option<u64>,
}

/// `[tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// "off", "on" or "require".
    pub mode: Option<String>,
    /// Server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to; setting it requires them.
    pub client_ca: Option<PathBuf>,
}

/// One `[[export]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// The NBD export name clients ask for.
    pub name: String,
    /// The volume file.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub discard: bool,
    /// Unix-socket clients with these users (names or uids) may open the export, besides
    /// the daemon's own user.
    #[serde(default)]
    pub allow_uid: Vec<toml::Value>,
    /// Unix-socket clients whose primary group (name or gid) is one of these.
    #[serde(default)]
    pub allow_gid: Vec<toml::Value>,
    /// TLS clients whose verified certificate has exactly this subject ("CN=a,O=b").
    #[serde(default)]
    pub allow_tls_subject: Vec<String>,
    /// TLS clients whose verified certificate has exactly this SAN ("DNS:host", ...).
    #[serde(default)]
    pub allow_tls_san: Vec<String>,
    /// Every client that can connect, with no identity check (plaintext TCP needs it).
    #[serde(default)]
    pub allow_anyone: bool,
}

/// The `--allow-*` flags (they apply to the exports of `VOLUME` arguments).
#[derive(Default)]
pub struct AllowFlags {
    /// User names or uids.
    pub uid: Vec<String>,
    /// Group names or gids.
    pub gid: Vec<String>,
    pub tls_subject: Vec<String>,
    pub tls_san: Vec<String>,
    pub anyone: bool,
}

impl AllowFlags {
    fn is_empty(&self) -> bool {
        self.uid.is_empty()
            && self.gid.is_empty()
            && self.tls_subject.is_empty()
            && self.tls_san.is_empty()
            && !self.anyone
    }
}

/// What the command line says, before combining with a file.
#[derive(Default)]
pub struct CliOverrides {
    pub tcp: Vec<String>,
    pub unix: Vec<PathBuf>,
    pub socket_mode: Option<u32>,
    /// `--insecure` (or its deprecated alias `--allow-remote`).
    pub insecure: bool,
    pub read_only: bool,
    pub discard: bool,
    pub max_inflight: Option<u64>,
    pub keystore: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub passphrase: Option<PassphraseSource>,
    /// `FILE` or `NAME=FILE`.
    pub volumes: Vec<String>,
    /// `--control PATH`.
    pub control: Option<PathBuf>,
    /// The Unix socket (and the mode of its directory) to use when no listener is
    /// configured: [`default_unix_socket`]. `None`: no default, an error.
    pub default_unix: Option<(PathBuf, u32)>,
    pub max_connections: Option<u64>,
    pub max_connections_per_peer: Option<u64>,
    pub handshake_timeout: Option<u64>,
    pub idle_timeout: Option<u64>,
    /// `--allow-uid`, `--allow-gid`, `--allow-tls-subject`, `--allow-tls-san`,
    /// `--allow-anyone`.
    pub allow: AllowFlags,
    pub tls: Option<TlsMode>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
}

/// TLS as configured (mode `on` or `require`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub files: TlsFiles,
}

/// The connection limits and timeouts, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u64,
    pub max_connections_per_peer: u64,
    pub handshake_timeout_secs: u64,
    /// 0: no idle timeout.
    pub idle_timeout_secs: u64,
}

/// Upper bound of both timeouts, in seconds (a day).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;

/// One volume to serve.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    pub options: OpenOptions,
    /// Who may open it.
    pub access: AccessPolicy,
}

/// The effective settings of `cryptvol serve`.
pub struct ServeSettings {
    /// Configured listeners (used unless systemd passes sockets).
    pub listeners: Vec<ListenerSpec>,
    /// Whether non-loopback TCP is allowed (also checked for inherited sockets): TLS is
    /// required, or `insecure`.
    pub allow_remote: bool,
    /// TLS is required on every connection (`--tls require`; filled by the TLS settings,
    /// false until then).
    pub tls_required: bool,
    /// `--insecure`: plaintext NBD allowed on non-loopback TCP.
    pub insecure: bool,
    /// The configuration used the deprecated `allow_remote` / `--allow-remote`.
    pub deprecated_allow_remote: bool,
    /// The default Unix socket is used: its directory and the mode to create it with.
    pub default_socket_dir: Option<(PathBuf, u32)>,
    pub limits: Limits,
    pub exports: Vec<ExportSpec>,
    /// `None`: `$CRYPTVOL_KEYSTORE`, else the built-in default.
    pub keystore: Option<PathBuf>,
    /// `None`: `audit.jsonl` in the keystore directory.
    pub audit_log: Option<PathBuf>,
    pub passphrase: Option<PassphraseSource>,
    pub max_inflight: u64,
    /// The control socket given (`--control` over the file's `control`); `None`: the
    /// default rule of `server::control::control_path`.
    pub control: Option<PathBuf>,
    /// `None`: TLS off.
    pub tls: Option<TlsSettings>,
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, path)
}

/// Parses configuration text; `path` is only used in messages.
pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Combines an optional file (with the path it was read from) and the command line.
pub fn resolve(
    file: Option<(&Path, ConfigFile)>,
    cli: CliOverrides,
) -> Result<ServeSettings, ConfigError> {
    let (origin, file) = match file {
        Some((p, f)) => (Some(p), f),
        None => (None, ConfigFile::default()),
    };
    let base = origin
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let in_file = |what: &str| match origin {
        Some(p) => format!("config file {}: {what}", p.display()),
        None => what.to_string(),
    };
    let listen = file.listen.unwrap_or_default();

    let socket_mode = match (cli.socket_mode, &listen.socket_mode) {
        (Some(m), _) => m,
        (None, Some(v)) => mode_value(v).map_err(|e| ConfigError::Invalid(in_file(&e)))?,
        (None, None) => DEFAULT_SOCKET_MODE,
    };
    let tls_file = file.tls.unwrap_or_default();
    let tls_mode = match (cli.tls, &tls_file.mode) {
        (Some(m), _) => m,
        (None, Some(m)) => TlsMode::parse(m)
            .map_err(|e| ConfigError::Invalid(in_file(&format!("tls.mode: {e}"))))?,
        (None, None) => TlsMode::Off,
    };
    let tls_cert = cli.tls_cert.or(tls_file.cert.map(|p| base.join(p)));
    let tls_key = cli.tls_key.or(tls_file.key.map(|p| base.join(p)));
    let tls_client_ca = cli
        .tls_client_ca
        .or(tls_file.client_ca.map(|p| base.join(p)));
    let tls = match (tls_mode, tls_cert, tls_key) {
        (TlsMode::Off, cert, key) => {
            if cert.is_some() || key.is_some() || tls_client_ca.is_some() {
                return Err(ConfigError::Invalid(in_file(
                    "TLS certificate files are given but TLS is off: add --tls on or \
                     --tls require (or mode in the [tls] section), or remove them",
                )));
            }
            None
        }
        (mode, Some(cert), Some(key)) => Some(TlsSettings {
            mode,
            files: TlsFiles {
                cert,
                key,
                client_ca: tls_client_ca,
            },
        }),
        (mode, _, _) => {
            return Err(ConfigError::Invalid(in_file(&format!(
                "--tls {} needs the server certificate and its private key: give \
                 --tls-cert FILE and --tls-key FILE (or cert and key in the [tls] section)",
                mode.as_str()
            ))))
        }
    };
    let tls_required = tls.as_ref().is_some_and(|t| t.mode == TlsMode::Require);
    let insecure = cli.insecure || listen.insecure || listen.allow_remote;
    let allow_remote = tls_required || insecure;
    let (tcp, mut unix) = if !cli.tcp.is_empty() || !cli.unix.is_empty() {
        (cli.tcp, cli.unix)
    } else {
        let unix = listen.unix.iter().map(|u| base.join(u)).collect();
        (listen.tcp, unix)
    };
    let mut default_socket_dir = None;
    if tcp.is_empty() && unix.is_empty() {
        let Some((path, dir_mode)) = cli.default_unix else {
            return Err(ConfigError::Invalid(in_file(
                "no listener configured and no default Unix socket for this user \
                 ($XDG_RUNTIME_DIR is not set): pass --unix PATH (or --tcp HOST:PORT)",
            )));
        };
        if let Some(dir) = path.parent() {
            default_socket_dir = Some((dir.to_path_buf(), dir_mode));
        }
        unix.push(path);
    }
    let limits = Limits {
        max_connections: count_setting(
            "max_connections",
            cli.max_connections.or(listen.max_connections),
            crate::server::DEFAULT_MAX_CONNECTIONS as u64,
        )
        .map_err(|e| ConfigError::Invalid(in_file(&e)))?,
        max_connections_per_peer: count_setting(
            "max_connections_per_peer",
            cli.max_connections_per_peer
                .or(listen.max_connections_per_peer),
            crate::server::DEFAULT_MAX_CONNECTIONS_PER_PEER as u64,
        )
        .map_err(|e| ConfigError::Invalid(in_file(&e)))?,
        handshake_timeout_secs: timeout_setting(
            "handshake_timeout",
            cli.handshake_timeout.or(listen.handshake_timeout),
            crate::server::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
            false,
        )
        .map_err(|e| ConfigError::Invalid(in_file(&e)))?,
        idle_timeout_secs: timeout_setting(
            "idle_timeout",
            cli.idle_timeout.or(listen.idle_timeout),
            0,
            true,
        )
        .map_err(|e| ConfigError::Invalid(in_file(&e)))?,
    };
    let mut listeners = Vec::new();
    for t in &tcp {
        let addr = parse_tcp(t).map_err(|e| ConfigError::Invalid(in_file(&e)))?;
        listeners.push(ListenerSpec::Tcp { addr, allow_remote });
    }
    for path in unix {
        listeners.push(ListenerSpec::Unix {
            path,
            mode: socket_mode,
        });
    }

    let mut exports: Vec<ExportSpec> = Vec::new();
    for e in file.exports {
        if e.name.is_empty() || e.path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(in_file(
                "an [[export]] has an empty name or path",
            )));
        }
        let access = file_policy(&e)
            .map_err(|m| ConfigError::Invalid(in_file(&format!("export {:?}: {m}", e.name))))?;
        add_export(
            &mut exports,
            ExportSpec {
                name: e.name,
                path: base.join(e.path),
                options: OpenOptions {
                    read_only: e.read_only || cli.read_only,
                    discard: e.discard || cli.discard,
                },
                access,
            },
        )?;
    }
    if cli.volumes.is_empty() && !cli.allow.is_empty() {
        return Err(ConfigError::Invalid(
            "the --allow-* options apply to the exports of VOLUME arguments, and none is given; \
             for the config file's exports set allow_uid, allow_gid, allow_tls_subject, \
             allow_tls_san or allow_anyone in their [[export]] tables"
                .to_string(),
        ));
    }
    let cli_access = cli_policy(&cli.allow).map_err(ConfigError::Invalid)?;
    for v in &cli.volumes {
        let (name, path) = parse_volume_arg(v).map_err(ConfigError::Invalid)?;
        let options = OpenOptions {
            read_only: cli.read_only,
            discard: cli.discard,
        };
        add_export(
            &mut exports,
            ExportSpec {
                name,
                path,
                options,
                access: cli_access.clone(),
            },
        )?;
    }
    if exports.is_empty() {
        return Err(ConfigError::Invalid(in_file(
            "nothing to serve: give VOLUME arguments or [[export]] tables in a --config file",
        )));
    }

    let max_inflight = match (cli.max_inflight, &file.max_inflight) {
        (Some(n), _) => n,
        (None, Some(v)) => size_value(v).map_err(|e| ConfigError::Invalid(in_file(&e)))?,
        (None, None) => DEFAULT_MAX_INFLIGHT,
    };
    let passphrase = cli.passphrase.or_else(|| {
        file.passphrase_file
            .map(|p| PassphraseSource::File(base.join(p)))
    });
    Ok(ServeSettings {
        listeners,
        allow_remote,
        tls_required,
        insecure: insecure && !tls_required,
        deprecated_allow_remote: listen.allow_remote,
        default_socket_dir,
        limits,
        exports,
        keystore: cli.keystore.or(file.keystore.map(|k| base.join(k))),
        audit_log: cli.audit_log.or(file.audit_log.map(|k| base.join(k))),
        passphrase,
        max_inflight,
        control: cli.control.or(file.control.map(|c| base.join(c))),
        tls,
    })
}

/// The Unix socket `cryptvol serve` listens on when nothing else is configured, and the
/// mode to create its directory with: for root `/run/cryptvol/nbd.sock` (0755: the
/// socket's own mode, 0600 by default, is what restricts access, and a group-shared
/// `socket_mode` keeps working); for other users `$XDG_RUNTIME_DIR/cryptvol/nbd.sock`
/// (0700). `None` for a user without an absolute `XDG_RUNTIME_DIR`.
pub fn default_unix_socket(
    is_root: bool,
    xdg_runtime_dir: Option<&std::ffi::OsStr>,
) -> Option<(PathBuf, u32)> {
    if is_root {
        return Some((PathBuf::from(DEFAULT_ROOT_SOCKET), 0o755));
    }
    let dir = Path::new(xdg_runtime_dir?);
    dir.is_absolute()
        .then(|| (dir.join("cryptvol").join("nbd.sock"), 0o700))
}

fn count_setting(name: &str, v: Option<u64>, default: u64) -> Result<u64, String> {
    match v {
        None => Ok(default),
        Some(0) => Err(format!("{name} must be at least 1")),
        Some(n) if n > 1_000_000 => Err(format!("{name} {n} is too large (at most 1000000)")),
        Some(n) => Ok(n),
    }
}

fn timeout_setting(name: &str, v: Option<u64>, default: u64, zero_ok: bool) -> Result<u64, String> {
    match v {
        None => Ok(default),
        Some(0) if !zero_ok => Err(format!("{name} must be at least 1 second")),
        Some(n) if n > MAX_TIMEOUT_SECS => Err(format!(
            "{name} {n} is too long (at most {MAX_TIMEOUT_SECS} seconds)"
        )),
        Some(n) => Ok(n),
    }
}

/// The access policy of an `[[export]]` table.
fn file_policy(e: &ExportSection) -> Result<AccessPolicy, String> {
    let ids = |values: &[toml::Value], key: &str, kind: IdKind| {
        values
            .iter()
            .map(|v| match v {
                toml::Value::Integer(i) => u32::try_from(*i)
                    .map_err(|_| format!("{key}: {i} is not a valid {}", kind.id_name())),
                toml::Value::String(s) => resolve_id(s, kind).map_err(|m| format!("{key}: {m}")),
                other => Err(format!(
                    "{key}: expected {} names or numbers, not {}",
                    kind.noun(),
                    other.type_str()
                )),
            })
            .collect::<Result<Vec<u32>, String>>()
    };
    let policy = AccessPolicy {
        allow_uid: ids(&e.allow_uid, "allow_uid", IdKind::User)?,
        allow_gid: ids(&e.allow_gid, "allow_gid", IdKind::Group)?,
        allow_tls_subject: e.allow_tls_subject.clone(),
        allow_tls_san: e.allow_tls_san.clone(),
        allow_anyone: e.allow_anyone,
    };
    check_tls_lists(&policy, "allow_tls_subject", "allow_tls_san")?;
    Ok(policy)
}

/// The access policy the `--allow-*` flags give.
fn cli_policy(a: &AllowFlags) -> Result<AccessPolicy, String> {
    let ids = |values: &[String], flag: &str, kind: IdKind| {
        values
            .iter()
            .map(|s| resolve_id(s, kind).map_err(|m| format!("{flag}: {m}")))
            .collect::<Result<Vec<u32>, String>>()
    };
    let policy = AccessPolicy {
        allow_uid: ids(&a.uid, "--allow-uid", IdKind::User)?,
        allow_gid: ids(&a.gid, "--allow-gid", IdKind::Group)?,
        allow_tls_subject: a.tls_subject.clone(),
        allow_tls_san: a.tls_san.clone(),
        allow_anyone: a.anyone,
    };
    check_tls_lists(&policy, "--allow-tls-subject", "--allow-tls-san")?;
    Ok(policy)
}

/// SAN kinds a client certificate's names are written with.
const SAN_PREFIXES: [&str; 4] = ["DNS:", "EMAIL:", "IP:", "URI:"];

/// Subjects must be non-empty; SANs must name their kind, or they could never match.
fn check_tls_lists(p: &AccessPolicy, subject_key: &str, san_key: &str) -> Result<(), String> {
    if p.allow_tls_subject.iter().any(|s| s.trim().is_empty()) {
        return Err(format!(
            "{subject_key}: an empty subject; write it like \"CN=client1,O=Example\""
        ));
    }
    for san in &p.allow_tls_san {
        let ok = SAN_PREFIXES
            .iter()
            .any(|pre| san.len() > pre.len() && san.starts_with(pre));
        if !ok {
            return Err(format!(
                "{san_key}: {san:?} does not start with one of {}; write e.g. \
                 \"DNS:client.example.org\" or \"IP:192.0.2.7\"",
                SAN_PREFIXES.join(" ")
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum IdKind {
    User,
    Group,
}

impl IdKind {
    fn noun(self) -> &'static str {
        match self {
            IdKind::User => "user",
            IdKind::Group => "group",
        }
    }
    fn id_name(self) -> &'static str {
        match self {
            IdKind::User => "uid",
            IdKind::Group => "gid",
        }
    }
}

/// A user or group given by number or by name (looked up in the user database now).
fn resolve_id(s: &str, kind: IdKind) -> Result<u32, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u32>()
            .map_err(|_| format!("{s} is not a valid {}", kind.id_name()));
    }
    let found = match kind {
        IdKind::User => nix::unistd::User::from_name(s).map(|u| u.map(|u| u.uid.as_raw())),
        IdKind::Group => nix::unistd::Group::from_name(s).map(|g| g.map(|g| g.gid.as_raw())),
    };
    match found {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(format!(
            "no {} named {:?} on this host; give a name or a numeric {}",
            kind.noun(),
            s,
            kind.id_name()
        )),
        Err(e) => Err(format!("cannot look up the {} {s:?}: {e}", kind.noun())),
    }
}

fn add_export(exports: &mut Vec<ExportSpec>, e: ExportSpec) -> Result<(), ConfigError> {
    if exports.iter().any(|x| x.name == e.name) {
        return Err(ConfigError::Invalid(format!(
            "export name {:?} is used twice; name volumes explicitly with NAME=FILE",
            e.name
        )));
    }
    exports.push(e);
    Ok(())
}

/// Splits `NAME=FILE` or `FILE` (export name = file stem) into export name and path.
pub fn parse_volume_arg(s: &str) -> Result<(String, PathBuf), String> {
    if let Some((name, file)) = s.split_once('=') {
        if name.is_empty() || file.is_empty() {
            return Err(format!("invalid volume {s:?}: expected FILE or NAME=FILE"));
        }
        return Ok((name.to_string(), PathBuf::from(file)));
    }
    let path = PathBuf::from(s);
    let stem = path
        .file_stem()
        .and_then(|x| x.to_str())
        .filter(|x| !x.is_empty())
        .ok_or_else(|| format!("cannot derive an export name from {s:?}; use NAME=FILE"))?
        .to_string();
    Ok((stem, path))
}

/// Resolves `HOST:PORT` to one socket address.
pub fn parse_tcp(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("invalid TCP address {s:?} ({e}): expected HOST:PORT"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// Parses an octal permission string such as `0600` or `0o660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| !digits.is_empty() && *m <= 0o777)
        .ok_or_else(|| format!("invalid mode {s:?}: expected octal like 0600"))
}

fn mode_value(v: &toml::Value) -> Result<u32, String> {
    match v {
        toml::Value::String(s) => parse_mode(s).map_err(|e| format!("listen.socket_mode: {e}")),
        toml::Value::Integer(i) => {
            u32::try_from(*i)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    format!(
                    "listen.socket_mode: {i} is not a permission mode (write \"0600\" or 0o600)"
                )
                })
        }
        other => Err(format!(
            "listen.socket_mode: expected a string like \"0600\", not {}",
            other.type_str()
        )),
    }
}

fn size_value(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::String(s) => parse_size(s).map_err(|e| format!("max_inflight: {e}")),
        toml::Value::Integer(i) => {
            u64::try_from(*i).map_err(|_| format!("max_inflight: {i} is negative"))
        }
        other => Err(format!(
            "max_inflight: expected a size like \"64M\" or a number of bytes, not {}",
            other.type_str()
        )),
    }
    .and_then(|n| {
        if n == 0 {
            Err("max_inflight must be greater than zero".to_string())
        } else {
            Ok(n)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
keystore = "keys"
passphrase_file = "/etc/cryptvol/pass"
audit_log = "/var/log/cryptvol/audit.jsonl"
max_inflight = "128M"

[listen]
tcp = ["127.0.0.1:10809", "[::1]:10810"]
unix = ["/run/cryptvol/nbd.sock"]
socket_mode = "0660"
insecure = false
max_connections = 100
max_connections_per_peer = 8
handshake_timeout = 10
idle_timeout = 600

[[export]]
name = "data"
path = "data.img"

[[export]]
name = "backup"
path = "/srv/backup.img"
read_only = true
discard = true
"#;

    fn file(text: &str) -> ConfigFile {
        parse(text, Path::new("/etc/cryptvol/cryptvol.toml")).expect("valid config")
    }

    fn resolve_full(cli: CliOverrides) -> Result<ServeSettings, ConfigError> {
        resolve(
            Some((Path::new("/etc/cryptvol/cryptvol.toml"), file(FULL))),
            cli,
        )
    }

    fn with_default_socket() -> CliOverrides {
        CliOverrides {
            default_unix: Some(("/tmp/d/nbd.sock".into(), 0o700)),
            ..CliOverrides::default()
        }
    }

    fn tcp_addrs(s: &ServeSettings) -> Vec<String> {
        s.listeners
            .iter()
            .filter_map(|l| match l {
                ListenerSpec::Tcp { addr, .. } => Some(addr.to_string()),
                ListenerSpec::Unix { .. } => None,
            })
            .collect()
    }

    fn unix_paths(s: &ServeSettings) -> Vec<(PathBuf, u32)> {
        s.listeners
            .iter()
            .filter_map(|l| match l {
                ListenerSpec::Unix { path, mode } => Some((path.clone(), *mode)),
                ListenerSpec::Tcp { .. } => None,
            })
            .collect()
    }

    #[test]
    fn full_file_resolves_with_paths_relative_to_the_file() {
        let s = resolve_full(CliOverrides::default()).expect("resolves");
        assert_eq!(tcp_addrs(&s), ["127.0.0.1:10809", "[::1]:10810"]);
        assert_eq!(
            unix_paths(&s),
            [(PathBuf::from("/run/cryptvol/nbd.sock"), 0o660)]
        );
        assert_eq!(s.keystore, Some(PathBuf::from("/etc/cryptvol/keys")));
        assert_eq!(
            s.audit_log,
            Some(PathBuf::from("/var/log/cryptvol/audit.jsonl"))
        );
        assert!(
            matches!(&s.passphrase, Some(PassphraseSource::File(p)) if p == Path::new("/etc/cryptvol/pass"))
        );
        assert_eq!(s.max_inflight, 128 << 20);
        assert_eq!(s.exports.len(), 2);
        assert_eq!(s.exports[0].name, "data");
        assert_eq!(s.exports[0].path, PathBuf::from("/etc/cryptvol/data.img"));
        assert!(!s.exports[0].options.read_only && !s.exports[0].options.discard);
        assert_eq!(s.exports[1].path, PathBuf::from("/srv/backup.img"));
        assert!(s.exports[1].options.read_only && s.exports[1].options.discard);
        assert!(!s.allow_remote);
        assert_eq!(
            s.limits,
            Limits {
                max_connections: 100,
                max_connections_per_peer: 8,
                handshake_timeout_secs: 10,
                idle_timeout_secs: 600,
            }
        );
        assert!(s.default_socket_dir.is_none());
    }

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
                    .err()
                    .expect("invalid"),
            };
            assert!(err.to_string().contains("/x/c.toml"), "{err}");
        }
    }

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
        let err = resolve_full(cli).err().expect("duplicate");
        assert!(err.to_string().contains("\"data\" is used twice"), "{err}");
    }

    #[test]
    fn cli_listeners_replace_the_files() {
        let cli = CliOverrides {
            unix: vec!["/tmp/s.sock".into()],
            ..CliOverrides::default()
        };
        let s = resolve_full(cli).expect("resolves");
        assert!(tcp_addrs(&s).is_empty());
        // The file's socket_mode still applies to CLI sockets unless --socket-mode is given.
        assert_eq!(unix_paths(&s), [(PathBuf::from("/tmp/s.sock"), 0o660)]);
        let cli = CliOverrides {
            tcp: vec!["127.0.0.1:7000".into()],
            socket_mode: Some(0o600),
            ..CliOverrides::default()
        };
        let s = resolve_full(cli).expect("resolves");
        assert_eq!(tcp_addrs(&s), ["127.0.0.1:7000"]);
        assert!(unix_paths(&s).is_empty());
    }

    #[test]
    fn cli_scalars_override_the_file() {
        let cli = CliOverrides {
            max_inflight: Some(1 << 20),
            keystore: Some("/k".into()),
            audit_log: Some("/a.jsonl".into()),
            passphrase: Some(PassphraseSource::Fd(5)),
            insecure: true,
            max_connections: Some(7),
            idle_timeout: Some(0),
            ..CliOverrides::default()
        };
        let s = resolve_full(cli).expect("resolves");
        assert_eq!(s.limits.max_connections, 7);
        assert_eq!(s.limits.max_connections_per_peer, 8);
        assert_eq!(s.limits.idle_timeout_secs, 0);
        assert!(s.insecure && !s.deprecated_allow_remote);
        assert_eq!(s.max_inflight, 1 << 20);
        assert_eq!(s.keystore, Some(PathBuf::from("/k")));
        assert_eq!(s.audit_log, Some(PathBuf::from("/a.jsonl")));
        assert!(matches!(s.passphrase, Some(PassphraseSource::Fd(5))));
        assert!(s.allow_remote);
        assert!(s.listeners.iter().all(|l| !matches!(
            l,
            ListenerSpec::Tcp {
                allow_remote: false,
                ..
            }
        )));
    }

    #[test]
    fn control_socket_from_file_or_flag() {
        let text = "control = \"run/ctl.sock\"\n[[export]]\nname = \"v\"\npath = \"v.img\"\n";
        let file = parse(text, Path::new("/etc/cv/c.toml")).expect("parses");
        let s = resolve(
            Some((Path::new("/etc/cv/c.toml"), file)),
            with_default_socket(),
        )
        .expect("resolves");
        assert_eq!(s.control, Some(PathBuf::from("/etc/cv/run/ctl.sock")));
        let file = parse(text, Path::new("/etc/cv/c.toml")).expect("parses");
        let cli = CliOverrides {
            control: Some("/tmp/c.sock".into()),
            ..with_default_socket()
        };
        let s = resolve(Some((Path::new("/etc/cv/c.toml"), file)), cli).expect("resolves");
        assert_eq!(s.control, Some(PathBuf::from("/tmp/c.sock")));
    }

    #[test]
    fn defaults_without_a_file() {
        let cli = CliOverrides {
            volumes: vec!["v.img".into()],
            ..CliOverrides::default()
        };
        let err = resolve(None, cli).err().expect("no default socket");
        assert!(err.to_string().contains("--unix PATH"), "{err}");
        let cli = CliOverrides {
            volumes: vec!["v.img".into()],
            default_unix: default_unix_socket(true, None),
            ..CliOverrides::default()
        };
        let s = resolve(None, cli).expect("resolves");
        // No TCP unless asked for: only the root default Unix socket, mode 0600.
        assert!(tcp_addrs(&s).is_empty());
        assert_eq!(
            unix_paths(&s),
            [(PathBuf::from(DEFAULT_ROOT_SOCKET), DEFAULT_SOCKET_MODE)]
        );
        assert_eq!(
            s.default_socket_dir,
            Some((PathBuf::from("/run/cryptvol"), 0o755))
        );
        assert!(!s.allow_remote && !s.insecure);
        assert_eq!(
            s.limits,
            Limits {
                max_connections: 256,
                max_connections_per_peer: 32,
                handshake_timeout_secs: 30,
                idle_timeout_secs: 0,
            }
        );
        assert_eq!(s.max_inflight, DEFAULT_MAX_INFLIGHT);
        assert!(s.keystore.is_none() && s.passphrase.is_none() && s.audit_log.is_none());
        assert_eq!(s.exports[0].name, "v");
        assert_eq!(s.exports[0].path, PathBuf::from("v.img"));
    }

    #[test]
    fn default_socket_of_a_user_is_in_the_runtime_directory() {
        assert_eq!(
            default_unix_socket(false, Some(std::ffi::OsStr::new("/run/user/1000"))),
            Some((PathBuf::from("/run/user/1000/cryptvol/nbd.sock"), 0o700))
        );
        assert_eq!(default_unix_socket(false, None), None);
        assert_eq!(
            default_unix_socket(false, Some(std::ffi::OsStr::new("relative"))),
            None
        );
    }

    #[test]
    fn non_loopback_tcp_needs_insecure_and_allow_remote_still_works() {
        let text = "[[export]]\nname=\"a\"\npath=\"/a\"\n[listen]\ntcp=[\"0.0.0.0:10809\"]\n";
        let s = resolve(
            Some((Path::new("/c.toml"), file(text))),
            CliOverrides::default(),
        )
        .expect("ok");
        assert!(matches!(
            s.listeners[..],
            [ListenerSpec::Tcp {
                allow_remote: false,
                ..
            }]
        ));
        let old = format!("{text}allow_remote = true\n");
        let s = resolve(
            Some((Path::new("/c.toml"), file(&old))),
            CliOverrides::default(),
        )
        .expect("ok");
        assert!(s.allow_remote && s.insecure && s.deprecated_allow_remote);
        let new = format!("{text}insecure = true\n");
        let s = resolve(
            Some((Path::new("/c.toml"), file(&new))),
            CliOverrides::default(),
        )
        .expect("ok");
        assert!(s.allow_remote && s.insecure && !s.deprecated_allow_remote);
    }

    #[test]
    fn limits_are_bounded() {
        for bad in [
            "max_connections = 0\n",
            "max_connections_per_peer = 0\n",
            "handshake_timeout = 0\n",
            "handshake_timeout = 100000\n",
            "idle_timeout = 100000\n",
            "max_connections = 10000000\n",
        ] {
            let text =
                format!("[[export]]\nname=\"a\"\npath=\"/a\"\n[listen]\nunix=[\"/s\"]\n{bad}");
            let err = resolve(
                Some((Path::new("/c.toml"), file(&text))),
                CliOverrides::default(),
            )
            .err()
            .expect(bad);
            assert!(err.to_string().contains("/c.toml"), "{err}");
        }
    }

    #[test]
    fn nothing_to_serve_is_an_error() {
        let err = resolve(None, with_default_socket())
            .err()
            .expect("no exports");
        assert!(err.to_string().contains("nothing to serve"), "{err}");
        let f = file("[listen]\nunix = [\"/tmp/s\"]\n");
        let err = resolve(Some((Path::new("/c.toml"), f)), CliOverrides::default())
            .err()
            .expect("no exports");
        assert!(err.to_string().contains("[[export]]"), "{err}");
    }

    #[test]
    fn modes_and_sizes_in_either_form() {
        let f = file("max_inflight = 1048576\n[listen]\nsocket_mode = 0o640\n[[export]]\nname=\"a\"\npath=\"/a\"\n");
        let cli = CliOverrides {
            default_unix: Some(("/tmp/d/nbd.sock".into(), 0o700)),
            ..CliOverrides::default()
        };
        let s = resolve(Some((Path::new("/c.toml"), f)), cli).expect("ok");
        assert_eq!(s.max_inflight, 1 << 20);
        assert_eq!(unix_paths(&s), [(PathBuf::from("/tmp/d/nbd.sock"), 0o640)]);
        for bad in [
            "max_inflight = -1\n",
            "max_inflight = 0\n",
            "max_inflight = \"lots\"\n",
            "[listen]\nsocket_mode = \"0999\"\nunix=[\"/s\"]\n",
            "[listen]\nsocket_mode = 4096\nunix=[\"/s\"]\n",
            "[listen]\nsocket_mode = true\nunix=[\"/s\"]\n",
        ] {
            let text = format!("{bad}[[export]]\nname=\"a\"\npath=\"/a\"\n");
            // Tables must follow top-level keys, so put the export first when [listen] is used.
            let text = if bad.starts_with('[') {
                format!("[[export]]\nname=\"a\"\npath=\"/a\"\n{bad}")
            } else {
                text
            };
            let f = file(&text);
            let err = resolve(Some((Path::new("/c.toml"), f)), with_default_socket())
                .err()
                .expect(bad);
            assert!(err.to_string().contains("/c.toml"), "{err}");
        }
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
            .err()
            .expect(bad);
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
        let err = resolve_full(cli).err().expect("flags without volumes");
        assert!(err.to_string().contains("[[export]]"), "{err}");

        let cli = CliOverrides {
            volumes: vec!["/tmp/v.img".into()],
            allow: AllowFlags {
                uid: vec!["no-such-user-cryptvol".into()],
                ..AllowFlags::default()
            },
            ..with_default_socket()
        };
        let err = resolve(None, cli).err().expect("unknown user");
        assert!(err.to_string().contains("--allow-uid"), "{err}");
    }

    #[test]
    fn parse_mode_accepts_octal_only() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("0o660"), Ok(0o660));
        assert_eq!(parse_mode("777"), Ok(0o777));
        for bad in ["", "0o", "0800", "1000", "rw", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
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

    #[test]
    fn the_shipped_example_parses_and_resolves() {
        let text = include_str!("../systemd/cryptvol.toml.example");
        let f = parse(text, Path::new("/etc/cryptvol/cryptvol.toml")).expect("example parses");
        let s = resolve(
            Some((Path::new("/etc/cryptvol/cryptvol.toml"), f)),
            CliOverrides::default(),
        )
        .expect("example resolves");
        assert!(!s.exports.is_empty());
        assert!(!s.listeners.is_empty());
    }

    const TLS_FILE: &str = r#"
[tls]
mode = "require"
cert = "tls/server-cert.pem"
key = "/etc/ssl/private/server-key.pem"
client_ca = "tls/ca.pem"

[[export]]
name = "data"
path = "data.img"
"#;

    #[test]
    fn tls_section_resolves_with_paths_relative_to_the_file() {
        let path = Path::new("/etc/cryptvol/cryptvol.toml");
        let s = resolve(Some((path, file(TLS_FILE))), with_default_socket()).expect("resolves");
        assert_eq!(
            s.tls,
            Some(TlsSettings {
                mode: TlsMode::Require,
                files: TlsFiles {
                    cert: "/etc/cryptvol/tls/server-cert.pem".into(),
                    key: "/etc/ssl/private/server-key.pem".into(),
                    client_ca: Some("/etc/cryptvol/tls/ca.pem".into()),
                },
            })
        );
        // The command line overrides each key.
        let cli = CliOverrides {
            tls: Some(TlsMode::On),
            tls_cert: Some("/c.pem".into()),
            ..with_default_socket()
        };
        let s = resolve(Some((path, file(TLS_FILE))), cli).expect("resolves");
        let tls = s.tls.expect("tls");
        assert_eq!(tls.mode, TlsMode::On);
        assert_eq!(tls.files.cert, PathBuf::from("/c.pem"));
        assert_eq!(
            tls.files.key,
            PathBuf::from("/etc/ssl/private/server-key.pem")
        );
    }

    #[test]
    fn tls_is_off_by_default() {
        let s = resolve_full(CliOverrides::default()).expect("resolves");
        assert_eq!(s.tls, None);
    }

    #[test]
    fn tls_on_without_certificate_and_key_is_a_clear_error() {
        for (cert, key) in [(None, None), (Some("/c.pem"), None), (None, Some("/k.pem"))] {
            let cli = CliOverrides {
                tls: Some(TlsMode::Require),
                tls_cert: cert.map(PathBuf::from),
                tls_key: key.map(PathBuf::from),
                volumes: vec!["/v.img".into()],
                ..CliOverrides::default()
            };
            let e = resolve(None, cli).err().expect("refused").to_string();
            assert!(
                e.contains("--tls require needs") && e.contains("--tls-key"),
                "{e}"
            );
        }
    }

    #[test]
    fn tls_files_with_tls_off_are_refused() {
        let cli = CliOverrides {
            tls_client_ca: Some("/ca.pem".into()),
            volumes: vec!["/v.img".into()],
            ..CliOverrides::default()
        };
        let e = resolve(None, cli).err().expect("refused").to_string();
        assert!(e.contains("TLS is off"), "{e}");
    }

    #[test]
    fn tls_mode_and_unknown_tls_keys_are_checked() {
        let bad = "[tls]\nmode = \"maybe\"\n[[export]]\nname = \"d\"\npath = \"d.img\"\n";
        let e = resolve(
            Some((Path::new("/x.toml"), file(bad))),
            CliOverrides::default(),
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("tls.mode") && e.contains("maybe"), "{e}");
        let e = parse("[tls]\ncertificate = \"x\"\n", Path::new("/x.toml"))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("certificate"), "{e}");
    }
}
