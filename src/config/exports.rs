//! The volumes to serve: the file's `[[export]]` tables, then the `VOLUME` arguments,
//! with their open options and access policies; names must be unique.

use std::path::PathBuf;

use super::access::{cli_policy, file_policy};
use super::file::ExportSection;
use super::overrides::CliOverrides;
use super::resolve::Origin;
use super::settings::ExportSpec;
use super::ConfigError;
use crate::volume::OpenOptions;

/// Every export: the file's first, then the command line's; at least one.
pub(super) fn resolve_exports(
    origin: &Origin,
    cli: &CliOverrides,
    sections: Vec<ExportSection>,
) -> Result<Vec<ExportSpec>, ConfigError> {
    let mut exports: Vec<ExportSpec> = Vec::new();
    add_file_exports(origin, cli, sections, &mut exports)?;
    add_cli_exports(cli, &mut exports)?;
    if exports.is_empty() {
        return Err(origin.invalid(
            "nothing to serve: give VOLUME arguments or [[export]] tables in a --config file",
        ));
    }
    Ok(exports)
}

/// The `[[export]]` tables (`--read-only` / `--discard` apply to them too).
fn add_file_exports(
    origin: &Origin,
    cli: &CliOverrides,
    sections: Vec<ExportSection>,
    exports: &mut Vec<ExportSpec>,
) -> Result<(), ConfigError> {
    for e in sections {
        if e.name.is_empty() || e.path.as_os_str().is_empty() {
            return Err(origin.invalid("an [[export]] has an empty name or path"));
        }
        let access =
            file_policy(&e).map_err(|m| origin.invalid(&format!("export {:?}: {m}", e.name)))?;
        add_export(
            exports,
            ExportSpec {
                name: e.name,
                path: origin.join(e.path),
                options: OpenOptions {
                    read_only: e.read_only || cli.read_only,
                    discard: e.discard || cli.discard,
                    // The engine is the daemon's (set by `resolve`).
                    ..OpenOptions::default()
                },
                access,
            },
        )?;
    }
    Ok(())
}

/// The `VOLUME` arguments, with the access the `--allow-*` flags give (which need at
/// least one of them).
fn add_cli_exports(cli: &CliOverrides, exports: &mut Vec<ExportSpec>) -> Result<(), ConfigError> {
    if cli.volumes.is_empty() && !cli.allow.is_empty() {
        return Err(ConfigError::Invalid(
            "the --allow-* options apply to the exports of VOLUME arguments, and none is given; \
             for the config file's exports set allow_uid, allow_gid, allow_tls_subject, \
             allow_tls_san or allow_anyone in their [[export]] tables"
                .to_string(),
        ));
    }
    let cli_access = cli_policy(&cli.allow).map_err(ConfigError::Invalid)?;
    for v in &cli.volumes {
        let (name, path) = parse_volume_arg(v).map_err(ConfigError::Invalid)?;
        let options = OpenOptions {
            read_only: cli.read_only,
            discard: cli.discard,
            ..OpenOptions::default()
        };
        add_export(
            exports,
            ExportSpec {
                name,
                path,
                options,
                access: cli_access.clone(),
            },
        )?;
    }
    Ok(())
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
