//! The facts about one scanned item that `scan.rs` gathers and the rules judge: the
//! [`Subject`], and for a volume its header, keyslots and master keys.

use crate::compliance::detect::DataKind;
use crate::keys::KeyState;
use crate::volume::HeaderHealth;

/// Rotation facts of a master key (local keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationFacts {
    /// Material versions the key has (1 = never rotated).
    pub versions: u32,
    /// When the newest material was created (Unix seconds).
    pub current_since_unix: u64,
}

/// What the key backend says about a keyslot's master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFacts {
    /// A passphrase keyslot (no master key).
    Passphrase,
    /// The key exists.
    Found {
        state: KeyState,
        /// For PendingDeletion: when the material is destroyed.
        deletion_date: Option<String>,
        /// `None`: the backend does not tell (aws-kms, exec).
        rotation: Option<RotationFacts>,
    },
    /// The backend says the key does not exist (deleted, purged, never existed here).
    Missing(String),
    /// A keyslot backend this cryptvol does not know.
    UnsupportedBackend,
    /// The lookup failed (keystore unreadable, backend unreachable, access denied).
    LookupFailed(String),
}

/// One keyslot of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFacts {
    pub backend: String,
    pub key_id: String,
    pub key: KeyFacts,
}

impl SlotFacts {
    pub(super) fn label(&self) -> String {
        if self.key_id.is_empty() {
            self.backend.clone()
        } else {
            format!("{} key {}", self.backend, self.key_id)
        }
    }
}

/// A file with a usable cryptvol header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFacts {
    pub uuid: uuid::Uuid,
    pub health: HeaderHealth,
    pub required_features: Vec<String>,
    /// `data_offset + size`: the length the file must have.
    pub needed_len: u64,
    /// The file's (or device's) length, when known.
    pub file_len: Option<u64>,
    pub slots: Vec<SlotFacts>,
    /// What is wrong with the allocation map (thin volumes), if anything.
    pub map_problem: Option<String>,
    /// Why the header's geometry cannot be right for the file (checked without a key,
    /// before anything is allocated from it), if it cannot.
    pub header_invalid: Option<String>,
}

/// Why a file with cryptvol magic has no usable header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    BothCopiesDamaged { primary: String, secondary: String },
    Truncated(String),
    UnsupportedVersion { version: u32, supported: String },
    UnsupportedFeature { features: Vec<String> },
}

/// Everything known about one scanned item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Volume(VolumeFacts),
    BrokenVolume(HeaderProblem),
    /// Not a cryptvol volume: what its content looks like.
    Foreign(DataKind),
    /// Could not be read: why.
    Unreadable(String),
    /// Not checked: why.
    Skipped(String),
}
