//! TLS on the listeners: the `[tls]` section and the `--tls*` flags that override each
//! of its keys, checked for consistency (files without TLS, TLS without its files).

use super::file::TlsSection;
use super::overrides::CliOverrides;
use super::resolve::Origin;
use super::settings::TlsSettings;
use super::ConfigError;
use crate::nbd::TlsMode;
use crate::server::TlsFiles;

/// The TLS settings (`None`: TLS off): each `--tls*` flag over the `[tls]` key of the
/// same name, paths in the file relative to it.
pub(super) fn resolve_tls(
    origin: &Origin,
    cli: &CliOverrides,
    section: TlsSection,
) -> Result<Option<TlsSettings>, ConfigError> {
    let mode = tls_mode(origin, cli.tls, section.mode.as_deref())?;
    let cert = cli
        .tls_cert
        .clone()
        .or(section.cert.map(|p| origin.join(p)));
    let key = cli.tls_key.clone().or(section.key.map(|p| origin.join(p)));
    let client_ca = cli
        .tls_client_ca
        .clone()
        .or(section.client_ca.map(|p| origin.join(p)));
    match (mode, cert, key) {
        (TlsMode::Off, cert, key) => {
            if cert.is_some() || key.is_some() || client_ca.is_some() {
                return Err(origin.invalid(
                    "TLS certificate files are given but TLS is off: add --tls on or \
                     --tls require (or mode in the [tls] section), or remove them",
                ));
            }
            Ok(None)
        }
        (mode, Some(cert), Some(key)) => Ok(Some(TlsSettings {
            mode,
            files: TlsFiles {
                cert,
                key,
                client_ca,
            },
        })),
        (mode, _, _) => Err(origin.invalid(&format!(
            "--tls {} needs the server certificate and its private key: give \
             --tls-cert FILE and --tls-key FILE (or cert and key in the [tls] section)",
            mode.as_str()
        ))),
    }
}

/// `--tls`, else the file's `tls.mode`, else off.
fn tls_mode(
    origin: &Origin,
    cli: Option<TlsMode>,
    file: Option<&str>,
) -> Result<TlsMode, ConfigError> {
    match (cli, file) {
        (Some(m), _) => Ok(m),
        (None, Some(m)) => TlsMode::parse(m).map_err(|e| origin.invalid(&format!("tls.mode: {e}"))),
        (None, None) => Ok(TlsMode::Off),
    }
}
