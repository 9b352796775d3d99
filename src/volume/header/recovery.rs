//! Reading both header copies and choosing between them: the copy with the highest
//! valid sequence wins, the other is reported as stale or damaged ([`HeaderHealth`]),
//! and the reasons both copies are unusable become the matching [`VolumeError`].

use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::copy::{decode_copy, CopyRead, COPY_LEN};
use super::{io_err, Header, VolumeError, FORMAT_VERSION, HEADER_AREA_SIZE};
use crate::volume::engine::{engine_for_borrowed, FileEngine};

/// Health of one header copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum CopyStatus {
    /// Valid and current.
    Ok,
    /// Valid but older than the other copy (sequence number given).
    Stale(u64),
    /// Unreadable: the reason.
    Damaged(String),
}

/// Health of both copies.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeaderHealth {
    pub primary: CopyStatus,
    pub secondary: CopyStatus,
}

impl HeaderHealth {
    /// Both copies valid and current.
    pub fn is_healthy(&self) -> bool {
        self.primary == CopyStatus::Ok && self.secondary == CopyStatus::Ok
    }
}

/// The result of reading both copies.
pub(super) struct Copies {
    reads: [CopyRead; 2],
    file_len: u64,
}

impl Copies {
    pub(super) fn good(&self, i: usize) -> Option<&Header> {
        match &self.reads[i] {
            CopyRead::Good(h) => Some(h),
            _ => None,
        }
    }

    /// Index of the winning copy: highest sequence among good copies (primary on a tie).
    fn winner(&self) -> Option<usize> {
        match (self.good(0), self.good(1)) {
            (Some(p), Some(s)) => Some(if s.sequence > p.sequence { 1 } else { 0 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        }
    }

    fn status(&self, i: usize, winner: &Header) -> CopyStatus {
        match &self.reads[i] {
            CopyRead::Good(h) if h.uuid != winner.uuid => CopyStatus::Damaged(format!(
                "belongs to another volume (UUID {}, the other copy has {})",
                h.uuid, winner.uuid
            )),
            CopyRead::Good(h) if h.sequence < winner.sequence => CopyStatus::Stale(h.sequence),
            CopyRead::Good(_) => CopyStatus::Ok,
            CopyRead::NoMagic(r) | CopyRead::Damaged(r) => CopyStatus::Damaged(r.clone()),
            CopyRead::UnknownVersion(v) => {
                CopyStatus::Damaged(format!("unknown format version {v}"))
            }
        }
    }

    fn reason(&self, i: usize) -> String {
        match &self.reads[i] {
            CopyRead::NoMagic(r) | CopyRead::Damaged(r) => r.clone(),
            CopyRead::UnknownVersion(v) => format!("unknown format version {v}"),
            CopyRead::Good(_) => "valid".into(),
        }
    }

    /// The winning header and the health of both copies, or why there is none.
    pub(super) fn resolve(&self, path: &Path) -> Result<(Header, HeaderHealth), VolumeError> {
        let p = || path.display().to_string();
        for r in &self.reads {
            if let CopyRead::UnknownVersion(version) = r {
                return Err(VolumeError::UnsupportedVersion {
                    path: p(),
                    version: *version,
                    supported: FORMAT_VERSION.to_string(),
                });
            }
        }
        let Some(w) = self.winner() else {
            let no_magic = self.reads.iter().all(|r| matches!(r, CopyRead::NoMagic(_)));
            if no_magic {
                return Err(VolumeError::NotAVolume { path: p() });
            }
            if self.file_len < HEADER_AREA_SIZE {
                return Err(VolumeError::Truncated {
                    path: p(),
                    detail: format!(
                        "{} bytes, but the two header copies alone need {HEADER_AREA_SIZE}",
                        self.file_len
                    ),
                });
            }
            return Err(VolumeError::BothHeadersDamaged {
                path: p(),
                primary: self.reason(0),
                secondary: self.reason(1),
            });
        };
        let Some(winner) = self.good(w) else {
            return Err(VolumeError::NotAVolume { path: p() });
        };
        let unknown = winner.unknown_required_features();
        if !unknown.is_empty() {
            return Err(VolumeError::UnsupportedFeature {
                path: p(),
                features: unknown.join(", "),
            });
        }
        let health = HeaderHealth {
            primary: self.status(0, winner),
            secondary: self.status(1, winner),
        };
        Ok((winner.clone(), health))
    }
}

/// Reads both copies through `engine` (bytes past the end of the file are absent).
pub(super) fn read_copies(engine: &dyn FileEngine, path: &Path) -> Result<Copies, VolumeError> {
    let file_len = engine.len().map_err(|e| io_err(path, e))?;
    let mut buf = vec![0u8; HEADER_AREA_SIZE as usize];
    engine
        .read_exact_at(&mut buf, 0)
        .map_err(|e| io_err(path, e))?;
    let n = usize::try_from(file_len.min(HEADER_AREA_SIZE)).unwrap_or(buf.len());
    Ok(decode_copies(&buf[..n], file_len))
}

/// Decodes both copies from the first bytes of a volume file (`buf`: at most
/// [`HEADER_AREA_SIZE`] bytes, fewer when the file is shorter) of `file_len` bytes.
pub(super) fn decode_copies(buf: &[u8], file_len: u64) -> Copies {
    let primary = decode_copy(buf, 0);
    let secondary = decode_copy(buf.get(COPY_LEN..).unwrap_or(&[]), 1);
    Copies {
        reads: [primary, secondary],
        file_len,
    }
}

/// [`read_copies`] of an open file, through its engine ([`engine_for_borrowed`]).
pub(super) fn read_file_copies(file: &File, path: &Path) -> Result<Copies, VolumeError> {
    let engine = engine_for_borrowed(file, path).map_err(|e| io_err(path, e))?;
    read_copies(&*engine, path)
}

/// Takes an flock, retrying on EINTR.
pub(super) fn flock(file: File, arg: FlockArg) -> Result<Flock<File>, (File, Errno)> {
    let mut file = file;
    loop {
        match Flock::lock(file, arg) {
            Err((f, Errno::EINTR)) => file = f,
            other => return other,
        }
    }
}

/// Reads and validates both header copies without any key. The highest valid sequence wins.
pub fn read_header(path: &Path) -> Result<(Header, HeaderHealth), VolumeError> {
    if let Some(engine) =
        crate::volume::backing::open_rbd_path(path, crate::volume::backing::Access::Inspect)
    {
        return read_copies(&*engine?, path)?.resolve(path);
    }
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    // A shared lock keeps us from reading a copy while a writer is replacing it; a
    // filesystem without flock support is read unlocked.
    let copies = match flock(file, FlockArg::LockShared) {
        Ok(locked) => read_file_copies(&locked, path)?,
        Err((file, _)) => read_file_copies(&file, path)?,
    };
    copies.resolve(path)
}

/// Checks that a valid copy on disk (if any) belongs to `uuid`. Used by `Volume::open`.
pub(crate) fn check_file_uuid(
    file: &File,
    path: &Path,
    uuid: uuid::Uuid,
) -> Result<(), VolumeError> {
    let engine = engine_for_borrowed(file, path).map_err(|e| io_err(path, e))?;
    check_engine_uuid(&*engine, path, uuid)
}

/// [`check_file_uuid`] through an engine (an RBD image).
pub(crate) fn check_engine_uuid(
    engine: &dyn FileEngine,
    path: &Path,
    uuid: uuid::Uuid,
) -> Result<(), VolumeError> {
    let copies = read_copies(engine, path)?;
    for h in [copies.good(0), copies.good(1)].into_iter().flatten() {
        if h.uuid != uuid {
            return Err(VolumeError::InvalidHeader {
                path: path.display().to_string(),
                detail: format!(
                    "the header given is for volume {uuid}, but this file holds volume {}",
                    h.uuid
                ),
            });
        }
    }
    Ok(())
}
