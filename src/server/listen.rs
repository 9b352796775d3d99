//! Listeners (TCP and Unix sockets) and the accept loop.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use super::peer::{PeerIdentity, UnixCred};
use super::{conn, ServerError, Shared};

/// Where to listen, as configured.
#[derive(Debug, Clone)]
pub enum ListenerSpec {
    Tcp {
        addr: SocketAddr,
        allow_remote: bool,
    },
    Unix {
        path: PathBuf,
        mode: u32,
    },
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        owned: bool,
    },
}

impl Listener {
    /// Binds a listener. Non-loopback TCP needs `allow_remote`; a stale Unix socket file
    /// (nobody listening) is replaced, a live one is refused.
    pub async fn bind(spec: &ListenerSpec) -> Result<Listener, ServerError> {
        match spec {
            ListenerSpec::Tcp { addr, allow_remote } => {
                if !addr.ip().is_loopback() && !allow_remote {
                    return Err(ServerError::NotLoopback(addr.to_string()));
                }
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind {
                        addr: addr.to_string(),
                        source,
                    })?;
                Ok(Listener::Tcp(l))
            }
            ListenerSpec::Unix { path, mode } => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(ServerError::Bind {
                            addr: path.display().to_string(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::AlreadyExists,
                                "path exists and is not a socket",
                            ),
                        });
                    }
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(ServerError::SocketInUse(path.display().to_string()));
                    }
                    std::fs::remove_file(path).map_err(|source| ServerError::Io {
                        path: path.display().to_string(),
                        source,
                    })?;
                }
                let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
                    addr: path.display().to_string(),
                    source,
                })?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).map_err(
                    |source| ServerError::Io {
                        path: path.display().to_string(),
                        source,
                    },
                )?;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                    owned: true,
                })
            }
        }
    }

    /// A human-readable address.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".to_string(),
            },
            Listener::Unix { path, .. } => format!("unix://{}", path.display()),
        }
    }
}

/// Accepts connections until shutdown, then waits for the open connections to finish.
pub(crate) async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut conns = tokio::task::JoinSet::new();
    let mut next_id: u64 = 0;
    let desc = listener.describe();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = accept(&listener) => a,
        };
        let (stream, peer_addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = %desc, "accept failed: {e}");
                // Avoid a hot loop on EMFILE and friends.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        // The permit moves into the connection task and is released when it ends.
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer_addr, "too many connections; closing new connection");
            drop(stream);
            continue;
        };
        let id = next_id;
        let shared2 = shared.clone();
        match stream {
            Accepted::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let peer = PeerIdentity::tcp(peer_addr, desc.clone());
                conns.spawn(async move {
                    conn::run(s, peer, id, shared2).await;
                    drop(permit);
                });
            }
            Accepted::Unix(s) => {
                let peer = PeerIdentity::unix(peer_addr, desc.clone(), peer_cred(&s));
                conns.spawn(async move {
                    conn::run(s, peer, id, shared2).await;
                    drop(permit);
                });
            }
        }
    }
    if let Listener::Unix {
        path, owned: true, ..
    } = &listener
    {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// `SO_PEERCRED` of a Unix-socket peer: the credentials the kernel recorded when it
/// called `connect` (a descriptor passed on to another process keeps them).
fn peer_cred(s: &tokio::net::UnixStream) -> Option<UnixCred> {
    match s.peer_cred() {
        Ok(c) => Some(UnixCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        }),
        Err(e) => {
            tracing::warn!("cannot read the credentials of a Unix-socket client: {e}");
            None
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<(Accepted, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            Ok((Accepted::Tcp(s), a.to_string()))
        }
        Listener::Unix { listener, path, .. } => {
            let (s, _) = listener.accept().await?;
            Ok((Accepted::Unix(s), format!("unix:{}", path.display())))
        }
    }
}
