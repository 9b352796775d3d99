//! The daemon's side of live export management: the `export-add` hook (unlocking a
//! volume exactly as start-up does) and the config reload on SIGHUP, which applies the
//! difference between the configuration applied last and the file as it is now.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{self, CliOverrides, ExportSpec};
use crate::keys::{Argon2Params, PassphraseSource};
use crate::ops::KeyOptions;
use crate::server::control::{ExportAdd, ExportOpener, HookError};
use crate::server::{Export, LiveError, LiveExports};
use crate::volume::OpenOptions;

/// Opens the volume of an `export-add` request through `serve`'s own start-up path
/// (`open_export`: key states, policy and audit apply; same error wording).
pub(super) struct DaemonExports {
    keys: KeyOptions,
    /// The daemon's `--read-only` / `--discard` (they apply to every export).
    daemon: OpenOptions,
}

impl DaemonExports {
    /// The daemon's keys, with a passphrase only when it can be read again (a file).
    pub(super) fn new(keys: &KeyOptions, daemon: OpenOptions) -> DaemonExports {
        let passphrase = match &keys.passphrase {
            Some(PassphraseSource::File(p)) => Some(PassphraseSource::File(p.clone())),
            _ => None,
        };
        DaemonExports {
            keys: KeyOptions {
                keystore: keys.keystore.clone(),
                passphrase,
                argon2: Argon2Params::default(),
                audit_log: keys.audit_log.clone(),
            },
            daemon,
        }
    }

    /// Unlocks the volume of `spec` (errors as `serve` reports them at start-up).
    async fn open_spec(&self, spec: &ExportSpec) -> anyhow::Result<Export> {
        super::serve::open_export(spec, &self.keys).await
    }
}

#[async_trait::async_trait]
impl ExportOpener for DaemonExports {
    async fn open(&self, add: &ExportAdd) -> Result<Export, HookError> {
        let spec = config::spec_from_add(add, self.daemon)?;
        self.open_spec(&spec)
            .await
            .map_err(|e| HookError::from(format!("{e:#}")))
    }
}

/// What a SIGHUP re-reads: the config file `serve --config FILE` was started with,
/// combined with the same command line.
pub(super) struct ConfigReload {
    path: PathBuf,
    /// The command line, as at start-up.
    overrides: Box<dyn Fn() -> CliOverrides + Send + Sync>,
    /// The exports of the configuration applied last (those a refused change kept).
    applied: Vec<ExportSpec>,
    opener: Arc<DaemonExports>,
}

impl ConfigReload {
    pub(super) fn new(
        path: PathBuf,
        overrides: Box<dyn Fn() -> CliOverrides + Send + Sync>,
        applied: Vec<ExportSpec>,
        opener: Arc<DaemonExports>,
    ) -> ConfigReload {
        ConfigReload {
            path,
            overrides,
            applied,
            opener,
        }
    }

    /// Re-reads the file and applies the difference in exports. A broken file changes
    /// nothing; a refused step is logged and leaves that export as it is.
    pub(super) async fn reload(&mut self, live: &LiveExports) {
        let new = match self.read() {
            Ok(specs) => specs,
            Err(e) => {
                tracing::error!(
                    config = %self.path.display(),
                    "SIGHUP: the config file cannot be used, nothing changed: {e:#}"
                );
                return;
            }
        };
        let diff = config::diff_exports(&self.applied, &new);
        tracing::info!(
            config = %self.path.display(),
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            unchanged = diff.unchanged.len(),
            "SIGHUP: applying the config file's exports (other settings need a restart)"
        );
        for name in &diff.removed {
            self.remove(live, name).await;
        }
        for spec in &diff.changed {
            self.replace(live, spec).await;
        }
        for spec in &diff.added {
            self.add(live, spec).await;
        }
        tracing::info!(exports = live.list().len(), "SIGHUP: config reload done");
    }

    /// The exports the file and the command line give now.
    fn read(&self) -> anyhow::Result<Vec<ExportSpec>> {
        let file = config::load(&self.path)?;
        let settings = config::resolve(Some((&self.path, file)), (self.overrides)())?;
        Ok(settings.exports)
    }

    /// Removes an export the file no longer names (refused while clients are connected).
    async fn remove(&mut self, live: &LiveExports, name: &str) {
        match live.remove(name, false).await {
            Ok(_) | Err(LiveError::Unknown { .. }) => self.applied.retain(|s| s.name != name),
            Err(e) => tracing::warn!(
                export = %name,
                "SIGHUP: export removed from the config file is still served: {e}"
            ),
        }
    }

    /// A changed export is removed and added again, only when it has no clients.
    async fn replace(&mut self, live: &LiveExports, spec: &ExportSpec) {
        if let Some(e) = live.list().iter().find(|e| e.info.name == spec.name) {
            if e.connections() > 0 {
                tracing::warn!(
                    export = %spec.name,
                    connections = e.connections(),
                    "SIGHUP: export changed in the config file but has clients: it is served \
                     unchanged; reload again once they have disconnected"
                );
                return;
            }
        }
        match live.remove(&spec.name, false).await {
            Ok(_) | Err(LiveError::Unknown { .. }) => {
                self.applied.retain(|s| s.name != spec.name);
                self.add(live, spec).await;
            }
            Err(e) => tracing::warn!(
                export = %spec.name,
                "SIGHUP: export changed in the config file is served unchanged: {e}"
            ),
        }
    }

    /// Adds an export the file names now (a failure is retried at the next reload).
    async fn add(&mut self, live: &LiveExports, spec: &ExportSpec) {
        if live.contains(&spec.name) {
            tracing::warn!(
                export = %spec.name,
                "SIGHUP: {}",
                LiveError::AlreadyServed(spec.name.clone())
            );
            return;
        }
        let added = match self.opener.open_spec(spec).await {
            Ok(export) => live.add(export).map_err(anyhow::Error::new),
            Err(e) => Err(e),
        };
        match added {
            Ok(_) => self.applied.push(spec.clone()),
            Err(e) => tracing::error!(
                export = %spec.name,
                "SIGHUP: cannot add the export (retried at the next reload): {e:#}"
            ),
        }
    }
}
