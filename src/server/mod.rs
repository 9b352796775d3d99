//! The server layer: sockets, sessions, limits and shutdown. It owns the listeners (TCP,
//! Unix, systemd socket activation: `listen`, [`systemd`]), the NBD sessions on them
//! (`conn`: the handshake on the async runtime, driving the pure [`crate::nbd`] codec,
//! then transmission on a few blocking threads per connection), TLS ([`tls`]), who may
//! open which export (`peer`), the connection limits (`listen`) and the byte budget of
//! payloads in flight (`budget`),
//! the control socket ([`control`]) and online re-encryption jobs (`reencrypt`), and an
//! orderly shutdown: stop accepting, finish in-flight requests, flush every volume.
//!
//! Sessions sit behind the [`BlockDevice`](crate::blockdev::BlockDevice) trait: they read,
//! write, trim and query allocation through it and never see the volume's files or
//! ciphers. The control socket's re-encryption and snapshot requests work on the
//! [`Volume`](crate::volume::Volume) itself (a new data key comes in through a
//! [`ControlHooks`] hook the CLI provides).

mod budget;
mod conn;
pub mod control;
mod export;
mod listen;
pub mod live;
pub mod metrics;
mod peer;
pub(crate) mod reencrypt;
pub mod systemd;
pub mod tls;
pub mod watchdog;

pub use control::{ControlHooks, ControlSocket};
pub use export::{errno_for, Export, Exports};
pub use listen::{Listener, ListenerSpec};
pub use live::{LiveError, LiveExports, Removed};
pub use metrics::MetricsListener;
pub use peer::AccessPolicy;
pub use reencrypt::JobState;
pub use tls::{reload_tls, TlsError, TlsFiles, TlsSetup};

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::AtomicUsize;

use tokio::sync::watch;

/// Errors of the server layer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("refusing to listen on {0}: it is not a loopback address and TLS is not required, so anyone who can reach it could read and write the volumes; use --tls require (with a certificate), or pass --insecure if the network is trusted")]
    NotLoopback(String),
    #[error("unix socket {0} is in use by a running server; stop it or choose another path")]
    SocketInUse(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no listeners configured")]
    NoListeners,
    #[error("socket activation: {0}")]
    Activation(String),
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bytes of request/reply payload held in memory at once, across all connections.
    pub max_inflight_bytes: usize,
    /// Maximum time a client may take to finish the handshake (a total: trickling bytes
    /// does not extend it).
    pub handshake_timeout: Duration,
    /// Maximum simultaneous connections of each listener; further ones are closed at once.
    pub max_connections: usize,
    /// Maximum simultaneous connections of one peer on one listener (a uid on Unix
    /// sockets, an IP address on TCP). Root and the daemon's own user are exempt on Unix
    /// sockets.
    pub max_connections_per_peer: usize,
    /// Close a connection in transmission that sent no request for this long.
    pub idle_timeout: Option<Duration>,
    /// Non-loopback TCP listeners serve plaintext because the operator passed `--insecure`
    /// (not because TLS is required): the logs repeat a warning.
    pub insecure_tcp: bool,
    /// Transmission threads per connection (started as requests overlap).
    pub threads_per_connection: usize,
    /// Where clients refused by an export's access policy are recorded (the key audit
    /// log); `None`: only the server's log.
    pub audit_log: Option<crate::keys::AuditLog>,
    /// TLS offered or required on every listener (`None`: no TLS, STARTTLS is refused).
    pub tls: Option<Arc<TlsSetup>>,
}

/// Default of [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of [`ServerConfig::max_connections_per_peer`]: room for the kernel's
/// multi-connection attach (`nbd-client -C 16`) twice over, as connections of a dead
/// session may linger while the kernel reconnects.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 32;
/// Default of [`ServerConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_inflight_bytes: 64 * 1024 * 1024,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            idle_timeout: None,
            insecure_tcp: false,
            threads_per_connection: 4,
            audit_log: None,
            tls: None,
        }
    }
}

/// Shared state of a running server.
pub(crate) struct Shared {
    pub exports: Arc<Exports>,
    pub config: ServerConfig,
    /// Byte budget for payloads in flight (units: bytes, at least 1 per request).
    pub budget: Arc<budget::ByteBudget>,
    /// Large payload buffers between requests (at most half the byte budget).
    pub buffers: Arc<budget::BufferPool>,
    /// NBD connections open on every listener (including those still negotiating).
    pub open_connections: Arc<AtomicUsize>,
    pub shutdown: watch::Receiver<bool>,
}

/// A handle to request shutdown.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let _ = self.0.send(true);
    }
}

/// Serves `exports` on `listeners` until shutdown is requested, then stops accepting,
/// lets every connection finish its in-flight requests, flushes every volume and returns.
pub async fn serve(
    exports: Exports,
    listeners: Vec<Listener>,
    config: ServerConfig,
    shutdown: ShutdownHandle,
) -> Result<(), ServerError> {
    serve_with(exports, listeners, config, shutdown, Control::default()).await
}

/// The control channel of a server and the hooks its operations use.
#[derive(Debug, Default)]
pub struct Control {
    /// The bound control socket (`None`: no control channel).
    pub socket: Option<ControlSocket>,
    pub hooks: ControlHooks,
    /// The bound `--metrics` endpoint (`None`: no metrics served).
    pub metrics: Option<MetricsListener>,
}

/// [`serve`] with a control channel. Also resumes, in the background, every
/// re-encryption a volume reports in progress, and stops those workers (between steps)
/// before the final flush.
pub async fn serve_with(
    exports: Exports,
    listeners: Vec<Listener>,
    config: ServerConfig,
    shutdown: ShutdownHandle,
    control: Control,
) -> Result<(), ServerError> {
    let live = LiveExports::new(exports, &shutdown);
    serve_live(live, listeners, config, shutdown, control).await
}

/// [`serve_with`] on exports that may be added and removed while serving (through the
/// control socket, or by the holder of another clone of `live`).
pub async fn serve_live(
    live: Arc<LiveExports>,
    listeners: Vec<Listener>,
    config: ServerConfig,
    shutdown: ShutdownHandle,
    control: Control,
) -> Result<(), ServerError> {
    if listeners.is_empty() {
        return Err(ServerError::NoListeners);
    }
    budget::return_freed_memory_to_the_system();
    let shared = Arc::new(Shared {
        exports: live.exports.clone(),
        budget: Arc::new(budget::ByteBudget::new(
            config.max_inflight_bytes.max(nbd_max_payload()),
        )),
        buffers: Arc::new(budget::BufferPool::new(
            config.max_inflight_bytes.max(nbd_max_payload()) / 2,
        )),
        open_connections: Arc::new(AtomicUsize::new(0)),
        config,
        shutdown: shutdown.0.subscribe(),
    });
    let jobs = live.jobs.clone();
    for e in shared.exports.iter() {
        resume_reencryption(&e, &jobs, &shared.shutdown);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(listen::accept_loop(l, shared.clone()));
    }
    if let Some(sock) = control.socket {
        let state = Arc::new(control::ControlState {
            shared: shared.clone(),
            jobs: jobs.clone(),
            hooks: control.hooks,
            live: live.clone(),
        });
        tasks.spawn(control::control_loop(sock, state));
    }
    if let Some(listener) = control.metrics {
        let registry = Arc::new(metrics::registry(shared.clone()));
        tokio::spawn(metrics::serve_metrics(
            listener,
            registry,
            shared.shutdown.clone(),
        ));
    }
    let writeback = tokio::spawn(map_writeback(shared.clone()));
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            tracing::error!("listener task failed: {e}");
        }
    }
    // Re-encryption workers stop between steps once shutdown is set.
    let j = jobs.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || j.join_all()).await {
        tracing::error!("re-encryption workers did not stop cleanly: {e}");
    }
    // Every accept loop waits for its connections before returning; make everything durable.
    writeback.abort();
    final_flush(&shared).await;
    Ok(())
}

/// Resumes, in the background, a re-encryption a read-write export reports in
/// progress (one served read-only stays paused, with a warning).
fn resume_reencryption(e: &Export, jobs: &reencrypt::Jobs, shutdown: &watch::Receiver<bool>) {
    let Some(st) = e.volume.reencrypt_status() else {
        return;
    };
    if e.volume.read_only() {
        tracing::warn!(
            export = %e.info.name,
            watermark = st.watermark,
            size = st.size,
            "a re-encryption is in progress but the export is served read-only: it \
             stays paused (reads use both data keys) until the volume is served \
             read-write or `cryptvol reencrypt FILE` runs"
        );
        return;
    }
    tracing::info!(
        export = %e.info.name,
        watermark = st.watermark,
        size = st.size,
        "resuming an interrupted re-encryption"
    );
    jobs.start(&e.info.name, e.volume.clone(), shutdown.clone());
}

/// Flushes every export's volume once the server has stopped.
async fn final_flush(shared: &Shared) {
    for e in shared.exports.iter() {
        let vol = e.volume.clone();
        let name = e.info.name.clone();
        match tokio::task::spawn_blocking(move || vol.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(export = %name, "final flush failed: {err}"),
            Err(err) => tracing::error!(export = %name, "final flush task failed: {err}"),
        }
    }
}

/// Raises the soft limit of open descriptors (`RLIMIT_NOFILE`) to the hard limit, so that
/// the connection limits, not the descriptor limit, decide which connection is refused.
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct passed by reference.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// How often changed allocation maps are written back when no client flushes.
const MAP_WRITEBACK_INTERVAL: Duration = Duration::from_secs(1);

/// Every second, persists the allocation map of each export that has unpersisted
/// changes (a flush: data first, then the map), like a filesystem's commit interval.
/// Without it, chunks first written by a client that never flushes would read as
/// zeros again after a crash of the daemon, even though their data reached the file.
async fn map_writeback(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(MAP_WRITEBACK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for e in shared.exports.iter() {
            if !e.volume.map_dirty() {
                continue;
            }
            let vol = e.volume.clone();
            let name = e.info.name.clone();
            match tokio::task::spawn_blocking(move || vol.persist_map()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(export = %name, "allocation map writeback failed: {err}")
                }
                Err(err) => {
                    tracing::warn!(export = %name, "allocation map writeback task failed: {err}")
                }
            }
        }
    }
}

/// A fresh shutdown handle.
pub fn shutdown_handle() -> ShutdownHandle {
    let (tx, _rx) = watch::channel(false);
    ShutdownHandle(Arc::new(tx))
}

fn nbd_max_payload() -> usize {
    crate::nbd::MAX_PAYLOAD as usize
}
