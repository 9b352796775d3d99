//! `cryptvol attach` and `cryptvol detach`: the kernel's nbd device configured over
//! netlink (`crate::attach`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::signals::cancel_on_signal;
use crate::attach::{self as at, AttachOptions, WatchEvent};
use crate::nbdclient::{NbdAddr, NbdUri, DEFAULT_PORT};
use crate::size::format_size;

/// `cryptvol attach`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("mode").args(["detach", "reconnect", "refresh_size"])))]
pub struct AttachArgs {
    /// The export's name on the server.
    #[arg(required_unless_present = "detach")]
    export: Option<String>,
    /// The server: HOST[:PORT] (TCP, default port 10809), unix:PATH, or an nbd:// URI.
    #[arg(long, value_name = "ADDR", required_unless_present = "detach")]
    connect: Option<String>,
    /// The device to configure (default: the first free one).
    #[arg(long, value_name = "/dev/nbdN")]
    device: Option<String>,
    /// Connections to open (the export must allow several: NBD_FLAG_CAN_MULTI_CONN).
    #[arg(long, default_value_t = 1, value_name = "N")]
    connections: u32,
    /// Seconds the kernel holds I/O waiting for new connections when every connection
    /// died (a daemon restart), before failing it.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    dead_conn_timeout: u64,
    /// Seconds before the kernel retries a request on another connection (0: the
    /// kernel's default, 30 s).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    timeout: u64,
    /// Stay running after attaching (or reconnecting): reconnect by itself whenever the
    /// server goes away and comes back, until the dead-connection timeout. Ends when the
    /// device is detached, or at SIGTERM/SIGINT (the device stays attached).
    #[arg(long, alias = "persist")]
    watch: bool,
    /// Make the device read-only (the kernel refuses writes) even if the export is writable.
    #[arg(long)]
    read_only: bool,
    /// Logical block size of the device, 512|1024|2048|4096 (default: the export's
    /// preferred block size, 4096 for volumes with 4096-byte sectors).
    #[arg(long, value_name = "BYTES")]
    block_size: Option<u32>,
    /// Disconnect this device (same as `cryptvol detach`).
    #[arg(long, value_name = "/dev/nbdN")]
    detach: Option<String>,
    /// Hand new connections to this attached device (after a daemon restart).
    #[arg(long, value_name = "/dev/nbdN")]
    reconnect: Option<String>,
    /// Ask the export for its current size and give it to this attached device (after
    /// the volume grew; then e.g. resize2fs).
    #[arg(long, value_name = "/dev/nbdN")]
    refresh_size: Option<String>,
}

/// `cryptvol detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The device to disconnect.
    #[arg(value_name = "/dev/nbdN")]
    device: String,
}

/// The NBD URI from `--connect` and the export name.
fn export_uri(connect: &str, export: &str) -> Result<NbdUri> {
    if NbdUri::looks_like_uri(connect) {
        let mut u = NbdUri::parse(connect)?;
        u.export = export.to_string();
        return Ok(u);
    }
    let addr = if let Some(path) = connect.strip_prefix("unix:") {
        NbdAddr::Unix(PathBuf::from(path))
    } else {
        let (host, port) = match connect.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                let port = p
                    .parse()
                    .with_context(|| format!("--connect {connect:?}: bad port {p:?}"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (connect, DEFAULT_PORT),
        };
        if host.is_empty() {
            bail!("--connect {connect:?}: no host (give HOST[:PORT] or unix:PATH)");
        }
        NbdAddr::Tcp {
            host: host.to_string(),
            port,
        }
    };
    Ok(NbdUri {
        addr,
        export: export.to_string(),
    })
}

fn options(a: &AttachArgs) -> Result<AttachOptions> {
    let (Some(export), Some(connect)) = (&a.export, &a.connect) else {
        bail!("give the EXPORT and --connect ADDR");
    };
    Ok(AttachOptions {
        uri: export_uri(connect, export)?,
        connections: a.connections,
        timeout: a.timeout,
        dead_conn_timeout: a.dead_conn_timeout,
        read_only: a.read_only,
        block_size: a.block_size,
    })
}

pub(super) async fn attach(a: AttachArgs) -> Result<()> {
    if let Some(dev) = a.detach {
        return detach(DetachArgs { device: dev }).await;
    }
    let opts = options(&a)?;
    let watch = a.watch;
    let o = opts.clone();
    let index = tokio::task::spawn_blocking(move || configure(&a, &o)).await??;
    if watch {
        watch_device(opts, index).await?;
    }
    Ok(())
}

/// The one-shot part: attach, reconnect or refresh the size; returns the device index.
fn configure(a: &AttachArgs, opts: &AttachOptions) -> Result<u32> {
    if let Some(dev) = &a.refresh_size {
        let index = at::device_index(dev)?;
        let size = at::refresh_size(&opts.uri, index)?;
        println!("/dev/nbd{index}: size {size} bytes ({})", format_size(size));
        return Ok(index);
    }
    if let Some(dev) = &a.reconnect {
        let index = at::device_index(dev)?;
        at::reconnect(opts, index)?;
        eprintln!(
            "/dev/nbd{index}: new connections handed over ({})",
            opts.uri
        );
        return Ok(index);
    }
    let wanted = a.device.as_deref().map(at::device_index).transpose()?;
    let d = at::attach(opts, wanted)?;
    eprintln!(
        "attached {} on /dev/nbd{}: {} bytes, block size {}, {} connection(s){}",
        opts.uri,
        d.index,
        d.details.size,
        d.block_size,
        opts.connections,
        if at::read_only(&d.details) {
            ", read-only"
        } else {
            ""
        }
    );
    println!("/dev/nbd{}", d.index);
    Ok(d.index)
}

/// Resident mode: reconnects device `index` whenever its connections die.
async fn watch_device(opts: AttachOptions, index: u32) -> Result<()> {
    let cancel = cancel_on_signal("watch");
    tracing::info!(
        "watching /dev/nbd{index}: reconnecting to {} when the server goes away (up to {} s)",
        opts.uri,
        opts.dead_conn_timeout
    );
    tokio::task::spawn_blocking(move || {
        at::watch(&opts, index, &|| cancel.is_cancelled(), &|ev| match ev {
            WatchEvent::LinkDead => {
                tracing::warn!("/dev/nbd{index}: a connection died; reconnecting")
            }
            WatchEvent::RetryFailed(e) => tracing::info!("/dev/nbd{index}: not yet: {e}"),
            WatchEvent::Reconnected(t) => tracing::info!(
                "/dev/nbd{index}: reconnected after {:.1} s",
                t.as_secs_f64()
            ),
            WatchEvent::Detached => tracing::info!("/dev/nbd{index} was detached; exiting"),
        })
    })
    .await??;
    Ok(())
}

pub(super) async fn detach(a: DetachArgs) -> Result<()> {
    let index = at::device_index(&a.device)?;
    tokio::task::spawn_blocking(move || at::detach(index)).await??;
    eprintln!("/dev/nbd{index} detached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_addresses() {
        let u = export_uri("10.0.2.100:10809", "fs").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "10.0.2.100".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "fs");
        let u = export_uri("example", "e").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "example".into(),
                port: DEFAULT_PORT
            }
        );
        let u = export_uri("unix:/run/cryptvol/nbd.sock", "e").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/cryptvol/nbd.sock".into()));
        let u = export_uri("[::1]:10900", "e").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 10900
            }
        );
        let u = export_uri("nbd://h:1234", "x").unwrap();
        assert_eq!(u.export, "x");
        assert!(export_uri("h:notaport", "e").is_err());
        assert!(export_uri(":10809", "e").is_err());
    }
}
