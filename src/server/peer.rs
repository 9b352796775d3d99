//! Who is on the other end of a connection, and whether it may open an export.
//!
//! A connection's [`PeerIdentity`] is fixed at accept time (address, and on Unix sockets
//! the `SO_PEERCRED` credentials the kernel recorded when the client called `connect`),
//! plus the verified client certificate once TLS is up. An export's [`AccessPolicy`]
//! grants access; [`authorize`] decides. The rules (also in the docs):
//!
//! - A peer is allowed when **any** of its identities is allowed:
//!   - Unix credentials: the peer's uid is the daemon's own effective uid, or is listed in
//!     `allow_uid`, or the peer's **primary** gid (the only group `SO_PEERCRED` reports;
//!     supplementary groups are not visible) is listed in `allow_gid`. Root is not special:
//!     a daemon running as another user does not admit uid 0 unless it is listed.
//!   - A verified client certificate: its subject equals one of `allow_tls_subject`, or one
//!     of its SANs equals one of `allow_tls_san` (exact string comparison). When the export
//!     sets neither list, any certificate that passed client-CA verification is allowed.
//!   - `allow_anyone`: every peer that can connect, with no identity check. Plaintext TCP
//!     clients (and TLS clients without a certificate) have no identity, so they are refused
//!     unless the export sets this.
//! - Everything else is refused (default deny).

use std::fmt;

/// Credentials of a Unix-socket peer, as `SO_PEERCRED` reports them (taken by the kernel at
/// `connect` time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnixCred {
    pub uid: u32,
    /// The peer's primary (effective) gid; supplementary groups are not reported.
    pub gid: u32,
    pub pid: Option<i32>,
}

/// The identity in a client certificate that passed verification against the client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertIdentity {
    /// The subject, RFC 4514 style: `CN=client1,O=Example`.
    pub subject: String,
    /// Subject alternative names: `DNS:host`, `EMAIL:a@b`, `IP:1.2.3.4`, `URI:...`.
    pub sans: Vec<String>,
}

/// Who a connection's peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerIdentity {
    /// The peer's address: `IP:PORT` for TCP, `unix:PATH` (the listener's path) for Unix.
    pub addr: String,
    /// The listener the connection came in on (`tcp://...`, `unix://...`).
    pub listener: String,
    /// `SO_PEERCRED`, on Unix sockets only.
    pub cred: Option<UnixCred>,
    /// The verified client certificate, once TLS is established (only ever set for a
    /// certificate that passed client-CA verification).
    pub cert: Option<CertIdentity>,
}

impl PeerIdentity {
    /// A TCP peer (no identity until TLS).
    pub fn tcp(addr: String, listener: String) -> PeerIdentity {
        PeerIdentity {
            addr,
            listener,
            cred: None,
            cert: None,
        }
    }

    /// A Unix-socket peer with the credentials `SO_PEERCRED` gave (`None` if it failed).
    pub fn unix(addr: String, listener: String, cred: Option<UnixCred>) -> PeerIdentity {
        PeerIdentity {
            addr,
            listener,
            cred,
            cert: None,
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)?;
        if let Some(c) = &self.cred {
            write!(f, " (uid {}, gid {}", c.uid, c.gid)?;
            if let Some(pid) = c.pid {
                write!(f, ", pid {pid}")?;
            }
            f.write_str(")")?;
        }
        if let Some(cert) = &self.cert {
            write!(f, " (certificate {})", cert.subject)?;
        }
        Ok(())
    }
}

/// Who may open one export. The default grants nothing beyond the daemon's own uid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Unix-socket peers with these uids (besides the daemon's own).
    pub allow_uid: Vec<u32>,
    /// Unix-socket peers whose primary gid is one of these.
    pub allow_gid: Vec<u32>,
    /// TLS peers whose verified certificate has exactly this subject.
    pub allow_tls_subject: Vec<String>,
    /// TLS peers whose verified certificate has exactly this SAN (`DNS:host`, ...).
    pub allow_tls_san: Vec<String>,
    /// Every peer that can connect, no identity check (needed for plaintext TCP).
    pub allow_anyone: bool,
}

impl AccessPolicy {
    fn has_tls_list(&self) -> bool {
        !self.allow_tls_subject.is_empty() || !self.allow_tls_san.is_empty()
    }
}

/// Why a peer was allowed (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    DaemonUid,
    Uid,
    Gid,
    TlsSubject,
    TlsSan,
    AnyVerifiedCertificate,
    Anyone,
}

/// Decides whether `peer` may open an export with `policy`, on a daemon running as
/// `daemon_uid`. `Err` carries the reason for the server's log and audit (never sent to the
/// client).
pub(crate) fn authorize(
    policy: &AccessPolicy,
    peer: &PeerIdentity,
    daemon_uid: u32,
) -> Result<Grant, String> {
    if policy.allow_anyone {
        return Ok(Grant::Anyone);
    }
    let mut reasons = Vec::new();
    if let Some(c) = &peer.cred {
        if c.uid == daemon_uid {
            return Ok(Grant::DaemonUid);
        }
        if policy.allow_uid.contains(&c.uid) {
            return Ok(Grant::Uid);
        }
        if policy.allow_gid.contains(&c.gid) {
            return Ok(Grant::Gid);
        }
        reasons.push(format!(
            "uid {} is not the daemon's uid {daemon_uid} nor in allow_uid, and gid {} is not \
             in allow_gid",
            c.uid, c.gid
        ));
    }
    if let Some(cert) = &peer.cert {
        if !policy.has_tls_list() {
            return Ok(Grant::AnyVerifiedCertificate);
        }
        if policy.allow_tls_subject.contains(&cert.subject) {
            return Ok(Grant::TlsSubject);
        }
        if cert.sans.iter().any(|s| policy.allow_tls_san.contains(s)) {
            return Ok(Grant::TlsSan);
        }
        reasons.push(format!(
            "client certificate {:?} matches neither allow_tls_subject nor allow_tls_san",
            cert.subject
        ));
    }
    if peer.cred.is_none() && peer.cert.is_none() {
        reasons.push(
            "the client has no identity (TCP without a verified client certificate) and the \
             export does not set allow_anyone"
                .to_owned(),
        );
    }
    Err(reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAEMON: u32 = 0;

    fn unix(uid: u32, gid: u32) -> PeerIdentity {
        PeerIdentity::unix(
            "unix:/run/cryptvol/nbd.sock".into(),
            "unix:///run/cryptvol/nbd.sock".into(),
            Some(UnixCred {
                uid,
                gid,
                pid: Some(42),
            }),
        )
    }

    fn tls(subject: &str, sans: &[&str]) -> PeerIdentity {
        PeerIdentity {
            cert: Some(CertIdentity {
                subject: subject.into(),
                sans: sans.iter().map(|s| s.to_string()).collect(),
            }),
            ..PeerIdentity::tcp("192.0.2.7:40000".into(), "tcp://0.0.0.0:10809".into())
        }
    }

    fn plain_tcp() -> PeerIdentity {
        PeerIdentity::tcp("127.0.0.1:40000".into(), "tcp://127.0.0.1:10809".into())
    }

    #[test]
    fn unix_peers_other_than_the_daemon_uid_are_refused_by_default() {
        let p = AccessPolicy::default();
        assert_eq!(authorize(&p, &unix(0, 0), DAEMON), Ok(Grant::DaemonUid));
        let err = authorize(&p, &unix(65534, 65534), DAEMON).unwrap_err();
        assert!(err.contains("uid 65534"), "{err}");
        assert!(err.contains("allow_uid"), "{err}");
        // Root is not implicitly allowed by a daemon running as another user.
        assert!(authorize(&p, &unix(0, 0), 1000).is_err());
        assert_eq!(authorize(&p, &unix(1000, 1000), 1000), Ok(Grant::DaemonUid));
    }

    #[test]
    fn unix_peers_match_allow_uid_or_primary_gid() {
        let p = AccessPolicy {
            allow_uid: vec![1001],
            allow_gid: vec![2000],
            ..AccessPolicy::default()
        };
        assert_eq!(authorize(&p, &unix(1001, 1001), DAEMON), Ok(Grant::Uid));
        assert_eq!(authorize(&p, &unix(1002, 2000), DAEMON), Ok(Grant::Gid));
        assert!(authorize(&p, &unix(1002, 1002), DAEMON).is_err());
        // A uid listed as a gid (or the reverse) does not match.
        assert!(authorize(&p, &unix(2000, 1), DAEMON).is_err());
        assert!(authorize(&p, &unix(1, 1001), DAEMON).is_err());
    }

    #[test]
    fn unix_peer_without_credentials_is_refused() {
        let p = AccessPolicy {
            allow_uid: vec![1001],
            ..AccessPolicy::default()
        };
        let peer = PeerIdentity::unix("unix:/s".into(), "unix:///s".into(), None);
        assert!(authorize(&p, &peer, DAEMON).is_err());
    }

    #[test]
    fn plaintext_tcp_is_refused_unless_allow_anyone() {
        let mut p = AccessPolicy {
            allow_uid: vec![0],
            allow_tls_subject: vec!["CN=a".into()],
            ..AccessPolicy::default()
        };
        let err = authorize(&p, &plain_tcp(), DAEMON).unwrap_err();
        assert!(err.contains("no identity"), "{err}");
        p.allow_anyone = true;
        assert_eq!(authorize(&p, &plain_tcp(), DAEMON), Ok(Grant::Anyone));
        assert_eq!(authorize(&p, &unix(7, 7), DAEMON), Ok(Grant::Anyone));
    }

    #[test]
    fn any_verified_certificate_is_allowed_without_a_tls_list() {
        let p = AccessPolicy {
            allow_uid: vec![1001],
            ..AccessPolicy::default()
        };
        assert_eq!(
            authorize(&p, &tls("CN=whoever", &[]), DAEMON),
            Ok(Grant::AnyVerifiedCertificate)
        );
    }

    #[test]
    fn tls_lists_match_subject_or_one_san_exactly() {
        let p = AccessPolicy {
            allow_tls_subject: vec!["CN=client1,O=Example".into()],
            allow_tls_san: vec!["DNS:backup.example.org".into()],
            ..AccessPolicy::default()
        };
        assert_eq!(
            authorize(&p, &tls("CN=client1,O=Example", &[]), DAEMON),
            Ok(Grant::TlsSubject)
        );
        assert_eq!(
            authorize(
                &p,
                &tls("CN=other", &["EMAIL:a@b", "DNS:backup.example.org"]),
                DAEMON
            ),
            Ok(Grant::TlsSan)
        );
        for (subject, sans) in [
            ("CN=client1", &[][..]),
            ("cn=client1,o=example", &[][..]),
            ("CN=client1,O=Example,C=DE", &[][..]),
            ("CN=x", &["DNS:backup.example.org.evil"][..]),
            ("CN=x", &["backup.example.org"][..]),
            ("CN=x", &["IP:192.0.2.7"][..]),
        ] {
            let err = authorize(&p, &tls(subject, sans), DAEMON).unwrap_err();
            assert!(err.contains("allow_tls_subject"), "{err}");
        }
    }

    #[test]
    fn a_tls_peer_on_a_unix_socket_is_allowed_by_either_identity() {
        let p = AccessPolicy {
            allow_uid: vec![1001],
            allow_tls_subject: vec!["CN=a".into()],
            ..AccessPolicy::default()
        };
        let mut peer = unix(1001, 1001);
        peer.cert = Some(CertIdentity {
            subject: "CN=b".into(),
            sans: vec![],
        });
        assert_eq!(authorize(&p, &peer, DAEMON), Ok(Grant::Uid));
        peer.cred = Some(UnixCred {
            uid: 5,
            gid: 5,
            pid: None,
        });
        let err = authorize(&p, &peer, DAEMON).unwrap_err();
        assert!(err.contains("uid 5") && err.contains("CN=b"), "{err}");
        peer.cert = Some(CertIdentity {
            subject: "CN=a".into(),
            sans: vec![],
        });
        assert_eq!(authorize(&p, &peer, DAEMON), Ok(Grant::TlsSubject));
    }

    #[test]
    fn display_names_address_and_credentials() {
        assert_eq!(
            unix(5, 6).to_string(),
            "unix:/run/cryptvol/nbd.sock (uid 5, gid 6, pid 42)"
        );
        assert_eq!(
            tls("CN=a", &[]).to_string(),
            "192.0.2.7:40000 (certificate CN=a)"
        );
    }
}
