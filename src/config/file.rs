//! The configuration file as written: the TOML model (unknown keys refused) and reading
//! and parsing it. Values stay raw here; [`super::resolve`] interprets them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

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
    /// Form of the log output: "text", "json" or "journald" (`--log-format` overrides
    /// it; read by `cli::logging` before anything else).
    pub log_format: Option<String>,
    /// `HOST:PORT` of the Prometheus metrics endpoint (`GET /metrics`) [default: none].
    pub metrics: Option<String>,
    /// The backing files' engine: "auto", "threads" or "uring" (`--engine` overrides it).
    pub engine: Option<String>,
    /// Read and write the backing files' data with O_DIRECT (`--direct` turns it on).
    pub direct: Option<bool>,
    /// The snapshot store of the `snapshot` commands and `create --from-snapshot`
    /// (file:///DIR, DIR or s3://BUCKET/PREFIX).
    pub snapshot_store: Option<String>,
    /// Which keys the commands use (`[keys]`).
    pub keys: Option<KeysSection>,
    /// Where to listen.
    pub listen: Option<ListenSection>,
    /// TLS on the listeners.
    pub tls: Option<TlsSection>,
    /// The volumes to serve.
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportSection>,
}

/// `[keys]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// The key `create` and `import` wrap a new data key under when given no `--key`
    /// (a key reference, read like `--key`).
    pub default_key: Option<String>,
    /// What a bare `alias/NAME` or key id (UUID) names: "local" (default) or "aws-kms".
    pub bare_key_refs: Option<String>,
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
