//! `serve --ublk EXPORT[:ID]`: the daemon's ublk devices (start after the exports are
//! unlocked, stop after the NBD server has stopped). The frontend is `crate::ublk`.

use anyhow::{Context, Result};

use crate::server::Exports;
use crate::ublk::{UblkFrontend, UblkOptions};

/// One `--ublk` value: an export name and optionally the device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UblkSpec {
    pub export: String,
    pub dev_id: Option<u32>,
}

/// Parses `EXPORT` or `EXPORT:ID` (ID: the N of /dev/ublkbN).
pub(super) fn parse_ublk_spec(s: &str) -> Result<UblkSpec, String> {
    let (export, id) = match s.rsplit_once(':') {
        Some((name, id)) => (name, Some(id)),
        None => (s, None),
    };
    if export.is_empty() {
        return Err("expected EXPORT or EXPORT:ID (an export name is missing)".into());
    }
    let dev_id = id
        .map(|i| {
            i.parse::<u32>()
                .ok()
                .filter(|&n| n < (1 << 20))
                .ok_or_else(|| format!("device id {i:?} is not a number below 1048576"))
        })
        .transpose()?;
    Ok(UblkSpec {
        export: export.to_string(),
        dev_id,
    })
}

/// The ublk devices of a daemon.
#[derive(Debug, Default)]
pub(super) struct UblkDevices(Vec<UblkFrontend>);

impl UblkDevices {
    /// Starts one device per spec (a device id the kernel kept quiesced is recovered).
    pub(super) async fn start(specs: &[UblkSpec], exports: &Exports) -> Result<UblkDevices> {
        let mut devices = UblkDevices::default();
        for spec in specs {
            let export = exports.get(&spec.export).with_context(|| {
                format!("--ublk {}: no export of that name is served", spec.export)
            })?;
            let opts = UblkOptions::new(&spec.export, spec.dev_id);
            let device = export.device.clone();
            let started =
                tokio::task::spawn_blocking(move || UblkFrontend::start(device, &opts)).await?;
            let frontend = match started {
                Ok(f) => f,
                Err(e) => {
                    devices.stop().await;
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot serve export {:?} over ublk", spec.export)));
                }
            };
            tracing::info!(
                export = %spec.export,
                device = %format!("/dev/ublkb{}", frontend.dev_id()),
                recovered = frontend.recovered(),
                "ublk device {}",
                if frontend.recovered() { "recovered: waiting I/O resumes" } else { "started" }
            );
            devices.0.push(frontend);
        }
        Ok(devices)
    }

    /// Stops and removes every device, then flushes its volume.
    pub(super) async fn stop(&mut self) {
        for f in self.0.drain(..) {
            let id = f.dev_id();
            let done = tokio::task::spawn_blocking(move || f.stop()).await;
            match done {
                Ok(Ok(())) => tracing::info!("ublk device /dev/ublkb{id} stopped and removed"),
                Ok(Err(e)) => tracing::error!("ublk device /dev/ublkb{id}: {e}"),
                Err(e) => tracing::error!("ublk device /dev/ublkb{id}: stop task failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_an_id() {
        assert_eq!(
            parse_ublk_spec("vol").unwrap(),
            UblkSpec {
                export: "vol".into(),
                dev_id: None
            }
        );
        assert_eq!(
            parse_ublk_spec("vol:3").unwrap(),
            UblkSpec {
                export: "vol".into(),
                dev_id: Some(3)
            }
        );
        assert!(parse_ublk_spec(":3").is_err());
        assert!(parse_ublk_spec("vol:x").is_err());
        assert!(parse_ublk_spec("vol:-1").is_err());
        assert!(parse_ublk_spec("vol:99999999").is_err());
    }
}
