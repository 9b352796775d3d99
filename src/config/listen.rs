//! Where `cryptvol serve` listens: the `[listen]` addresses or the `--tcp`/`--unix`
//! flags that replace them, the default Unix socket when there are none, and the
//! permissions of Unix sockets.

use std::path::{Path, PathBuf};

use super::file::ListenSection;
use super::overrides::CliOverrides;
use super::resolve::Origin;
use super::{ConfigError, DEFAULT_ROOT_SOCKET, DEFAULT_SOCKET_MODE};
use crate::server::ListenerSpec;

/// The listener addresses chosen, not yet parsed.
pub(super) struct Addresses {
    tcp: Vec<String>,
    unix: Vec<PathBuf>,
    /// The default Unix socket is used: its directory and the mode to create it with.
    pub(super) default_socket_dir: Option<(PathBuf, u32)>,
}

/// The mode of Unix sockets: `--socket-mode`, else the file's `socket_mode`, else 0600.
pub(super) fn socket_mode(
    origin: &Origin,
    cli: &CliOverrides,
    listen: &ListenSection,
) -> Result<u32, ConfigError> {
    match (cli.socket_mode, &listen.socket_mode) {
        (Some(m), _) => Ok(m),
        (None, Some(v)) => mode_value(v).map_err(|e| origin.invalid(&e)),
        (None, None) => Ok(DEFAULT_SOCKET_MODE),
    }
}

/// Any `--tcp` or `--unix` flag replaces the file's addresses; with none anywhere, the
/// default Unix socket (an error if there is none for this user).
pub(super) fn choose_addresses(
    origin: &Origin,
    cli: &CliOverrides,
    listen: &ListenSection,
) -> Result<Addresses, ConfigError> {
    let (tcp, mut unix) = if !cli.tcp.is_empty() || !cli.unix.is_empty() {
        (cli.tcp.clone(), cli.unix.clone())
    } else {
        let unix = listen.unix.iter().map(|u| origin.join(u)).collect();
        (listen.tcp.clone(), unix)
    };
    let mut default_socket_dir = None;
    if tcp.is_empty() && unix.is_empty() {
        let Some((path, dir_mode)) = cli.default_unix.clone() else {
            return Err(origin.invalid(
                "no listener configured and no default Unix socket for this user \
                 ($XDG_RUNTIME_DIR is not set): pass --unix PATH (or --tcp HOST:PORT)",
            ));
        };
        if let Some(dir) = path.parent() {
            default_socket_dir = Some((dir.to_path_buf(), dir_mode));
        }
        unix.push(path);
    }
    Ok(Addresses {
        tcp,
        unix,
        default_socket_dir,
    })
}

/// The listeners: TCP addresses resolved (non-loopback ones allowed only if
/// `allow_remote`), then the Unix sockets with `socket_mode`.
pub(super) fn build_listeners(
    origin: &Origin,
    addresses: &Addresses,
    socket_mode: u32,
    allow_remote: bool,
) -> Result<Vec<ListenerSpec>, ConfigError> {
    let mut listeners = Vec::new();
    for t in &addresses.tcp {
        let addr = parse_tcp(t).map_err(|e| origin.invalid(&e))?;
        listeners.push(ListenerSpec::Tcp { addr, allow_remote });
    }
    for path in &addresses.unix {
        listeners.push(ListenerSpec::Unix {
            path: path.clone(),
            mode: socket_mode,
        });
    }
    Ok(listeners)
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
