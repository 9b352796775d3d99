//! Volumes: the on-disk header (two copies, keyslots, MAC) and encrypted
//! backing-file I/O with sector arithmetic and read-modify-write.
//! Knows nothing about NBD or key backends beyond the [`WrappedDek`] it stores.

mod alloc;
mod backing;
mod cipher;
mod cow;
#[cfg(test)]
pub(crate) mod crashstates;
mod engine;
mod engine_direct;
mod engine_select;
#[cfg(test)]
mod engine_suite;
mod engine_uring;
#[doc(hidden)]
pub(crate) mod fuzz_hooks;
pub(crate) mod geometry;
mod header;
mod io;
mod open;
mod rangelock;
mod reencrypt;
mod resize;
mod resize_online;
mod sectors;
mod snapshot_view;
mod tracking;
mod write;

pub use alloc::{MapHealth, MapLayout, MapSummary, CHUNKS_PER_PAGE, DEFAULT_CHUNK_SIZE};
pub use backing::{is_rbd_path, read_image_prefix, set_rbd_settings, RbdSettings, CEPH_ID_ENV};
pub use engine_select::EngineChoice;
pub use header::{
    create, create_with, read_header, write_header, CopyStatus, Header, HeaderHealth, Hotzone,
    Reencryption, FORMAT_VERSION, HEADER_COPY_SIZE, KNOWN_REQUIRED_FEATURES, MAX_KEYSLOTS,
    REENCRYPT_FEATURE,
};
pub use io::Volume;
pub use open::OpenOptions;
pub use reencrypt::{ReencryptStatus, ZONE_SECTORS};
pub use resize::Growth;
pub use snapshot_view::{test_delay as snapshot_test_delay, SnapshotView};
pub use tracking::SNAPSHOT_CHUNK;
pub use write::WRITE_CHUNK;
// The backing-store seam, for engines outside this module (src/rbd/file_engine.rs).
#[cfg(feature = "rbd")]
pub(crate) use engine::FileEngine;

/// One run of the allocation map, as [`Volume::extents`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Volume byte offset.
    pub offset: u64,
    /// Length in bytes (> 0).
    pub len: u64,
    /// `false`: never written (or zeroed/trimmed): reads as zeros without touching the file.
    pub allocated: bool,
}

/// Test-only fault injection for the crash-safety tests of header updates (rekey,
/// keyslot add/remove). It acts only when **both** `CRYPTVOL_FAULT_INJECTION=1` and
/// `CRYPTVOL_TEST_CRASH_AT=<step>` are set in the environment and `step` is the one
/// named: the process then kills itself with SIGKILL on the spot (no destructors, no
/// flushing), as `kill -9` at that instant would. Steps are listed in docs/keys.md.
///
/// With `CRYPTVOL_TEST_CRASH_SKIP=<n>` also set, the first `n` times the step is
/// reached are let through (to crash in the middle of a workload, not at its start).
pub fn crash_point(step: &str) {
    static HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crash_point_active(step) {
        let skip = std::env::var("CRYPTVOL_TEST_CRASH_SKIP")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < skip {
            return;
        }
        eprintln!("cryptvol: fault injection: killing the process at step {step}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    }
}

/// Whether [`crash_point`] would act at `step`.
pub fn crash_point_active(step: &str) -> bool {
    std::env::var_os("CRYPTVOL_FAULT_INJECTION").is_some_and(|v| v == "1")
        && std::env::var_os("CRYPTVOL_TEST_CRASH_AT").is_some_and(|s| s == step)
}

/// Reads the allocation map of the volume at `path` (whose header is `header`)
/// without its key: allocated bytes and the map's health, for `cryptvol info`.
/// `None` for volumes without a map.
pub fn map_summary(
    path: &std::path::Path,
    header: &Header,
) -> Result<Option<MapSummary>, VolumeError> {
    let Some(layout) = &header.allocation_map else {
        return Ok(None);
    };
    let io = |source| VolumeError::Io {
        path: path.display().to_string(),
        source,
    };
    let engine = match backing::open_rbd_path(path, backing::Access::Inspect) {
        Some(engine) => engine?,
        None => {
            let file = std::fs::File::open(path).map_err(io)?;
            engine::engine_for(std::sync::Arc::new(file), path)
        }
    };
    alloc::summarize(&*engine, layout, &header.uuid, header.size)
        .map(Some)
        .map_err(|e| map_error(path, e))
}

/// A failure to load an allocation map: a geometry the file cannot hold is a header
/// problem (damaged or forged), anything else an I/O error.
pub(crate) fn map_error(path: &std::path::Path, e: std::io::Error) -> VolumeError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        VolumeError::InvalidHeader {
            path: path.display().to_string(),
            detail: e.to_string(),
        }
    } else {
        VolumeError::Io {
            path: path.display().to_string(),
            source: e,
        }
    }
}

/// Default XTS data unit / logical sector size.
pub const DEFAULT_SECTOR_SIZE: u32 = 4096;
/// Default (and minimum) offset of the data area.
pub const DEFAULT_DATA_OFFSET: u64 = 1 << 20;
/// The only cipher of format v1.
pub const CIPHER: &str = "aes-xts-plain64";

/// What a caller chooses at create time.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub size: u64,
    pub sector_size: u32,
}

/// Errors of the volume layer.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{path}: not a cryptvol volume (no valid header magic)")]
    NotAVolume { path: String },
    #[error("{path}: file is truncated: {detail}")]
    Truncated { path: String, detail: String },
    #[error("{path}: both header copies are damaged ({primary}; {secondary}); restore the header from a backup")]
    BothHeadersDamaged {
        path: String,
        primary: String,
        secondary: String,
    },
    #[error("{path}: unsupported format version {version}; this cryptvol understands version(s) {supported}")]
    UnsupportedVersion {
        path: String,
        version: u32,
        supported: String,
    },
    #[error("{path}: volume requires unknown feature(s) {features}; upgrade cryptvol")]
    UnsupportedFeature { path: String, features: String },
    #[error("{path}: invalid header: {detail}")]
    InvalidHeader { path: String, detail: String },
    #[error("{path}: the unwrapped key does not match this volume's key check value (wrong key for this volume)")]
    KeyCheckFailed { path: String },
    #[error("{path}: header authentication failed: the header was modified after it was written (tampering or corruption)")]
    HeaderMacMismatch { path: String },
    #[error("{path} is already open for writing (served by this or another cryptvol process); serve each volume once, or use --read-only everywhere")]
    InUse { path: String },
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists { path: String },
    #[error("size {size} is not a positive multiple of the sector size {sector_size}")]
    BadSize { size: u64, sector_size: u32 },
    #[error("sector size {0} is not supported (use 4096 or 512)")]
    BadSectorSize(u32),
    #[error("request [{offset}, +{len}) lies beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{path}: a re-encryption is in progress; opening it needs the new data key too (cryptvol unlocks both from the header's keyslots)")]
    ReencryptKeyNeeded { path: String },
    #[error("{path}: a re-encryption step was interrupted; open the volume read-write once (cryptvol serve or cryptvol reencrypt) to finish it before a read-only open")]
    ReencryptInterrupted { path: String },
    #[error("{path}: {detail}")]
    Reencrypt { path: String, detail: String },
    #[error("{path}: {detail}")]
    Resize { path: String, detail: String },
    #[error("{path}: cannot snapshot: {detail}")]
    Snapshot { path: String, detail: String },
    #[error("volume is read-only")]
    ReadOnly,
    #[error("no space left on the backing file's filesystem: {0}")]
    NoSpace(std::io::Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}
