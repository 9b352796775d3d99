//! The crash-safe header update: under an exclusive lock, re-read both copies,
//! check the key and that nothing newer is on disk, bump the sequence, recompute the
//! MAC, and write the two copies one after the other, the invalid one first.

use std::path::Path;

use nix::fcntl::FlockArg;

use super::copy::encode_copy;
use super::mac::{compute_kcv, compute_mac};
use super::recovery::{flock, read_copies, CopyStatus, HeaderHealth};
use super::{io_err, Header, VolumeError, HEADER_COPY_SIZE};
use crate::crypto::Dek;
use crate::volume::engine::{engine_for_borrowed, FileEngine};

/// Which copy to write first: the one that is not the current valid winner, so that
/// a crash while writing it leaves the winner untouched, and a crash while writing the
/// second leaves the first one valid at the new sequence.
pub(super) fn write_order(health: Option<&HeaderHealth>) -> [usize; 2] {
    match health {
        Some(h) if h.primary == CopyStatus::Ok && h.secondary != CopyStatus::Ok => [1, 0],
        _ => [0, 1],
    }
}

/// A header write, planned: the new header and the copies in the order to write them.
pub(super) struct WritePlan {
    header: Header,
    pub(super) writes: [(u64, Vec<u8>); 2],
}

/// Checks `header` against `dek` and the copies on disk and encodes the new copies
/// (sequence bumped, MAC recomputed) without writing anything.
pub(super) fn plan_write(
    file: &dyn FileEngine,
    path: &Path,
    header: &Header,
    dek: &Dek,
) -> Result<WritePlan, VolumeError> {
    let p = || path.display().to_string();
    let copies = read_copies(file, path)?;
    let on_disk = match copies.resolve(path) {
        Ok((h, health)) => Some((h, health)),
        // Both copies damaged: rewriting them from a header the DEK authenticates is
        // the repair. Everything else (not ours, truncated, newer format) is refused.
        Err(VolumeError::BothHeadersDamaged { .. }) => None,
        Err(e) => return Err(e),
    };
    if compute_kcv(dek, &header.uuid)? != header.key_check {
        return Err(VolumeError::KeyCheckFailed { path: p() });
    }
    let mut new = header.clone();
    new.validate()
        .map_err(|detail| VolumeError::InvalidHeader { path: p(), detail })?;
    let disk_seq = match &on_disk {
        Some((h, _)) if h.uuid != header.uuid => {
            return Err(VolumeError::InvalidHeader {
                path: p(),
                detail: format!(
                    "refusing to write the header of volume {} over volume {}",
                    header.uuid, h.uuid
                ),
            })
        }
        Some((h, _)) if h.sequence > header.sequence => {
            return Err(VolumeError::InvalidHeader {
                path: p(),
                detail: format!(
                    "the header on disk was updated since it was read (sequence {} > {}); read it again and retry",
                    h.sequence, header.sequence
                ),
            })
        }
        Some((h, _)) => h.sequence,
        None => 0,
    };
    new.sequence = header
        .sequence
        .max(disk_seq)
        .checked_add(1)
        .ok_or_else(|| VolumeError::InvalidHeader {
            path: p(),
            detail: "sequence number exhausted".into(),
        })?;
    new.header_mac = compute_mac(dek, &new)?;
    let order = write_order(on_disk.as_ref().map(|(_, h)| h));
    let mut writes = Vec::with_capacity(2);
    for index in order {
        let bytes = encode_copy(&new, index)
            .map_err(|detail| VolumeError::InvalidHeader { path: p(), detail })?;
        writes.push((index as u64 * HEADER_COPY_SIZE, bytes));
    }
    let [first, second]: [(u64, Vec<u8>); 2] =
        writes.try_into().map_err(|_| VolumeError::InvalidHeader {
            path: p(),
            detail: "internal: expected two header copies".into(),
        })?;
    Ok(WritePlan {
        header: new,
        writes: [first, second],
    })
}

/// Writes `header` (sequence bumped) crash-safely: primary, fsync, secondary, fsync.
/// Repairs a damaged copy as a side effect.
///
/// Under an exclusive flock: re-reads both copies, checks that `dek` matches the
/// header's key check value, that the file holds the same volume (or no valid header
/// at all) and that the header on disk is not newer than `header` (a concurrent update
/// would otherwise be lost), sets the sequence to one more than the highest, recomputes
/// the MAC, then writes the two copies one after the other with an fdatasync after each.
/// The copy that is not currently valid (damaged or stale) is written first; when both
/// are valid, the primary goes first. On success `header` holds the new sequence and MAC.
pub fn write_header(path: &Path, header: &mut Header, dek: &Dek) -> Result<(), VolumeError> {
    if crate::volume::is_rbd_path(path) {
        return Err(VolumeError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "header updates (rekey, keyslot, resize, re-encryption) of RBD volumes are not built yet",
            ),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let file = flock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io_err(path, std::io::Error::from_raw_os_error(errno as i32)))?;
    let engine = engine_for_borrowed(&file, path).map_err(|e| io_err(path, e))?;
    let plan = plan_write(&*engine, path, header, dek)?;
    for (i, (offset, bytes)) in plan.writes.iter().enumerate() {
        let step = if i == 0 {
            "header-copy-1"
        } else {
            "header-copy-2"
        };
        // Fault injection (tests only, see `crate::volume::crash_point`): a torn copy of which
        // only the first four 512-byte sectors (the new sequence and checksum, not the
        // new metadata) reached the disk.
        let torn = format!("{step}-torn");
        if crate::volume::crash_point_active(&torn) {
            let _ = engine
                .write_all_at(&bytes[..2048], *offset)
                .and_then(|()| engine.sync_data());
            crate::volume::crash_point(&torn);
        }
        engine
            .write_all_at(bytes, *offset)
            .and_then(|()| engine.sync_data())
            .map_err(|e| io_err(path, e))?;
        crate::volume::crash_point(step);
    }
    *header = plan.header;
    Ok(())
}
