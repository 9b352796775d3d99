//! Listeners (TCP and Unix sockets), the accept loop and the connection limits.
//!
//! Every listener has its own connection limit (`ServerConfig::max_connections`) and a
//! limit per peer (`max_connections_per_peer`: per uid on Unix sockets, from
//! `SO_PEERCRED`; per IP address on TCP), so that one local account flooding the TCP
//! port cannot lock root out of its Unix socket, and one peer cannot fill a listener.
//! Root and the daemon's own user are exempt from the per-peer limit on Unix sockets
//! (not from the listener's).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use super::peer::{PeerIdentity, UnixCred};
use super::{conn, ServerError, Shared};

/// Where to listen, as configured.
#[derive(Debug, Clone)]
pub enum ListenerSpec {
    Tcp {
        addr: SocketAddr,
        /// Whether a non-loopback address may be used (TLS is required, or the operator
        /// passed `--insecure`).
        allow_remote: bool,
    },
    Unix {
        path: PathBuf,
        mode: u32,
    },
}

/// A bound listener.
#[derive(Debug)]
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
                let std_listener =
                    bind_unix_with_mode(path, *mode).map_err(|source| ServerError::Bind {
                        addr: path.display().to_string(),
                        source,
                    })?;
                let listener =
                    UnixListener::from_std(std_listener).map_err(|source| ServerError::Bind {
                        addr: path.display().to_string(),
                        source,
                    })?;
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

    /// Whether this is a TCP listener on an address other than loopback.
    fn is_remote_tcp(&self) -> bool {
        match self {
            Listener::Tcp(l) => l.local_addr().map_or(true, |a| !a.ip().is_loopback()),
            Listener::Unix { .. } => false,
        }
    }
}

/// Binds a listening Unix stream socket at `path` that never exists with a mode looser
/// than `mode`, whatever the process umask.
///
/// On Linux, `bind` creates the socket file with the mode of the socket's own inode
/// minus the umask (`af_unix.c`: `S_IFSOCK | (SOCK_INODE(sock)->i_mode & ~umask)`).
/// That inode starts as 0777, so a plain bind under umask 000 created a 0777 socket
/// that stayed reachable by everyone until the chmod after it. Here the socket inode is
/// `fchmod`-ed to `mode` before `bind`, so the file is created with `mode & ~umask`
/// (never more than `mode`), and then set to exactly `mode` (which can only add bits
/// the caller asked for). No window, no process-wide umask change, and no effect on
/// other threads creating files.
pub(crate) fn bind_unix_with_mode(
    path: &Path,
    mode: u32,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use nix::sys::socket::{listen, Backlog};

    let mode = mode & 0o777;
    let fd = bind_unix_socket(path, mode)?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    let bound = (|| {
        set_mode_nofollow(path, mode)?;
        listen(&listener, Backlog::new(1024)?)?;
        listener.set_nonblocking(true)
    })();
    if let Err(e) = bound {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Sets `path`'s mode without following a symlink: if the socket file was replaced by a
/// link since `bind`, the change fails (glibc's `fchmodat(AT_SYMLINK_NOFOLLOW)` refuses
/// links with `EOPNOTSUPP`) instead of changing the mode of whatever the link names.
fn set_mode_nofollow(path: &Path, mode: u32) -> std::io::Result<()> {
    use nix::sys::stat::{fchmodat, FchmodatFlags, Mode};
    fchmodat(
        None,
        path,
        Mode::from_bits_truncate(mode),
        FchmodatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// Creates a Unix stream socket, sets its inode's mode to `mode`, then binds it at
/// `path` (the file appears with `mode & !umask`). Not listening yet.
fn bind_unix_socket(path: &Path, mode: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use nix::sys::stat::{fchmod, Mode};

    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Who a connection counts against for the per-peer limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    Uid(u32),
    /// Root or the daemon's own user on a Unix socket: exempt from the per-peer limit
    /// (the listener's limit still applies), so that the owner cannot lock itself out,
    /// e.g. with many multi-connection kernel attaches.
    Owner,
    Ip(IpAddr),
    /// `SO_PEERCRED` failed: all such connections share one allowance.
    Unknown,
}

/// Why a new connection was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Listener,
    Peer,
}

/// The connection limits of one listener.
struct Limits {
    listener: Arc<Semaphore>,
    per_peer: usize,
    peers: Mutex<HashMap<PeerKey, usize>>,
}

/// One admitted connection: releases its places when dropped.
struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
    limits: Arc<Limits>,
    key: PeerKey,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Limits {
    fn new(max_connections: usize, per_peer: usize) -> Arc<Limits> {
        Arc::new(Limits {
            listener: Arc::new(Semaphore::new(max_connections.max(1))),
            per_peer: per_peer.max(1),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection of `key` if neither its peer's nor the listener's limit is
    /// reached. A peer at its limit takes no place of the listener.
    fn admit(
        self: &Arc<Self>,
        key: PeerKey,
        open: &Arc<std::sync::atomic::AtomicUsize>,
    ) -> Result<Admission, Refusal> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let count = peers.get(&key).copied().unwrap_or(0);
        if count >= self.per_peer && key != PeerKey::Owner {
            return Err(Refusal::Peer);
        }
        let permit = self
            .listener
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Listener)?;
        peers.insert(key, count + 1);
        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Admission {
            _permit: permit,
            limits: self.clone(),
            key,
            open: open.clone(),
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let mut peers = self
            .limits
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = peers.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.key);
            }
        }
    }
}

/// A warning logged at most once per interval, with the number of occurrences between.
struct Throttled {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn new(interval: Duration) -> Throttled {
        Throttled {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when the warning is due now (`n`: occurrences suppressed since the last).
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// How often the warning about plaintext NBD on a non-loopback TCP listener repeats.
const INSECURE_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// How often refusals by the connection limits are logged (with a count in between).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

fn insecure_warning(desc: &str) {
    tracing::warn!(
        listener = %desc,
        "INSECURE: serving NBD in plaintext on a non-loopback TCP address (--insecure, no \
         TLS): anyone who can reach it can read and write the volumes; use --tls require"
    );
}

/// Accepts connections until shutdown, then waits for the open connections to finish.
pub(crate) async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut conns = tokio::task::JoinSet::new();
    let desc = listener.describe();
    let limits = Limits::new(
        shared.config.max_connections,
        shared.config.max_connections_per_peer,
    );
    let insecure = shared.config.insecure_tcp && listener.is_remote_tcp();
    let mut insecure_log = Throttled::new(INSECURE_WARNING_INTERVAL);
    if insecure && insecure_log.due().is_some() {
        insecure_warning(&desc);
    }
    let mut refusal_log = Throttled::new(REFUSAL_LOG_INTERVAL);
    let mut next_id: u64 = 0;
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
        let (stream, peer, key) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(listener = %desc, "accept failed: {e}");
                // Avoid a hot loop on EMFILE and friends.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // The admission moves into the connection task and is released when it ends.
        let admission = match limits.admit(key, &shared.open_connections) {
            Ok(a) => a,
            Err(why) => {
                if let Some(suppressed) = refusal_log.due() {
                    log_refusal(why, &shared.config, &desc, &peer, suppressed);
                }
                drop(stream);
                continue;
            }
        };
        if insecure {
            if let Some(n) = insecure_log.due() {
                insecure_warning(&desc);
                tracing::warn!(listener = %desc, peer = %peer, "INSECURE: plaintext connection ({n} more since the last warning)");
            }
        }
        next_id += 1;
        spawn_connection(&mut conns, stream, peer, &desc, next_id, &shared, admission);
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

/// Logs a connection refused by the connection limits (`suppressed`: refusals not
/// logged since the last warning).
fn log_refusal(
    why: Refusal,
    config: &super::ServerConfig,
    desc: &str,
    peer: &str,
    suppressed: u64,
) {
    let what = match why {
        Refusal::Listener => format!(
            "this listener has {} connections (--max-connections)",
            config.max_connections
        ),
        Refusal::Peer => format!(
            "this peer has {} connections (--max-connections-per-peer)",
            config.max_connections_per_peer
        ),
    };
    tracing::warn!(
        listener = %desc,
        peer = %peer,
        refused_since_last_warning = suppressed,
        "connection refused: {what}"
    );
}

/// Runs an admitted connection in its own task, which holds `admission` until it ends.
fn spawn_connection<A: Send + 'static>(
    conns: &mut tokio::task::JoinSet<()>,
    stream: Accepted,
    peer: String,
    desc: &str,
    id: u64,
    shared: &Arc<Shared>,
    admission: A,
) {
    let shared = shared.clone();
    match stream {
        Accepted::Tcp(s) => {
            let _ = s.set_nodelay(true);
            let peer = PeerIdentity::tcp(peer, desc.to_string());
            conns.spawn(async move {
                conn::run(s, peer, id, shared).await;
                drop(admission);
            });
        }
        Accepted::Unix(s, cred) => {
            let peer = PeerIdentity::unix(peer, desc.to_string(), cred);
            conns.spawn(async move {
                conn::run(s, peer, id, shared).await;
                drop(admission);
            });
        }
    }
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
    /// With the peer's `SO_PEERCRED` credentials (`None` if they could not be read).
    Unix(tokio::net::UnixStream, Option<UnixCred>),
}

async fn accept(l: &Listener) -> std::io::Result<(Accepted, String, PeerKey)> {
    match l {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            let key = PeerKey::Ip(a.ip().to_canonical());
            Ok((Accepted::Tcp(s), a.to_string(), key))
        }
        Listener::Unix { listener, path, .. } => {
            let (s, _) = listener.accept().await?;
            let cred = peer_cred(&s);
            let peer = match cred {
                Some(c) => format!("unix:{} uid={}", path.display(), c.uid),
                None => format!("unix:{}", path.display()),
            };
            let owner = nix::unistd::geteuid().as_raw();
            let key = match cred.map(|c| c.uid) {
                Some(u) if u == 0 || u == owner => PeerKey::Owner,
                Some(u) => PeerKey::Uid(u),
                None => PeerKey::Unknown,
            };
            Ok((Accepted::Unix(s, cred), peer, key))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;
    use std::sync::atomic::AtomicUsize;

    /// Serialises the tests that change the process umask.
    static UMASK: Mutex<()> = Mutex::new(());

    #[test]
    fn unix_socket_bound_under_umask_000_is_never_looser_than_its_mode() {
        let _g = UMASK.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, mode) in [0o600u32, 0o660, 0o640, 0o700].into_iter().enumerate() {
            let path = dir.path().join(format!("s{i}.sock"));
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            // The file as bind(2) created it, before the final chmod: the window of B9.
            let fd = bind_unix_socket(&path, mode);
            let seen = std::fs::symlink_metadata(&path).map(|m| m.mode() & 0o777);
            std::fs::remove_file(&path).expect("rm");
            // And the real function, under umask 000.
            let l = bind_unix_with_mode(&path, mode).expect("bind_unix_with_mode");
            let after = std::fs::symlink_metadata(&path).expect("stat").mode() & 0o777;
            nix::sys::stat::umask(old);
            let _fd = fd.expect("bind");
            assert_eq!(
                seen.expect("stat"),
                mode,
                "mode right after bind with umask 000"
            );
            assert_eq!(after, mode, "final mode");
            drop(l);
        }
    }

    #[test]
    fn socket_mode_is_never_set_through_a_swapped_in_symlink() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"x").expect("write");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let link = dir.path().join("nbd.sock");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        assert!(set_mode_nofollow(&link, 0o666).is_err());
        let m = std::fs::metadata(&victim).expect("stat").mode() & 0o777;
        assert_eq!(m, 0o600, "the link's target kept its mode");
    }

    #[test]
    fn unix_socket_mode_is_exact_under_a_restrictive_umask() {
        let _g = UMASK.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.sock");
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let l = bind_unix_with_mode(&path, 0o660);
        nix::sys::stat::umask(old);
        let _l = l.expect("bind");
        let m = std::fs::symlink_metadata(&path).expect("stat");
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o777, 0o660);
    }

    #[test]
    fn limits_per_peer_and_per_listener() {
        let open = Arc::new(AtomicUsize::new(0));
        let l = Limits::new(3, 2);
        let a = PeerKey::Uid(1000);
        let b = PeerKey::Ip("192.0.2.1".parse().expect("ip"));
        let a1 = l.admit(a, &open).expect("a1");
        let _a2 = l.admit(a, &open).expect("a2");
        assert_eq!(l.admit(a, &open).err(), Some(Refusal::Peer));
        let b1 = l.admit(b, &open).expect("b1");
        // The listener is full: another peer is refused too.
        assert_eq!(
            l.admit(PeerKey::Uid(0), &open).err(),
            Some(Refusal::Listener)
        );
        assert_eq!(open.load(std::sync::atomic::Ordering::SeqCst), 3);
        drop(a1);
        let _a3 = l.admit(a, &open).expect("a3 after a1 closed");
        drop(b1);
        assert!(l.peers.lock().expect("lock").get(&b).is_none());
        assert_eq!(open.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_peer_at_its_limit_takes_no_place_of_the_listener() {
        let open = Arc::new(AtomicUsize::new(0));
        let l = Limits::new(2, 1);
        let _a = l.admit(PeerKey::Uid(65534), &open).expect("a");
        for _ in 0..100 {
            assert_eq!(
                l.admit(PeerKey::Uid(65534), &open).err(),
                Some(Refusal::Peer)
            );
        }
        assert!(l.admit(PeerKey::Uid(0), &open).is_ok());
    }

    #[test]
    fn the_owner_is_exempt_from_the_per_peer_limit_but_not_the_listeners() {
        let open = Arc::new(AtomicUsize::new(0));
        let l = Limits::new(4, 1);
        let held: Vec<_> = (0..4)
            .map(|_| l.admit(PeerKey::Owner, &open).expect("owner"))
            .collect();
        assert_eq!(
            l.admit(PeerKey::Owner, &open).err(),
            Some(Refusal::Listener)
        );
        drop(held);
    }

    #[test]
    fn throttled_warning_counts_what_it_suppressed() {
        let mut t = Throttled::new(Duration::from_secs(3600));
        assert_eq!(t.due(), Some(0));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        t.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(t.due(), Some(2));
    }
}
