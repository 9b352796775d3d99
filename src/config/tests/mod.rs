//! Unit tests of the configuration: parsing the file and resolving it with the command
//! line, by topic. Shared here: a full example file and helpers to look at listeners.

use std::path::{Path, PathBuf};

use super::*;
use crate::keys::PassphraseSource;
use crate::nbd::TlsMode;
use crate::server::{AccessPolicy, ListenerSpec, TlsFiles};

mod direct;
mod exports;
mod file;
mod listen;
mod settings;
mod tls;

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
