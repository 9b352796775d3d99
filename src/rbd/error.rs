//! The RBD layer's errors: each says what happened and what to do.

use std::io;
use std::path::PathBuf;

/// What went wrong talking to the Ceph cluster.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("no Ceph configuration at {}: set CEPH_CONF or create /etc/ceph/ceph.conf", path.display())]
    NoConfig { path: PathBuf },
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
    #[error(
        "Ceph {op} on {target} timed out after {secs} s: the cluster is unreachable, full \
         or degraded (check `ceph -s`)"
    )]
    Timeout {
        op: &'static str,
        target: String,
        secs: u64,
    },
    #[error(
        "RBD image {image} is locked by {holder}: it is served elsewhere; stop that server, \
         or, if its host is dead, take the image over (the old owner is blocklisted)"
    )]
    Locked { image: String, holder: String },
    #[error(
        "this Ceph client is blocklisted ({op} on {target}): another server took the image \
         over; this one must stop serving it"
    )]
    Blocklisted { op: &'static str, target: String },
    #[error(
        "{op} on {target} was refused: another client holds the image's exclusive lock \
         (is it served elsewhere?)"
    )]
    NotLockOwner { op: &'static str, target: String },
    #[error("RBD image {image} does not exist (create it first)")]
    NotFound { image: String },
    #[error("{op} on {target} ends at byte {end}, past the image's end ({size} bytes)")]
    PastEnd {
        op: &'static str,
        target: String,
        end: u64,
        size: u64,
    },
    #[error("Ceph {op} on {target} failed: {source}")]
    Call {
        op: &'static str,
        target: String,
        source: io::Error,
    },
}

impl RbdError {
    /// Maps a negative errno from librados or librbd to the error naming its cause.
    pub(super) fn from_ret(op: &'static str, target: &str, ret: i64, timeout_secs: u64) -> Self {
        let errno = ret
            .checked_neg()
            .and_then(|e| i32::try_from(e).ok())
            .unwrap_or(libc::EIO);
        let target = target.to_string();
        match errno {
            libc::ETIMEDOUT => RbdError::Timeout {
                op,
                target,
                secs: timeout_secs,
            },
            // librados reports EBLOCKLISTED as ESHUTDOWN.
            libc::ESHUTDOWN => RbdError::Blocklisted { op, target },
            // librbd's answer to I/O while another client holds the exclusive lock.
            libc::EROFS => RbdError::NotLockOwner { op, target },
            _ => RbdError::Call {
                op,
                target,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    /// The `std::io::ErrorKind` the volume layer sees (a timeout is `TimedOut`).
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            RbdError::Timeout { .. } => io::ErrorKind::TimedOut,
            RbdError::Blocklisted { .. } => io::ErrorKind::PermissionDenied,
            RbdError::NotFound { .. } | RbdError::NoConfig { .. } => io::ErrorKind::NotFound,
            RbdError::Locked { .. } => io::ErrorKind::ResourceBusy,
            RbdError::NotLockOwner { .. } => io::ErrorKind::ReadOnlyFilesystem,
            RbdError::PastEnd { .. } => io::ErrorKind::InvalidInput,
            RbdError::Nul { .. } => io::ErrorKind::InvalidInput,
            RbdError::Call { source, .. } => source.kind(),
        }
    }
}

impl From<RbdError> for io::Error {
    fn from(e: RbdError) -> io::Error {
        io::Error::new(e.io_kind(), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_name_their_cause() {
        let t = RbdError::from_ret("writing", "rbd:rbd/v", -i64::from(libc::ETIMEDOUT), 7);
        assert!(matches!(t, RbdError::Timeout { secs: 7, .. }), "{t}");
        assert!(t.to_string().contains("timed out after 7 s"), "{t}");
        let b = RbdError::from_ret("writing", "rbd:rbd/v", -i64::from(libc::ESHUTDOWN), 7);
        assert!(matches!(b, RbdError::Blocklisted { .. }), "{b}");
        let l = RbdError::from_ret("writing", "rbd:rbd/v", -i64::from(libc::EROFS), 7);
        assert!(matches!(l, RbdError::NotLockOwner { .. }), "{l}");
        let other = RbdError::from_ret("reading", "rbd:rbd/v", -i64::from(libc::EIO), 7);
        assert!(other.to_string().contains("Input/output error"), "{other}");
        // An errno that does not fit is still an error, not a panic.
        let odd = RbdError::from_ret("reading", "rbd:rbd/v", i64::MIN, 7);
        assert!(matches!(odd, RbdError::Call { .. }), "{odd}");
    }

    #[test]
    fn io_errors_keep_the_kind_and_the_message() {
        let cases = [
            (libc::ETIMEDOUT, io::ErrorKind::TimedOut),
            (libc::ESHUTDOWN, io::ErrorKind::PermissionDenied),
            (libc::EROFS, io::ErrorKind::ReadOnlyFilesystem),
            (libc::ENOSPC, io::ErrorKind::StorageFull),
        ];
        for (errno, kind) in cases {
            let e = RbdError::from_ret("writing", "rbd:rbd/v", -i64::from(errno), 5);
            let text = e.to_string();
            let io: io::Error = e.into();
            assert_eq!(io.kind(), kind, "{text}");
            assert_eq!(io.to_string(), text);
        }
    }
}
