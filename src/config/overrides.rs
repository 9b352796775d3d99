//! What the command line of `cryptvol serve` says, before it is combined with a file.

use std::path::PathBuf;

use crate::keys::PassphraseSource;
use crate::nbd::TlsMode;
use crate::volume::EngineChoice;

/// The `--allow-*` flags (they apply to the exports of `VOLUME` arguments).
#[derive(Debug, Default)]
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
    pub(super) fn is_empty(&self) -> bool {
        self.uid.is_empty()
            && self.gid.is_empty()
            && self.tls_subject.is_empty()
            && self.tls_san.is_empty()
            && !self.anyone
    }
}

/// What the command line says, before combining with a file.
#[derive(Debug, Default)]
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
    /// `--metrics HOST:PORT`.
    pub metrics: Option<String>,
    /// The Unix socket (and the mode of its directory) to use when no listener is
    /// configured: [`super::default_unix_socket`]. `None`: no default, an error.
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
    /// `--engine`.
    pub engine: Option<EngineChoice>,
    /// `--direct`.
    pub direct: bool,
}
