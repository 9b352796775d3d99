//! The connection limits and timeouts of the `[listen]` section and their flags:
//! defaults, and bounds.

use super::file::ListenSection;
use super::overrides::CliOverrides;
use super::resolve::Origin;
use super::settings::{Limits, MAX_TIMEOUT_SECS};
use super::ConfigError;

/// Each limit: its flag, else the file's key, else the server's default; bounded.
pub(super) fn resolve_limits(
    origin: &Origin,
    cli: &CliOverrides,
    listen: &ListenSection,
) -> Result<Limits, ConfigError> {
    let checked = |r: Result<u64, String>| r.map_err(|e| origin.invalid(&e));
    Ok(Limits {
        max_connections: checked(count_setting(
            "max_connections",
            cli.max_connections.or(listen.max_connections),
            crate::server::DEFAULT_MAX_CONNECTIONS as u64,
        ))?,
        max_connections_per_peer: checked(count_setting(
            "max_connections_per_peer",
            cli.max_connections_per_peer
                .or(listen.max_connections_per_peer),
            crate::server::DEFAULT_MAX_CONNECTIONS_PER_PEER as u64,
        ))?,
        handshake_timeout_secs: checked(timeout_setting(
            "handshake_timeout",
            cli.handshake_timeout.or(listen.handshake_timeout),
            crate::server::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
            false,
        ))?,
        idle_timeout_secs: checked(timeout_setting(
            "idle_timeout",
            cli.idle_timeout.or(listen.idle_timeout),
            0,
            true,
        ))?,
    })
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
