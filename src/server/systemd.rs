//! systemd integration without libsystemd: readiness notification (the `sd_notify`
//! datagram protocol) and socket activation (`LISTEN_PID` / `LISTEN_FDS`).
//!
//! The notification messages (`READY=1`, `STATUS=...`, `STOPPING=1`) are the `sd-notify`
//! crate's [`NotifyState`]s. Two parts stay hand-written because the crate (0.5) does
//! not do what this program needs:
//! - Sending the datagram ([`send_notify`]): the crate connects to `NOTIFY_SOCKET` as a
//!   filesystem path, so an abstract-namespace address (`@NAME`, which systemd and
//!   sd_notify(3) use and `tests/systemd.rs` exercises) fails; it also blocks on a full
//!   receive queue and reads the target only from the environment, so it cannot be
//!   tested without editing the process environment.
//! - Socket activation ([`take_listen_fds`], [`parse_listen_env`]): the crate sets
//!   close-on-exec on every descriptor in the range before checking any of them, refuses
//!   a `LISTEN_FDNAMES` whose count does not match (here it is ignored with a warning, and
//!   empty names mean none), reads only the environment (the pure parser here is
//!   unit-tested with explicit values), and has no check that each descriptor is an
//!   open, listening stream socket of a supported family (`adopt` below).
//!
//! Socket activation rule: when systemd passes at least one socket, `cryptvol serve` listens
//! on exactly the passed sockets and opens none of its configured listeners. The TCP ones
//! obey the same rule as configured listeners: a non-loopback one is refused unless TLS
//! is required or the operator passed `--insecure` (`allow_remote`), and they get the
//! same per-listener and per-peer connection limits.

use std::ffi::OsStr;
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike as _, SockaddrStorage,
};
use nix::sys::stat::{fstat, SFlag};
use sd_notify::NotifyState;

use super::{Listener, ServerError};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// A listening socket inherited from systemd, not yet registered with the async runtime.
#[derive(Debug)]
pub struct ActivatedSocket {
    socket: Inherited,
    fd: RawFd,
    name: Option<String>,
}

#[derive(Debug)]
enum Inherited {
    Tcp(std::net::TcpListener),
    Unix {
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
    },
}

impl ActivatedSocket {
    /// A human-readable description: address, descriptor and systemd's name for it.
    pub fn describe(&self) -> String {
        let addr = match &self.socket {
            Inherited::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".to_string(),
            },
            Inherited::Unix { path, .. } => format!("unix://{}", path.display()),
        };
        match &self.name {
            Some(n) => format!("{addr} (fd {}, {n:?})", self.fd),
            None => format!("{addr} (fd {})", self.fd),
        }
    }

    /// Registers the socket with the tokio runtime (must be called inside it). A TCP
    /// socket on a non-loopback address is refused unless `allow_remote` (TLS required, or
    /// `--insecure`).
    pub fn into_listener(self, allow_remote: bool) -> Result<Listener, ServerError> {
        let desc = self.describe();
        let io_err = |source| ServerError::Bind {
            addr: desc.clone(),
            source,
        };
        match self.socket {
            Inherited::Tcp(l) => {
                let addr = l.local_addr().map_err(io_err)?;
                if !addr.ip().is_loopback() && !allow_remote {
                    return Err(ServerError::NotLoopback(desc));
                }
                let l = tokio::net::TcpListener::from_std(l).map_err(io_err)?;
                Ok(Listener::Tcp(l))
            }
            Inherited::Unix { listener, path } => {
                let listener = tokio::net::UnixListener::from_std(listener).map_err(io_err)?;
                // systemd owns the socket file: never remove it on shutdown.
                Ok(Listener::Unix {
                    listener,
                    path,
                    owned: false,
                })
            }
        }
    }
}

/// Takes the listening sockets systemd passed to this process, if any, and removes
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the environment so that nothing
/// takes them twice. Call it once, before any other thread exists (it edits the environment).
pub fn take_listen_fds() -> Result<Vec<ActivatedSocket>, ServerError> {
    let pid = std::env::var_os("LISTEN_PID");
    let fds = std::env::var_os("LISTEN_FDS");
    let names = std::env::var_os("LISTEN_FDNAMES");
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let passed = parse_listen_env(
        pid.as_deref(),
        fds.as_deref(),
        names.as_deref(),
        std::process::id(),
    )
    .map_err(ServerError::Activation)?;
    passed
        .into_iter()
        .map(|(fd, name)| adopt(fd, name))
        .collect()
}

/// The descriptors (and their names) the environment passes to process `pid`. No
/// `LISTEN_PID`, or one naming another process, means none. Pure, for testing.
pub fn parse_listen_env(
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    fd_names: Option<&OsStr>,
    pid: u32,
) -> Result<Vec<(RawFd, Option<String>)>, String> {
    let Some(listen_pid) = listen_pid else {
        return Ok(Vec::new());
    };
    let target: u32 = listen_pid
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("LISTEN_PID={listen_pid:?} is not a process id"))?;
    if target != pid {
        tracing::debug!(
            listen_pid = target,
            "ignoring LISTEN_FDS: they were passed to another process"
        );
        return Ok(Vec::new());
    }
    let Some(listen_fds) = listen_fds else {
        return Ok(Vec::new());
    };
    let count: RawFd = listen_fds
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|n: &RawFd| *n >= 0)
        .ok_or_else(|| format!("LISTEN_FDS={listen_fds:?} is not a number of descriptors"))?;
    let end = LISTEN_FDS_START
        .checked_add(count)
        .ok_or_else(|| format!("LISTEN_FDS={count} is too large"))?;
    let mut names: Vec<Option<String>> = match fd_names.and_then(OsStr::to_str) {
        Some(s) => s
            .split(':')
            .map(|n| (!n.is_empty()).then(|| n.to_string()))
            .collect(),
        None => Vec::new(),
    };
    if names.len() != usize::try_from(count).unwrap_or(0) {
        if fd_names.is_some() {
            tracing::warn!("LISTEN_FDNAMES does not name every passed descriptor; ignoring it");
        }
        names.clear();
    }
    let mut names = names.into_iter();
    Ok((LISTEN_FDS_START..end)
        .map(|fd| (fd, names.next().flatten()))
        .collect())
}

/// Takes ownership of an inherited descriptor after checking that it is an open,
/// listening stream socket of a supported family.
fn adopt(fd: RawFd, name: Option<String>) -> Result<ActivatedSocket, ServerError> {
    let label = match &name {
        Some(n) => format!("inherited file descriptor {fd} ({n:?})"),
        None => format!("inherited file descriptor {fd}"),
    };
    let bad = |what: String| ServerError::Activation(format!("{label}: {what}"));
    // Every check before the ownership transfer uses calls that take a plain descriptor
    // number and fail cleanly (EBADF) on a descriptor that is not open.
    let stat = fstat(fd).map_err(|e| bad(format!("not an open file descriptor ({e})")))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(bad("not a socket".to_string()));
    }
    let addr: SockaddrStorage =
        getsockname(fd).map_err(|e| bad(format!("cannot read its address ({e})")))?;
    let family = addr.family();
    if !matches!(
        family,
        Some(AddressFamily::Inet | AddressFamily::Inet6 | AddressFamily::Unix)
    ) {
        return Err(bad(format!(
            "unsupported address family {family:?} (use TCP or Unix stream sockets)"
        )));
    }
    // Like sd_listen_fds: do not leak the socket into programs we might execute.
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| bad(format!("cannot set close-on-exec ({e})")))?;
    // SAFETY: the descriptor is ours to own and nothing else owns it: systemd passed it to
    // this very process (LISTEN_PID equals our pid, checked in `parse_listen_env`), it lies
    // in the passed range 3..3+LISTEN_FDS, fstat/getsockname above show it is open and a
    // socket, and `take_listen_fds` removes the LISTEN_* variables before adopting, so each
    // descriptor is adopted exactly once and no other object in this process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = getsockopt(&owned, sockopt::AcceptConn)
        .map_err(|e| bad(format!("cannot query SO_ACCEPTCONN ({e})")))?;
    let ty = getsockopt(&owned, sockopt::SockType)
        .map_err(|e| bad(format!("cannot query SO_TYPE ({e})")))?;
    if ty != SockType::Stream || !listening {
        return Err(bad(
            "not a listening stream socket (use ListenStream= with Accept=no)".to_string(),
        ));
    }
    let socket = if family == Some(AddressFamily::Unix) {
        let path = addr
            .as_unix_addr()
            .map(|u| {
                if let Some(p) = u.path() {
                    p.to_path_buf()
                } else if let Some(a) = u.as_abstract() {
                    PathBuf::from(format!("@{}", String::from_utf8_lossy(a)))
                } else {
                    PathBuf::from("(unnamed)")
                }
            })
            .unwrap_or_else(|| PathBuf::from("(unnamed)"));
        let listener = std::os::unix::net::UnixListener::from(owned);
        listener
            .set_nonblocking(true)
            .map_err(|e| bad(format!("cannot make it non-blocking ({e})")))?;
        Inherited::Unix { listener, path }
    } else {
        let listener = std::net::TcpListener::from(owned);
        listener
            .set_nonblocking(true)
            .map_err(|e| bad(format!("cannot make it non-blocking ({e})")))?;
        Inherited::Tcp(listener)
    };
    Ok(ActivatedSocket { socket, fd, name })
}

/// Sends a state string (`READY=1`, `STOPPING=1`, `STATUS=...`, newline-separated) to the
/// service manager when `NOTIFY_SOCKET` is set. Returns whether a message was sent.
pub fn notify(state: &str) -> std::io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) if !target.is_empty() => send_notify(&target, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends one notification datagram to `target`: an absolute socket path, or an abstract
/// socket name written with a leading `@`.
pub fn send_notify(target: &OsStr, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    // Never block the caller on a full receive queue.
    sock.set_nonblocking(true)?;
    let bytes = target.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?
    } else if bytes.starts_with(b"/") {
        sock.send_to(state.as_bytes(), Path::new(target))?
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={target:?} is neither an absolute path nor an abstract socket name (@NAME)"),
        ));
    };
    if sent != state.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "short notification datagram",
        ));
    }
    Ok(())
}

/// Tells systemd the service is ready, with a status line. Failures are logged.
pub fn notify_ready(status: &str) {
    let states = [NotifyState::Ready, NotifyState::Status(status)];
    report(notify(&message(&states)), "READY=1");
}

/// Tells systemd the service is stopping. Failures are logged.
pub fn notify_stopping() {
    let states = [
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing in-flight requests"),
    ];
    report(notify(&message(&states)), "STOPPING=1");
}

/// One notification datagram: the states in the crate's `KEY=VALUE` form, one a line.
fn message(states: &[NotifyState]) -> String {
    states
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn report(result: std::io::Result<bool>, what: &str) {
    match result {
        Ok(true) => tracing::debug!("notified systemd: {what}"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot notify systemd ({what}): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd as _;
    use std::time::Duration;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn listen_env_for_us() {
        let v = parse_listen_env(os("42"), os("2"), os("unix:tcp"), 42).expect("valid");
        assert_eq!(
            v,
            [(3, Some("unix".to_string())), (4, Some("tcp".to_string()))]
        );
        let v = parse_listen_env(os("42"), os("3"), None, 42).expect("valid");
        assert_eq!(v, [(3, None), (4, None), (5, None)]);
        // Names that do not match the count are ignored.
        let v = parse_listen_env(os("42"), os("2"), os("only"), 42).expect("valid");
        assert_eq!(v, [(3, None), (4, None)]);
        let v = parse_listen_env(os("42"), os("2"), os(":b"), 42).expect("valid");
        assert_eq!(v, [(3, None), (4, Some("b".to_string()))]);
        assert!(parse_listen_env(os("42"), os("0"), None, 42)
            .expect("valid")
            .is_empty());
    }

    #[test]
    fn listen_env_not_for_us_or_absent() {
        assert!(parse_listen_env(None, os("2"), None, 42)
            .expect("ok")
            .is_empty());
        assert!(parse_listen_env(os("41"), os("2"), None, 42)
            .expect("ok")
            .is_empty());
        assert!(parse_listen_env(os("42"), None, None, 42)
            .expect("ok")
            .is_empty());
    }

    #[test]
    fn listen_env_garbage_is_an_error() {
        assert!(parse_listen_env(os("x"), os("1"), None, 42).is_err());
        assert!(parse_listen_env(os("42"), os("-1"), None, 42).is_err());
        assert!(parse_listen_env(os("42"), os("two"), None, 42).is_err());
        assert!(parse_listen_env(os("42"), os("2147483647"), None, 42).is_err());
    }

    #[tokio::test]
    async fn adopts_tcp_and_unix_listeners() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        let s = adopt(tcp.into_raw_fd(), Some("t".into())).expect("adopt tcp");
        assert!(s.describe().contains(&format!("127.0.0.1:{port}")));
        let l = s.into_listener(false).expect("listener");
        assert!(matches!(l, Listener::Tcp(_)));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).expect("bind unix");
        let s = adopt(unix.into_raw_fd(), None).expect("adopt unix");
        match s.into_listener(false).expect("listener") {
            Listener::Unix { path: p, owned, .. } => {
                assert_eq!(p, path);
                assert!(!owned, "systemd's socket file must not be removed by us");
            }
            Listener::Tcp(_) => panic!("unix socket adopted as TCP"),
        }
    }

    #[tokio::test]
    async fn non_loopback_inherited_tcp_needs_allow_remote() {
        let Ok(tcp) = std::net::TcpListener::bind("0.0.0.0:0") else {
            panic!("cannot bind 0.0.0.0");
        };
        let s = adopt(tcp.into_raw_fd(), None).expect("adopt");
        assert!(matches!(
            s.into_listener(false),
            Err(ServerError::NotLoopback(_))
        ));
        let tcp = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let s = adopt(tcp.into_raw_fd(), None).expect("adopt");
        assert!(s.into_listener(true).is_ok());
    }

    #[test]
    fn refuses_non_sockets_and_non_listening_sockets() {
        let f = tempfile::tempfile().expect("tempfile");
        // adopt refuses before taking ownership; the descriptor is leaked on purpose.
        let err = adopt(f.into_raw_fd(), None).expect_err("not a socket");
        assert!(err.to_string().contains("not a socket"), "{err}");
        let d = UnixDatagram::unbound().expect("dgram");
        let err = adopt(d.into_raw_fd(), None).expect_err("datagram");
        assert!(
            err.to_string().contains("not a listening stream socket"),
            "{err}"
        );
    }

    #[test]
    fn notify_to_a_path_and_an_abstract_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        send_notify(path.as_os_str(), "READY=1\nSTATUS=x").expect("send");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        let name = format!("cryptvol-unit-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract addr");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        rx.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        send_notify(OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn messages_are_the_states_one_a_line() {
        assert_eq!(
            message(&[NotifyState::Ready, NotifyState::Status("serving 1 export")]),
            "READY=1\nSTATUS=serving 1 export"
        );
        assert_eq!(
            message(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: finishing in-flight requests")
            ]),
            "STOPPING=1\nSTATUS=stopping: finishing in-flight requests"
        );
    }

    #[test]
    fn notify_target_must_be_absolute_or_abstract() {
        let err = send_notify(OsStr::new("relative/sock"), "READY=1").expect_err("relative");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        let dir = tempfile::tempdir().expect("tempdir");
        // Nobody listening: an error, not a panic or a hang.
        assert!(send_notify(dir.path().join("none").as_os_str(), "READY=1").is_err());
    }
}
