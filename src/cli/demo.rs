//! `cryptvol demo`: a demo volume in a scratch directory, served on a Unix socket (and
//! optionally loopback TCP), with instructions for attaching it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use super::args::parse_size_arg;
use super::serve::{bind_all, open_exports, run_server};
use super::signals::DaemonSignals;
use crate::config::{self, ExportSpec};
use crate::keys::{Argon2Params, KeyRef};
use crate::ops::{self, KeyOptions, NewKey};
use crate::server::{self, ListenerSpec, ServerConfig};
use crate::volume::{OpenOptions, VolumeSpec, DEFAULT_SECTOR_SIZE};

/// `cryptvol demo`.
#[derive(Args)]
pub(super) struct DemoArgs {
    /// Scratch directory for the keystore, the volume and the socket.
    #[arg(long, value_name = "DIR", default_value = "./cryptvol-demo")]
    dir: PathBuf,
    /// Size of the demo volume.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size_arg)]
    size: u64,
    /// Also listen on this loopback TCP address (plaintext: any local account can connect
    /// to it; the Unix socket in DIR is mode 0600). E.g. 127.0.0.1:10809.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Option<String>,
}

/// `cryptvol demo`: creates the volume on first use, then serves it until a signal.
pub(super) async fn demo(a: DemoArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let keystore = dir.join("keys");
    let vol = dir.join("demo.img");
    let sock = dir.join("cryptvol.sock");
    let keys = KeyOptions {
        keystore: Some(keystore.clone()),
        passphrase: None,
        argon2: Argon2Params::default(),
        audit_log: None,
    };
    if !vol.exists() {
        let spec = VolumeSpec {
            size: a.size,
            sector_size: DEFAULT_SECTOR_SIZE,
        };
        ops::create_volume(&vol, &spec, NewKey::Key(KeyRef::Local(None)), &keys).await?;
    }
    let mut specs = vec![ListenerSpec::Unix {
        path: sock.clone(),
        mode: 0o600,
    }];
    if let Some(tcp) = &a.tcp {
        specs.push(ListenerSpec::Tcp {
            addr: config::parse_tcp(tcp).map_err(anyhow::Error::msg)?,
            allow_remote: false,
        });
    }
    print_demo_help(&dir, &keystore, &vol, &sock, a.tcp.as_deref());
    let export = ExportSpec {
        name: "demo".to_string(),
        path: vol.clone(),
        options: OpenOptions::default(),
        // The demo's user, and root for the kernel client (`sudo nbd-client`); root can
        // read this user's keystore anyway. `--tcp` asks for a plaintext loopback listener:
        // its clients have no identity, so they are let in only because it was asked for.
        access: server::AccessPolicy {
            allow_uid: vec![0],
            allow_anyone: a.tcp.is_some(),
            ..server::AccessPolicy::default()
        },
    };
    let signals = DaemonSignals::register()?;
    let exports = open_exports(&[export], &keys).await?;
    let listeners = bind_all(&specs).await?;
    let config = ServerConfig {
        audit_log: Some(keys.service().audit_log().clone()),
        ..ServerConfig::default()
    };
    run_server(
        exports,
        listeners,
        config,
        server::Control::default(),
        signals,
        None,
        Default::default(),
    )
    .await
}

/// How to use the demo export, on stdout.
fn print_demo_help(dir: &Path, keystore: &Path, vol: &Path, sock: &Path, tcp: Option<&str>) {
    let tcp_line = match tcp {
        Some(t) => {
            let (host, port) = t.rsplit_once(':').unwrap_or((t, "10809"));
            format!("\n  # over TCP too (plaintext; every local account may use it):\n  nbdinfo 'nbd://{host}:{port}/demo'")
        }
        None => String::new(),
    };
    println!(
        "\
cryptvol demo: serving {vol} as export \"demo\"
  keystore (holds the master key; without it the volume is unreadable): {keystore}

Use it from another terminal:
  nbdinfo 'nbd+unix:///demo?socket={sock}'
  qemu-img info 'nbd+unix:///demo?socket={sock}'
  qemu-img convert -n -O raw some-disk.raw 'nbd+unix:///demo?socket={sock}'
  # a real filesystem through FUSE and a loop device (no nbd kernel module needed):
  mkdir -p {dir}/fuse && nbdfuse {dir}/fuse/disk 'nbd+unix:///demo?socket={sock}' &
  sudo losetup -f --show --sector-size 4096 {dir}/fuse/disk   # then mkfs.ext4 / mount the printed /dev/loopN
  # on a host with the nbd kernel module:
  sudo modprobe nbd && sudo nbd-client -u {sock} /dev/nbd0 -N demo -b 4096{tcp_line}

Stop with Ctrl-C (in-flight requests finish and the volume is flushed).",
        vol = vol.display(),
        keystore = keystore.display(),
        sock = sock.display(),
        dir = dir.display(),
    );
    let _ = std::io::stdout().flush();
}
