//! Exports: the volumes being served, as the protocol layer sees them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use super::metrics::ExportMetrics;
use super::peer::{authorize, AccessPolicy, PeerIdentity};
use crate::blockdev::BlockDevice;
use crate::nbd::{ExportCatalog, ExportInfo, LookupError, NbdErrno, MAX_PAYLOAD};
use crate::volume::{Volume, VolumeError};

/// One served volume.
pub struct Export {
    /// What the export is, as at creation: its `size` is not updated by an online grow;
    /// handshakes use [`Export::info_now`].
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
    /// Set when the export is removed while served: its sessions stop reading, finish
    /// their in-flight requests and close (as at shutdown).
    removed: watch::Sender<bool>,
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
            removed: watch::channel(false).0,
        }
    }

    /// The same export with this access policy (the default admits only the daemon's uid).
    pub fn with_policy(mut self, policy: AccessPolicy) -> Export {
        self.policy = policy;
        self
    }

    /// What a handshake offers now: the cached info with the volume's current size (an
    /// online grow raises it; sessions already in transmission keep theirs).
    pub fn info_now(&self) -> ExportInfo {
        ExportInfo {
            size: self.volume.size(),
            ..self.info.clone()
        }
    }

    /// Connections in transmission on this export.
    pub fn connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Tells every session of this export to close (see [`Export::removal`]).
    pub(crate) fn disconnect_clients(&self) {
        self.removed.send_replace(true);
    }

    /// A receiver that turns `true` once the export's clients are to be disconnected
    /// (already `true` for a session that starts after that).
    pub(crate) fn removal(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
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

/// The set of exports of a server. It changes while serving (`cryptvol exports add` /
/// `remove`, a config reload: see [`super::live`]); readers take a snapshot.
#[derive(Debug)]
pub struct Exports(RwLock<Vec<Arc<Export>>>);

impl Exports {
    pub fn new(exports: Vec<Export>) -> Exports {
        Exports(RwLock::new(exports.into_iter().map(Arc::new).collect()))
    }
    /// The exports served now (a snapshot, in the order they were added).
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Export>> {
        self.list().into_iter()
    }
    /// The exports served now.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|e| e.info.name == name)
            .cloned()
    }
    /// Adds an export; `None` (and the export dropped) when its name is already served.
    pub(crate) fn insert(&self, export: Export) -> Option<Arc<Export>> {
        let mut list = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if list.iter().any(|e| e.info.name == export.info.name) {
            return None;
        }
        let export = Arc::new(export);
        list.push(export.clone());
        Some(export)
    }
    /// Takes an export out of the set (new clients no longer find it).
    pub(crate) fn take(&self, name: &str) -> Option<Arc<Export>> {
        let mut list = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let at = list.iter().position(|e| e.info.name == name)?;
        Some(list.remove(at))
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
                Ok(export.info_now())
            }
            Err(reason) => Err(LookupError::Denied(reason)),
        }
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .filter(|e| authorize(&e.policy, self.peer, self.daemon_uid).is_ok())
            .map(|e| e.info_now())
            .collect()
    }
    fn default_export(&self) -> Option<String> {
        match self.exports.list().as_slice() {
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
