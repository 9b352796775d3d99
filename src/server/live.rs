//! Exports added and removed while the server runs (`cryptvol exports add|remove`, a
//! config reload on SIGHUP). A [`LiveExports`] handle is shared by the server, its
//! control socket and the CLI's reload task: adding puts an already unlocked export into
//! the set; removing takes one out, after its clients have gone (or, forced, after they
//! have been disconnected cleanly), flushes its volume and drops it with its data key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::export::{Export, Exports};
use super::reencrypt::Jobs;
use super::ShutdownHandle;
use crate::volume::VolumeError;

/// How long a forced removal waits for the export's sessions to finish their in-flight
/// requests and close.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the connection count is looked at while waiting.
const DISCONNECT_POLL: Duration = Duration::from_millis(20);

/// Why an export could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("export {0:?} is already served; remove it first (cryptvol exports remove {0}) or choose another name")]
    AlreadyServed(String),
    #[error("no export named {name:?}; this daemon serves {served}")]
    Unknown { name: String, served: String },
    #[error("export {name:?} has {count} client(s) connected; disconnect them first, or use --force (flushes the volume and disconnects them)")]
    Busy { name: String, count: usize },
    #[error("export {0:?} is being re-encrypted by this daemon; wait until it finishes (cryptvol reencrypt {0} --status) and remove it then")]
    Reencrypting(String),
    #[error("export {name:?} is no longer served, but its volume is still in use after {secs} s ({count} client(s) connected, or a snapshot in progress); it is flushed and closed when that ends")]
    Stuck {
        name: String,
        count: usize,
        secs: u64,
    },
    #[error("export {name:?} is no longer served, but flushing its volume failed: {source}; check the backing file and its filesystem")]
    Flush { name: String, source: VolumeError },
}

/// What a removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Clients disconnected (forced removal).
    pub disconnected: usize,
}

/// The exports of a running server and what adding or removing one touches.
pub struct LiveExports {
    pub(crate) exports: Arc<Exports>,
    pub(crate) jobs: Arc<Jobs>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for LiveExports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveExports")
            .field("exports", &self.exports)
            .finish_non_exhaustive()
    }
}

impl LiveExports {
    /// The handle of a server that will serve `exports` until `shutdown`.
    pub fn new(exports: Exports, shutdown: &ShutdownHandle) -> Arc<LiveExports> {
        Arc::new(LiveExports {
            exports: Arc::new(exports),
            jobs: Arc::new(Jobs::default()),
            shutdown: shutdown.0.subscribe(),
        })
    }

    /// Whether an export of this name is served (checked before unlocking a new one, so
    /// that no key is unwrapped for a name that would be refused).
    pub fn contains(&self, name: &str) -> bool {
        self.exports.get(name).is_some()
    }

    /// The exports served now.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.exports.list()
    }

    /// Serves an unlocked export from now on, resuming a re-encryption its volume
    /// reports in progress. Other exports are not touched.
    pub fn add(&self, export: Export) -> Result<Arc<Export>, LiveError> {
        let name = export.info.name.clone();
        let added = self
            .exports
            .insert(export)
            .ok_or_else(|| LiveError::AlreadyServed(name.clone()))?;
        super::resume_reencryption(&added, &self.jobs, &self.shutdown);
        tracing::info!(export = %name, "export added");
        Ok(added)
    }

    /// Stops serving `name`. With clients connected it is refused unless `force`, which
    /// disconnects them as a shutdown does (in-flight requests finish and are answered,
    /// then the connection closes). The volume is flushed and dropped with its data key.
    pub async fn remove(&self, name: &str, force: bool) -> Result<Removed, LiveError> {
        // Only a look: the handle must not outlive the check (see `wait_for_clients`).
        let found = self.exports.get(name).ok_or_else(|| self.unknown(name))?;
        self.check_removable(&found, force)?;
        drop(found);
        let Some(export) = self.exports.take(name) else {
            return Err(self.unknown(name));
        };
        let count = export.connections();
        export.disconnect_clients();
        wait_for_clients(&export).await?;
        let vol = export.volume.clone();
        let flushed = tokio::task::spawn_blocking(move || vol.flush()).await;
        if let Ok(Err(source)) = flushed {
            return Err(LiveError::Flush {
                name: name.to_string(),
                source,
            });
        }
        drop(export);
        tracing::info!(export = %name, disconnected = count, "export removed");
        Ok(Removed {
            disconnected: count,
        })
    }

    /// Refuses the removal of an export with clients (unless forced) or a running
    /// re-encryption.
    fn check_removable(&self, export: &Export, force: bool) -> Result<(), LiveError> {
        let name = &export.info.name;
        if self.jobs.state(name).is_some_and(|j| j.running) {
            return Err(LiveError::Reencrypting(name.clone()));
        }
        let count = export.connections();
        if count > 0 && !force {
            return Err(LiveError::Busy {
                name: name.clone(),
                count,
            });
        }
        Ok(())
    }

    fn unknown(&self, name: &str) -> LiveError {
        let names: Vec<String> = self
            .exports
            .iter()
            .map(|e| format!("{:?}", e.info.name))
            .collect();
        LiveError::Unknown {
            name: name.chars().take(64).collect(),
            served: if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            },
        }
    }
}

/// Waits until the sessions of a removed export have closed and nothing else (a session
/// ending, the map writeback, a status answer) still holds it, so that the volume (its
/// in-use lock, its data key) is released when the caller drops the last handle and the
/// same file can be served again at once.
async fn wait_for_clients(export: &Arc<Export>) -> Result<(), LiveError> {
    let start = Instant::now();
    while export.connections() > 0 || Arc::strong_count(export) > 1 {
        if start.elapsed() > DISCONNECT_TIMEOUT {
            return Err(LiveError::Stuck {
                name: export.info.name.clone(),
                count: export.connections(),
                secs: DISCONNECT_TIMEOUT.as_secs(),
            });
        }
        tokio::time::sleep(DISCONNECT_POLL).await;
    }
    Ok(())
}
