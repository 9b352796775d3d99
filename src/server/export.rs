//! Exports: the volumes being served, as the protocol layer sees them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::metrics::ExportMetrics;
use super::peer::{authorize, AccessPolicy, PeerIdentity};
use crate::blockdev::BlockDevice;
use crate::nbd::{ExportCatalog, ExportInfo, LookupError, NbdErrno, MAX_PAYLOAD};
use crate::volume::{Volume, VolumeError};

/// One served volume.
pub struct Export {
    pub info: ExportInfo,
    /// What NBD sessions read and write: the volume, as a [`BlockDevice`].
    pub device: Arc<dyn BlockDevice>,
    /// The same volume, for what is not block I/O (control socket, re-encryption,
    /// snapshots, map writeback).
    pub volume: Arc<Volume>,
    /// Who may open it.
    pub policy: AccessPolicy,
    /// Connections in transmission on this export.
    active: AtomicUsize,
    /// Request, error and connection counters (`serve --metrics`).
    pub metrics: Arc<ExportMetrics>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("info", &self.info)
            .field("volume", &self.volume)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Export {
    pub fn new(name: String, volume: Volume) -> Export {
        let sector = volume.sector_size();
        let info = ExportInfo {
            description: format!(
                "cryptvol volume {} (aes-xts-plain64, {}-byte sectors{})",
                volume.uuid(),
                sector,
                if volume.read_only() {
                    ", read-only"
                } else {
                    ""
                }
            ),
            name,
            size: volume.size(),
            read_only: volume.read_only(),
            // Any alignment is served (read-modify-write under the range lock), so
            // libnbd-based tools need no flags; whole sectors avoid the read-modify-write.
            min_block: 1,
            preferred_block: sector,
            max_block: MAX_PAYLOAD,
        };
        let volume = Arc::new(volume);
        Export {
            info,
            device: volume.clone(),
            volume,
            policy: AccessPolicy::default(),
            active: AtomicUsize::new(0),
            metrics: Arc::new(ExportMetrics::default()),
        }
    }

    /// The same export with this access policy (the default admits only the daemon's uid).
    pub fn with_policy(mut self, policy: AccessPolicy) -> Export {
        self.policy = policy;
        self
    }

    /// Connections in transmission on this export.
    pub fn connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection until the guard is dropped.
    pub(crate) fn connection_guard(&self) -> ConnectionGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.connection_opened();
        ConnectionGuard(&self.active)
    }
}

/// Counts one connection of an export while it lives.
pub(crate) struct ConnectionGuard<'a>(&'a AtomicUsize);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The set of exports of a server.
#[derive(Debug)]
pub struct Exports(Vec<Export>);

impl Exports {
    pub fn new(exports: Vec<Export>) -> Exports {
        Exports(exports)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.0.iter()
    }
    pub fn get(&self, name: &str) -> Option<&Export> {
        self.0.iter().find(|e| e.info.name == name)
    }
}

/// The exports as one connection's peer sees them: those it may not open are hidden from
/// `NBD_OPT_LIST` and refused with `NBD_REP_ERR_POLICY` (see [`super::peer`] for the rules).
pub(crate) struct AuthorizedCatalog<'a> {
    pub exports: &'a Exports,
    pub peer: &'a PeerIdentity,
    /// The daemon's effective uid (always admitted on Unix sockets).
    pub daemon_uid: u32,
}

impl ExportCatalog for AuthorizedCatalog<'_> {
    fn lookup(&self, name: &str) -> Result<ExportInfo, LookupError> {
        let export = self.exports.get(name).ok_or(LookupError::Unknown)?;
        match authorize(&export.policy, self.peer, self.daemon_uid) {
            Ok(grant) => {
                tracing::debug!(export = %name, peer = %self.peer, ?grant, "access granted");
                Ok(export.info.clone())
            }
            Err(reason) => Err(LookupError::Denied(reason)),
        }
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .filter(|e| authorize(&e.policy, self.peer, self.daemon_uid).is_ok())
            .map(|e| e.info.clone())
            .collect()
    }
    fn default_export(&self) -> Option<String> {
        match self.exports.0.as_slice() {
            [only] => Some(only.info.name.clone()),
            _ => None,
        }
    }
}

/// The one place volume errors become NBD error values.
pub fn errno_for(e: &VolumeError) -> NbdErrno {
    match e {
        VolumeError::OutOfRange { .. } => NbdErrno::Inval,
        VolumeError::ReadOnly => NbdErrno::Perm,
        VolumeError::NoSpace(_) => NbdErrno::NoSpc,
        VolumeError::Io { source, .. } => NbdErrno::from_io_error(source),
        VolumeError::Truncated { .. } | VolumeError::Crypto(_) => NbdErrno::Io,
        VolumeError::NotAVolume { .. }
        | VolumeError::BothHeadersDamaged { .. }
        | VolumeError::UnsupportedVersion { .. }
        | VolumeError::UnsupportedFeature { .. }
        | VolumeError::InvalidHeader { .. }
        | VolumeError::KeyCheckFailed { .. }
        | VolumeError::HeaderMacMismatch { .. }
        | VolumeError::AlreadyExists { .. }
        | VolumeError::InUse { .. }
        | VolumeError::BadSize { .. }
        | VolumeError::BadSectorSize(_)
        | VolumeError::ReencryptKeyNeeded { .. }
        | VolumeError::ReencryptInterrupted { .. }
        | VolumeError::Reencrypt { .. }
        | VolumeError::Resize { .. }
        | VolumeError::Snapshot { .. } => NbdErrno::Io,
    }
}
