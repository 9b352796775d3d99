//! Hooks the CLI plugs in: key material and the snapshot store live outside the server
//! layer, so the daemon's re-encryption and snapshot requests call out through these.

use std::sync::Arc;

use serde_json::Value;

use super::exports_protocol::ExportAdd;
use crate::crypto::Dek;
use crate::keys::WrappedDek;
use crate::progress::Progress;
use crate::server::Export;
use crate::volume::{SnapshotView, Volume};

/// An error from a hook, shown to the client as it is.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Makes the new data key of an online re-encryption: a fresh DEK, wrapped for every
/// keyslot of the volume (same order), bound to the volume's encryption context. Refuses
/// what the daemon cannot do (e.g. passphrase keyslots) before generating anything.
#[async_trait::async_trait]
pub trait DataKeyMaker: Send + Sync {
    async fn new_data_key(&self, volume: &Volume) -> Result<(Dek, Vec<WrappedDek>), HookError>;
}

/// What a snapshot through the daemon works on.
#[derive(Debug)]
pub struct SnapshotJob {
    pub export: String,
    pub volume: Arc<Volume>,
    /// The point-in-time view (copy-before-write until it is dropped).
    pub view: SnapshotView,
    /// The store as the client gave it (`file:///DIR`, an absolute directory, `s3://…`).
    pub store: String,
    pub description: String,
    /// Parent snapshot id (`None`: the store's default choice).
    pub parent: Option<String>,
}

/// Takes a snapshot from a view into a store (connected to `crate::snapshot` by the CLI).
/// Reports bytes through `progress` (created hidden by the daemon, total = volume size;
/// the daemon streams its position to the client). Returns what to tell the client (a
/// JSON value, e.g. the snapshot id and counts).
#[async_trait::async_trait]
pub trait SnapshotTaker: Send + Sync {
    async fn take(&self, job: SnapshotJob, progress: &Progress) -> Result<Value, HookError>;
}

/// Unlocks the volume of an `export-add` request the way the daemon unlocks its exports
/// at start-up (key states, policy and audit apply) and makes it an [`Export`] with the
/// request's options and access rules.
#[async_trait::async_trait]
pub trait ExportOpener: Send + Sync {
    async fn open(&self, add: &ExportAdd) -> Result<Export, HookError>;
}

/// The hooks of a daemon (`None`: that op answers that it is not available).
#[derive(Clone, Default)]
pub struct ControlHooks {
    pub keys: Option<Arc<dyn DataKeyMaker>>,
    pub snapshots: Option<Arc<dyn SnapshotTaker>>,
    /// `export-add` (`None`: refused).
    pub exports: Option<Arc<dyn ExportOpener>>,
}

impl std::fmt::Debug for ControlHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlHooks")
            .field("keys", &self.keys.is_some())
            .field("snapshots", &self.snapshots.is_some())
            .field("exports", &self.exports.is_some())
            .finish()
    }
}
