//! The netlink socket to the kernel's nbd driver: resolving the "nbd" family, sending one
//! request and collecting its answer, and listening to the multicast group for
//! `NBD_CMD_LINK_DEAD`. Message bytes come from [`super::netlink`].

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use super::netlink::{self as nl, Attr, Message};
use super::AttachError;

/// Largest datagram read from the kernel (its replies here are a few hundred bytes).
const RECV_BUF: usize = 64 << 10;
/// How long a request may wait for the kernel's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// `SOL_NETLINK` and `NETLINK_ADD_MEMBERSHIP` (not wrapped by nix).
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

/// A generic netlink socket bound to the nbd family.
#[derive(Debug)]
pub struct NbdNetlink {
    fd: OwnedFd,
    family: nl::Family,
    seq: u32,
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> AttachError {
    move |e| AttachError::Netlink {
        what,
        err: std::io::Error::from(e),
    }
}

impl NbdNetlink {
    /// Opens the socket and resolves the "nbd" family (the module must be loaded).
    pub fn open() -> Result<NbdNetlink, AttachError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(sys("opening a generic netlink socket"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(sys("binding the netlink socket"))?;
        let tv = TimeVal::new(REPLY_TIMEOUT.as_secs() as i64, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(sys("setting a receive timeout"))?;
        let mut s = NbdNetlink {
            fd,
            family: nl::Family {
                id: nl::GENL_ID_CTRL,
                mcast_groups: Vec::new(),
            },
            seq: 0,
        };
        let seq = s.next_seq();
        let attrs = s.request(&nl::encode_get_family(seq, nl::NBD_FAMILY), seq)?;
        let family = match attrs {
            Some(a) => nl::parse_family(&a).map_err(AttachError::Parse)?,
            None => return Err(AttachError::NoNbdModule),
        };
        s.family = family;
        Ok(s)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `msg` (sequence `seq`) and reads until its acknowledgement; returns the
    /// attributes of the reply message, if the kernel sent one.
    fn request(&mut self, msg: &[u8], seq: u32) -> Result<Option<Vec<Attr>>, AttachError> {
        send(self.fd.as_raw_fd(), msg, MsgFlags::empty()).map_err(sys("sending to the kernel"))?;
        let mut reply = None;
        loop {
            for m in self.receive()? {
                match m {
                    Message::Generic {
                        seq: s, attrs, cmd, ..
                    } if s == seq && cmd != nl::NBD_CMD_LINK_DEAD => reply = Some(attrs),
                    Message::Ack { seq: s, errno } if s == seq => {
                        if errno == 0 {
                            return Ok(reply);
                        }
                        if self.family.id == nl::GENL_ID_CTRL && errno == libc::ENOENT {
                            return Err(AttachError::NoNbdModule);
                        }
                        return Err(AttachError::Kernel {
                            errno: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                    _ => {}
                }
            }
        }
    }

    /// One datagram from the kernel, parsed.
    fn receive(&mut self) -> Result<Vec<Message>, AttachError> {
        let mut buf = vec![0u8; RECV_BUF];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(sys("receiving from the kernel"))?;
        nl::parse_messages(&buf[..n]).map_err(AttachError::Parse)
    }

    /// `NBD_CMD_CONNECT`; returns the device index the kernel used.
    pub fn connect(&mut self, cfg: nl::ConnectConfig) -> Result<u32, AttachError> {
        let seq = self.next_seq();
        let wanted = cfg.index;
        let attrs = self.request(&nl::encode_connect(self.family.id, seq, &cfg), seq)?;
        attrs
            .as_deref()
            .and_then(nl::parse_index)
            .or(wanted)
            .ok_or(AttachError::NoIndex)
    }

    /// `NBD_CMD_RECONFIGURE`.
    pub fn reconfigure(&mut self, r: &nl::Reconfigure) -> Result<(), AttachError> {
        let seq = self.next_seq();
        self.request(&nl::encode_reconfigure(self.family.id, seq, r), seq)
            .map(|_| ())
    }

    /// `NBD_CMD_DISCONNECT`.
    pub fn disconnect(&mut self, index: u32) -> Result<(), AttachError> {
        let seq = self.next_seq();
        self.request(&nl::encode_disconnect(self.family.id, seq, index), seq)
            .map(|_| ())
    }

    /// Whether device `index` is configured (`NBD_CMD_STATUS`).
    pub fn connected(&mut self, index: u32) -> Result<bool, AttachError> {
        let seq = self.next_seq();
        let attrs = self.request(&nl::encode_status(self.family.id, seq, Some(index)), seq)?;
        let list =
            nl::parse_status(attrs.as_deref().unwrap_or_default()).map_err(AttachError::Parse)?;
        Ok(list.iter().any(|d| d.index == index && d.connected))
    }

    /// Joins the nbd multicast group, where the kernel announces dead connections.
    pub fn join_link_events(&mut self) -> Result<(), AttachError> {
        let gid = self
            .family
            .mcast_groups
            .iter()
            .find(|(n, _)| n == nl::NBD_MCAST_GROUP)
            .map(|(_, id)| *id)
            .ok_or(AttachError::NoMulticastGroup)?;
        // SAFETY: setsockopt on a socket we own, with a pointer to a live u32 and its size.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_fd().as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&gid as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(AttachError::Netlink {
                what: "joining the nbd multicast group",
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits up to `wait` for announcements; returns the indexes of devices whose
    /// connection died (`NBD_CMD_LINK_DEAD`), empty on timeout.
    pub fn link_dead_events(&mut self, wait: Duration) -> Result<Vec<u32>, AttachError> {
        let tv = TimeVal::new(wait.as_secs() as i64, wait.subsec_micros().into());
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).map_err(sys("setting a timeout"))?;
        let got = self.receive();
        let tv = TimeVal::new(REPLY_TIMEOUT.as_secs() as i64, 0);
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).map_err(sys("setting a timeout"))?;
        let msgs = match got {
            Ok(m) => m,
            Err(AttachError::Netlink { err, .. })
                if err.kind() == std::io::ErrorKind::WouldBlock =>
            {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                Message::Generic {
                    cmd: nl::NBD_CMD_LINK_DEAD,
                    attrs,
                    family,
                    ..
                } if *family == self.family.id => nl::parse_index(attrs),
                _ => None,
            })
            .collect())
    }
}
