//! Combining an optional configuration file with the command line into
//! [`ServeSettings`]: each section is resolved (and validated) by its own function, in a
//! fixed order that is also the order in which errors are reported, then the settings
//! are built.

use std::path::{Path, PathBuf};

use super::exports::resolve_exports;
use super::file::ConfigFile;
use super::limits::resolve_limits;
use super::listen::{build_listeners, choose_addresses, socket_mode};
use super::overrides::CliOverrides;
use super::settings::{ServeSettings, TlsSettings};
use super::tls::resolve_tls;
use super::{ConfigError, DEFAULT_MAX_INFLIGHT};
use crate::keys::PassphraseSource;
use crate::nbd::TlsMode;
use crate::size::parse_size;
use crate::volume::EngineChoice;

/// Where the configuration came from: the file (named in messages) and the directory
/// its relative paths are relative to.
pub(super) struct Origin<'a> {
    path: Option<&'a Path>,
    base: PathBuf,
}

impl<'a> Origin<'a> {
    fn new(path: Option<&'a Path>) -> Origin<'a> {
        let base = path
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Origin { path, base }
    }

    /// `what`, prefixed with the file it is about (if there is one).
    fn in_file(&self, what: &str) -> String {
        match self.path {
            Some(p) => format!("config file {}: {what}", p.display()),
            None => what.to_string(),
        }
    }

    /// The error `what`, naming the file.
    pub(super) fn invalid(&self, what: &str) -> ConfigError {
        ConfigError::Invalid(self.in_file(what))
    }

    /// A path from the file, made relative to the file's directory.
    pub(super) fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.base.join(p)
    }
}

/// Whether plaintext or remote access is allowed, from TLS and the `insecure` settings.
struct Exposure {
    tls_required: bool,
    /// `--insecure`, the file's `insecure` or its deprecated `allow_remote`.
    insecure: bool,
    /// Non-loopback TCP is allowed: TLS is required, or `insecure`.
    allow_remote: bool,
}

impl Exposure {
    fn of(cli_insecure: bool, file_insecure: bool, tls: Option<&TlsSettings>) -> Exposure {
        let tls_required = tls.is_some_and(|t| t.mode == TlsMode::Require);
        let insecure = cli_insecure || file_insecure;
        Exposure {
            tls_required,
            insecure,
            allow_remote: tls_required || insecure,
        }
    }
}

/// Combines an optional file (with the path it was read from) and the command line.
pub fn resolve(
    file: Option<(&Path, ConfigFile)>,
    cli: CliOverrides,
) -> Result<ServeSettings, ConfigError> {
    let (path, file) = match file {
        Some((p, f)) => (Some(p), f),
        None => (None, ConfigFile::default()),
    };
    let origin = Origin::new(path);
    let listen = file.listen.unwrap_or_default();

    let socket_mode = socket_mode(&origin, &cli, &listen)?;
    let tls = resolve_tls(&origin, &cli, file.tls.unwrap_or_default())?;
    let exposure = Exposure::of(
        cli.insecure,
        listen.insecure || listen.allow_remote,
        tls.as_ref(),
    );
    let addresses = choose_addresses(&origin, &cli, &listen)?;
    let limits = resolve_limits(&origin, &cli, &listen)?;
    let listeners = build_listeners(&origin, &addresses, socket_mode, exposure.allow_remote)?;
    let engine = resolve_engine(&origin, cli.engine, file.engine.as_deref())?;
    let direct = cli.direct || file.direct.unwrap_or(false);
    let mut exports = resolve_exports(&origin, &cli, file.exports)?;
    for e in &mut exports {
        e.options.engine = engine;
        e.options.direct = direct;
    }
    let max_inflight = max_inflight(&origin, cli.max_inflight, file.max_inflight.as_ref())?;

    let passphrase = cli.passphrase.or_else(|| {
        file.passphrase_file
            .map(|p| PassphraseSource::File(origin.join(p)))
    });
    Ok(ServeSettings {
        listeners,
        allow_remote: exposure.allow_remote,
        tls_required: exposure.tls_required,
        insecure: exposure.insecure && !exposure.tls_required,
        deprecated_allow_remote: listen.allow_remote,
        default_socket_dir: addresses.default_socket_dir,
        limits,
        exports,
        keystore: cli.keystore.or(file.keystore.map(|k| origin.join(k))),
        audit_log: cli.audit_log.or(file.audit_log.map(|k| origin.join(k))),
        passphrase,
        max_inflight,
        control: cli.control.or(file.control.map(|c| origin.join(c))),
        metrics: cli.metrics.or(file.metrics),
        engine,
        direct,
        tls,
    })
}

/// The backing files' engine: `--engine`, else the file's `engine`, else auto.
fn resolve_engine(
    origin: &Origin,
    cli: Option<EngineChoice>,
    file: Option<&str>,
) -> Result<EngineChoice, ConfigError> {
    match (cli, file) {
        (Some(e), _) => Ok(e),
        (None, Some(s)) => s
            .parse()
            .map_err(|e: String| origin.invalid(&format!("engine: {e}"))),
        (None, None) => Ok(EngineChoice::default()),
    }
}

/// The in-flight memory budget: `--max-inflight`, else the file's `max_inflight`, else
/// the default.
fn max_inflight(
    origin: &Origin,
    cli: Option<u64>,
    file: Option<&toml::Value>,
) -> Result<u64, ConfigError> {
    match (cli, file) {
        (Some(n), _) => Ok(n),
        (None, Some(v)) => size_value(v).map_err(|e| origin.invalid(&e)),
        (None, None) => Ok(DEFAULT_MAX_INFLIGHT),
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
