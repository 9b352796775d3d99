//! The `cryptvol serve` configuration file (TOML) and how it combines with the command line.
//!
//! The file (see `systemd/cryptvol.toml.example`) holds the listeners, the exports, the
//! keystore directory, an optional passphrase file and the in-flight memory budget. The
//! command line combines with it as follows (documented in `docs/attach.md`):
//!
//! - exports: the file's `[[export]]` tables, then every `VOLUME` argument (added); an export
//!   name used twice is an error. `--read-only` / `--discard` apply to every export.
//! - listeners: any `--tcp` or `--unix` flag replaces the file's `[listen]` addresses; with
//!   none anywhere, `127.0.0.1:10809`. Sockets passed by systemd socket activation replace
//!   all of them (see `server::systemd`).
//! - scalars (`--socket-mode`, `--max-inflight`, `--keystore`, `--audit-log`, a passphrase
//!   option) override the file; `--allow-remote` is or-ed with the file's `allow_remote`.
//! - TLS: `--tls`, `--tls-cert`, `--tls-key`, `--tls-client-ca` each override the file's
//!   `[tls]` key of the same name (`mode`, `cert`, `key`, `client_ca`).
//! - relative paths in the file are relative to the directory of the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::keys::PassphraseSource;
use crate::nbd::TlsMode;
use crate::server::{ListenerSpec, TlsFiles};
use crate::size::parse_size;
use crate::volume::OpenOptions;

/// The configuration file the systemd unit passes to `cryptvol serve --config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cryptvol/cryptvol.toml";
/// The listener used when neither the file nor the command line names one.
pub const DEFAULT_TCP: &str = "127.0.0.1:10809";
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
    /// Allow TCP listeners on non-loopback addresses.
    #[serde(default)]
    pub allow_remote: bool,
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
}

/// What the command line says, before combining with a file.
#[derive(Default)]
pub struct CliOverrides {
    pub tcp: Vec<String>,
    pub unix: Vec<PathBuf>,
    pub socket_mode: Option<u32>,
    pub allow_remote: bool,
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

/// One volume to serve.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    pub options: OpenOptions,
}

/// The effective settings of `cryptvol serve`.
pub struct ServeSettings {
    /// Configured listeners (used unless systemd passes sockets).
    pub listeners: Vec<ListenerSpec>,
    /// Whether non-loopback TCP is allowed (also checked for inherited sockets).
    pub allow_remote: bool,
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
    let allow_remote = cli.allow_remote || listen.allow_remote;
    let (tcp, unix) = if !cli.tcp.is_empty() || !cli.unix.is_empty() {
        (cli.tcp, cli.unix)
    } else {
        let unix = listen.unix.iter().map(|u| base.join(u)).collect();
        (listen.tcp, unix)
    };
    let tcp = if tcp.is_empty() && unix.is_empty() {
        vec![DEFAULT_TCP.to_string()]
    } else {
        tcp
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
        add_export(
            &mut exports,
            ExportSpec {
                name: e.name,
                path: base.join(e.path),
                options: OpenOptions {
                    read_only: e.read_only || cli.read_only,
                    discard: e.discard || cli.discard,
                },
            },
        )?;
    }
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
    let passphrase = cli.passphrase.or_else(|| {
        file.passphrase_file
            .map(|p| PassphraseSource::File(base.join(p)))
    });
    Ok(ServeSettings {
        listeners,
        allow_remote,
        exports,
        keystore: cli.keystore.or(file.keystore.map(|k| base.join(k))),
        audit_log: cli.audit_log.or(file.audit_log.map(|k| base.join(k))),
        passphrase,
        max_inflight,
        control: cli.control.or(file.control.map(|c| base.join(c))),
        tls,
    })
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
allow_remote = false

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
                Ok(f) => resolve(Some((Path::new("/x/c.toml"), f)), CliOverrides::default())
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
            allow_remote: true,
            ..CliOverrides::default()
        };
        let s = resolve_full(cli).expect("resolves");
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
            CliOverrides::default(),
        )
        .expect("resolves");
        assert_eq!(s.control, Some(PathBuf::from("/etc/cv/run/ctl.sock")));
        let file = parse(text, Path::new("/etc/cv/c.toml")).expect("parses");
        let cli = CliOverrides {
            control: Some("/tmp/c.sock".into()),
            ..CliOverrides::default()
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
        let s = resolve(None, cli).expect("resolves");
        assert_eq!(tcp_addrs(&s), [DEFAULT_TCP]);
        assert_eq!(s.max_inflight, DEFAULT_MAX_INFLIGHT);
        assert!(s.keystore.is_none() && s.passphrase.is_none() && s.audit_log.is_none());
        assert_eq!(s.exports[0].name, "v");
        assert_eq!(s.exports[0].path, PathBuf::from("v.img"));
    }

    #[test]
    fn nothing_to_serve_is_an_error() {
        let err = resolve(None, CliOverrides::default())
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
        let s = resolve(Some((Path::new("/c.toml"), f)), CliOverrides::default()).expect("ok");
        assert_eq!(s.max_inflight, 1 << 20);
        assert_eq!(s.listeners.len(), 1); // default TCP; mode unused but valid
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
            let err = resolve(Some((Path::new("/c.toml"), f)), CliOverrides::default())
                .err()
                .expect(bad);
            assert!(err.to_string().contains("/c.toml"), "{err}");
        }
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
        let s = resolve(Some((path, file(TLS_FILE))), CliOverrides::default()).expect("resolves");
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
            ..CliOverrides::default()
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
