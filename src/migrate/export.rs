//! `cryptvol export FILE DEST`: decrypts a volume to a raw file, a block device or an NBD
//! export, for migrating out. The volume is opened read-only, so it cannot be exported
//! while something has it open for writing (the volume's in-use lock).
//!
//! A new raw file is sparse: unallocated extents and 64 KiB runs of zeros become holes. An
//! existing DEST is replaced only with `force` (a regular file is truncated first; a block
//! device is overwritten in place, zeros included). An NBD export gets every byte (zeros
//! with `NBD_CMD_WRITE_ZEROES` when the server offers it) and a FLUSH. The SHA-256 of the
//! plaintext is computed on the way.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{finish_hex, hash_zeros, zero_runs, Cancel, MigrateError, BLOCK};
use crate::nbdclient::{NbdClient, NbdUri};
use crate::ops::{self, KeyOptions};
use crate::progress::Progress;
use crate::volume::{OpenOptions, Volume};

/// Extents are asked for in windows of this size (bounded memory on big volumes).
const EXTENT_WINDOW: u64 = 1 << 30;

/// An export as asked for on the command line.
#[derive(Debug, Clone)]
pub struct ExportRequest<'a> {
    pub volume: &'a Path,
    /// A path (new file, or with `force` an existing file or block device) or an NBD URI.
    pub dest: &'a str,
    pub force: bool,
}

/// What an export did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub volume: String,
    pub dest: String,
    /// `file`, `block-device` or `nbd`.
    pub dest_kind: &'static str,
    pub size: u64,
    pub sha256: String,
    /// Bytes of data written.
    pub written: u64,
    /// Zero bytes left as holes (raw files) or written as zeros (devices, NBD).
    pub zero: u64,
}

/// Where the plaintext goes, decided before the volume is unlocked.
enum Plan {
    File { path: PathBuf, existing: bool },
    Nbd(NbdUri),
}

/// An open destination.
enum Sink {
    File {
        file: File,
        path: PathBuf,
        /// Created by this export (removed again if it fails).
        created: bool,
        /// A regular file: zeros become holes. A block device: zeros are written.
        sparse: bool,
    },
    Nbd(NbdClient),
}

/// Decrypts `req.volume` to `req.dest`. `cancel` stops it (a DEST file this export created
/// is removed again).
pub async fn export(
    req: &ExportRequest<'_>,
    keys: &KeyOptions,
    cancel: &Cancel,
) -> Result<ExportReport, MigrateError> {
    let plan = plan(req)?;
    let opts = OpenOptions {
        read_only: true,
        discard: false,
        ..OpenOptions::default()
    };
    let (vol, _, _) = ops::unlock(req.volume, keys, opts).await?;
    let cancel = cancel.clone();
    let volume = req.volume.display().to_string();
    let dest = req.dest.to_string();
    tokio::task::spawn_blocking(move || {
        let mut sink = open_sink(plan, &vol)?;
        let kind = sink.kind();
        match copy_out(&vol, &mut sink, &cancel) {
            Ok((sha256, written, zero)) => {
                sink.finish(vol.size())?;
                Ok(ExportReport {
                    volume,
                    dest,
                    dest_kind: kind,
                    size: vol.size(),
                    sha256,
                    written,
                    zero,
                })
            }
            Err(e) => {
                sink.abort();
                Err(e)
            }
        }
    })
    .await
    .map_err(|e| MigrateError::Internal(format!("the export task failed: {e}")))?
}

/// Checks DEST without touching anything (a bad URI, an existing file without `force`),
/// so that callers can fail before warning about plaintext.
pub fn precheck(req: &ExportRequest<'_>) -> Result<(), MigrateError> {
    plan(req).map(|_| ())
}

fn plan(req: &ExportRequest<'_>) -> Result<Plan, MigrateError> {
    if NbdUri::looks_like_uri(req.dest) {
        return Ok(Plan::Nbd(NbdUri::parse(req.dest)?));
    }
    let path = PathBuf::from(req.dest);
    let existing = match std::fs::metadata(&path) {
        Ok(m) => {
            if !req.force {
                return Err(MigrateError::TargetExists {
                    path: req.dest.to_string(),
                    hint: " (add --force to overwrite it with the volume's plaintext)".into(),
                });
            }
            let vm = std::fs::metadata(req.volume).map_err(|e| MigrateError::io(req.volume, e))?;
            if (m.dev(), m.ino()) == (vm.dev(), vm.ino()) {
                return Err(MigrateError::BadDestination(format!(
                    "{} is the volume itself",
                    req.dest
                )));
            }
            if !m.file_type().is_file() && !m.file_type().is_block_device() {
                return Err(MigrateError::BadDestination(format!(
                    "{} is neither a regular file nor a block device",
                    req.dest
                )));
            }
            true
        }
        Err(_) => false,
    };
    Ok(Plan::File { path, existing })
}

fn open_sink(plan: Plan, vol: &Volume) -> Result<Sink, MigrateError> {
    let size = vol.size();
    match plan {
        Plan::Nbd(uri) => {
            let client = NbdClient::connect(&uri)?;
            if client.read_only() {
                return Err(MigrateError::BadDestination(format!(
                    "the NBD export {uri} is read-only"
                )));
            }
            if client.size() < size {
                return Err(MigrateError::BadDestination(format!(
                    "the NBD export {uri} has {} bytes, less than the volume's {size}",
                    client.size()
                )));
            }
            if client.size() > size {
                tracing::warn!(dest = %uri, "the NBD export is larger than the volume; only its first {size} bytes are written");
            }
            Ok(Sink::Nbd(client))
        }
        Plan::File {
            path,
            existing: false,
        } => {
            // O_EXCL | O_NOFOLLOW: never through a symlink (a dangling one planted at DEST
            // included) and never onto a file that appeared since the check.
            let file = crate::fsutil::create_new_nofollow(&path, 0o600).map_err(|e| {
                MigrateError::Open {
                    path: path.display().to_string(),
                    err: e,
                }
            })?;
            Ok(Sink::File {
                file,
                path,
                created: true,
                sparse: true,
            })
        }
        Plan::File {
            path,
            existing: true,
        } => {
            // An existing DEST is replaced only with --force, and then a symlink the user
            // named is followed on purpose, as `qemu-img convert` and `dd` do: DEST is
            // typically a /dev/disk/by-id/... or /dev/VG/LV link to the block device.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| MigrateError::Open {
                    path: path.display().to_string(),
                    err: e,
                })?;
            let meta = file.metadata().map_err(|e| MigrateError::io(&path, e))?;
            let sparse = meta.file_type().is_file();
            if sparse {
                // Replaced wholesale: old data must not survive in the holes.
                file.set_len(0).map_err(|e| MigrateError::io(&path, e))?;
            } else {
                let end = nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekEnd)
                    .map_err(|e| MigrateError::io(&path, e.into()))?;
                if u64::try_from(end).unwrap_or(0) < size {
                    return Err(MigrateError::BadDestination(format!(
                        "the block device {} has {end} bytes, less than the volume's {size}",
                        path.display()
                    )));
                }
            }
            Ok(Sink::File {
                file,
                path,
                created: false,
                sparse,
            })
        }
    }
}

impl Sink {
    fn kind(&self) -> &'static str {
        match self {
            Sink::File { sparse: true, .. } => "file",
            Sink::File { sparse: false, .. } => "block-device",
            Sink::Nbd(_) => "nbd",
        }
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), MigrateError> {
        match self {
            Sink::File { file, path, .. } => file
                .write_all_at(buf, offset)
                .map_err(|e| MigrateError::io(path, e)),
            Sink::Nbd(c) => Ok(c.write_at(buf, offset)?),
        }
    }

    fn zeros(&mut self, offset: u64, len: u64) -> Result<(), MigrateError> {
        match self {
            Sink::File { sparse: true, .. } => Ok(()),
            Sink::File { file, path, .. } => {
                let zeros = vec![0u8; BLOCK.min(len as usize)];
                let mut pos = offset;
                while pos < offset + len {
                    let n = (zeros.len() as u64).min(offset + len - pos) as usize;
                    file.write_all_at(&zeros[..n], pos)
                        .map_err(|e| MigrateError::io(path, e))?;
                    pos += n as u64;
                }
                Ok(())
            }
            Sink::Nbd(c) => Ok(c.write_zeroes(offset, len)?),
        }
    }

    /// Sets a raw file's length (trailing holes) and makes everything durable.
    fn finish(self, size: u64) -> Result<(), MigrateError> {
        match self {
            Sink::File {
                file, path, sparse, ..
            } => {
                if sparse {
                    file.set_len(size).map_err(|e| MigrateError::io(&path, e))?;
                }
                file.sync_all().map_err(|e| MigrateError::io(&path, e))
            }
            Sink::Nbd(mut c) => {
                c.flush()?;
                c.disconnect();
                Ok(())
            }
        }
    }

    /// After a failure: removes a file this export created (it would hold partial plaintext).
    fn abort(self) {
        if let Sink::File {
            file,
            path,
            created: true,
            ..
        } = self
        {
            drop(file);
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Copies the plaintext; returns (SHA-256, bytes written, zero bytes).
fn copy_out(
    vol: &Volume,
    sink: &mut Sink,
    cancel: &Cancel,
) -> Result<(String, u64, u64), MigrateError> {
    let size = vol.size();
    let progress = Progress::new(format!("export {}", vol.path()), size);
    let mut hasher = Sha256::new();
    let (mut written, mut zero) = (0u64, 0u64);
    let mut buf = vec![0u8; BLOCK];
    let mut window = 0;
    while window < size {
        let wlen = EXTENT_WINDOW.min(size - window);
        for ext in vol.extents(window, wlen)? {
            let mut pos = ext.offset;
            let end = ext.offset + ext.len;
            while pos < end {
                if cancel.is_cancelled() {
                    progress.finish();
                    return Err(MigrateError::Cancelled(
                        "export interrupted; an incomplete destination file it created is removed"
                            .into(),
                    ));
                }
                let n = (BLOCK as u64).min(end - pos);
                if ext.allocated {
                    let b = &mut buf[..n as usize];
                    vol.read_at(b, pos)?;
                    hasher.update(&*b);
                    let mut runs = Vec::new();
                    zero_runs(b, |r, z| runs.push((r, z)));
                    for (r, z) in runs {
                        let (off, len) = (pos + r.start as u64, r.len() as u64);
                        if z {
                            sink.zeros(off, len)?;
                            zero += len;
                        } else {
                            sink.write(&b[r], off)?;
                            written += len;
                        }
                    }
                } else {
                    hash_zeros(&mut hasher, n);
                    sink.zeros(pos, n)?;
                    zero += n;
                }
                pos += n;
                progress.advance(n);
            }
        }
        window += wlen;
    }
    progress.finish();
    Ok((finish_hex(hasher), written, zero))
}
