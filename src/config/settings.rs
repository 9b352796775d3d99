//! The effective settings of `cryptvol serve`: what [`super::resolve`] produces.

use std::path::PathBuf;

use crate::keys::PassphraseSource;
use crate::nbd::TlsMode;
use crate::server::{AccessPolicy, ListenerSpec, TlsFiles};
use crate::volume::{EngineChoice, OpenOptions};

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
#[derive(Debug)]
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
    /// The metrics endpoint's `HOST:PORT` (`--metrics` over the file's `metrics`);
    /// `None`: no metrics served.
    pub metrics: Option<String>,
    /// The backing files' engine (`--engine` over the file's `engine`), also in every
    /// export's open options.
    pub engine: EngineChoice,
    /// `O_DIRECT` data I/O (`--direct` or the file's `direct`), also in every export's
    /// open options.
    pub direct: bool,
    /// `None`: TLS off.
    pub tls: Option<TlsSettings>,
}
