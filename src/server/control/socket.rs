//! The control socket's server side: binding, the accept loop, and the handler of one
//! connection (read one request line, dispatch it to its family, answer, close).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use super::hooks::ControlHooks;
use super::protocol::{
    err_line, ok_line, parse_request, shorten, ProtocolError, Request, MAX_REQUEST_BYTES,
};
use super::reencryption::{reencrypt, reencrypt_status};
use super::snapshot::snapshot;
use super::status::status_body;
use crate::server::live::LiveExports;
use crate::server::reencrypt::Jobs;
use crate::server::{Listener, ListenerSpec, ServerError, Shared};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Progress lines are sent at most this often.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A bound control socket.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds the control socket (mode 0600). A stale socket file is replaced; one a live
    /// server answers on is refused ([`ServerError::SocketInUse`]).
    pub async fn bind(path: &Path) -> Result<ControlSocket, ServerError> {
        let spec = ListenerSpec::Unix {
            path: path.to_path_buf(),
            mode: 0o600,
        };
        match Listener::bind(&spec).await? {
            Listener::Unix { listener, path, .. } => Ok(ControlSocket { listener, path }),
            Listener::Tcp(_) => Err(ServerError::NoListeners),
        }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a control connection works with.
pub(crate) struct ControlState {
    pub shared: Arc<Shared>,
    pub jobs: Arc<Jobs>,
    pub hooks: ControlHooks,
    /// Adding and removing exports while serving.
    pub live: Arc<LiveExports>,
}

/// Accepts control connections until shutdown, then removes the socket file and waits
/// for the open connections (each ends promptly at shutdown).
pub(crate) async fn control_loop(sock: ControlSocket, state: Arc<ControlState>) {
    let mut shutdown = state.shared.shutdown.clone();
    let mut conns = tokio::task::JoinSet::new();
    tracing::info!("control socket on {}", sock.path.display());
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = sock.listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                if conns.len() >= 64 {
                    tracing::warn!("too many control connections; closing a new one");
                    continue;
                }
                let st = state.clone();
                conns.spawn(async move { handle(stream, st).await });
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&sock.path);
    drop(sock);
    while conns.join_next().await.is_some() {}
}

/// Reads one line of at most [`MAX_REQUEST_BYTES`]; `Err` with a ready-made message.
async fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, ProtocolError> {
    let (r, _) = stream.split();
    let mut reader = tokio::io::BufReader::new(r).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    match read {
        Err(_) => Err(ProtocolError::BadJson(format!(
            "no complete request line within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(ProtocolError::BadJson(format!("cannot read: {e}"))),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Err(ProtocolError::TooLarge {
            limit: MAX_REQUEST_BYTES,
        }),
        Ok(Ok(_)) => Ok(line),
    }
}

/// Writes one line; `false` when the client is gone.
pub(super) async fn send(stream: &mut UnixStream, line: &str) -> bool {
    stream.write_all(line.as_bytes()).await.is_ok()
}

async fn handle(mut stream: UnixStream, st: Arc<ControlState>) {
    let req = match read_request(&mut stream)
        .await
        .and_then(|l| parse_request(&l))
    {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("control: refused request: {e}");
            // Drain a little of what is left so the client sees the answer, not a reset.
            let _ = send(&mut stream, &err_line(&e.to_string())).await;
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            return;
        }
    };
    tracing::debug!(op = req.op(), "control request");
    let end = match req {
        Request::Status => Ok(status_body(&st)),
        Request::ReencryptStatus { export } => reencrypt_status(&st, &export),
        Request::Reencrypt { export, wait } => reencrypt(&mut stream, &st, &export, wait).await,
        Request::Snapshot {
            export,
            store,
            description,
            parent,
        } => snapshot(&mut stream, &st, export, store, description, parent).await,
        Request::Exports(r) => super::exports::handle(&st, r).await,
        Request::Resize(r) => super::resize::resize(&st, r).await,
    };
    let line = match end {
        Ok(body) => ok_line(body),
        Err(e) => err_line(&e),
    };
    let _ = send(&mut stream, &line).await;
    let _ = stream.shutdown().await;
}

pub(super) fn unknown_export(st: &ControlState, name: &str) -> String {
    let names: Vec<String> = st
        .shared
        .exports
        .iter()
        .map(|e| format!("{:?}", e.info.name))
        .collect();
    format!(
        "no export named {:?}; this daemon serves {}",
        shorten(name, 64),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}
