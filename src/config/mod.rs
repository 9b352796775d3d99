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
//!
//! The same file also holds the settings of every other command (keystore, audit log,
//! default key, bare key references, snapshot store): see `common`.
//!
//! Modules: `file` (the TOML model, reading and parsing), `overrides` (the command
//! line), `settings` (the result), `resolve` (combining them, one section at a time:
//! `listen`, `tls`, `limits`, `exports`, with `access` for who may open an export), and
//! `diff` (what a reload on SIGHUP changes, and the export of an `export-add` request).

mod access;
mod common;
mod diff;
mod exports;
mod file;
mod limits;
mod listen;
mod overrides;
mod resolve;
mod settings;
mod tls;

pub use common::{config_path, load_common, CommonSettings, CONFIG_ENV};
pub use diff::{diff_exports, same_export, spec_from_add, ExportDiff};
pub use exports::parse_volume_arg;
pub use file::{load, parse, ConfigFile, ExportSection, KeysSection, ListenSection, TlsSection};
pub use listen::{default_unix_socket, parse_mode, parse_tcp};
pub use overrides::{AllowFlags, CliOverrides};
pub use resolve::resolve;
pub use settings::{ExportSpec, Limits, ServeSettings, TlsSettings, MAX_TIMEOUT_SECS};

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

#[cfg(test)]
mod tests;
