//! `cryptvol import SOURCE FILE`: copies an unencrypted source into a new encrypted volume.
//!
//! Design (resumable, never half-made):
//! - The volume is built as `.FILE.partial` next to FILE, with the resume journal
//!   `.FILE.import` ([`super::journal`]) beside it; FILE itself appears only at the end, by
//!   an atomic no-replace rename, after the checksums matched. Nothing named FILE is ever
//!   an unfinished volume.
//! - The copy runs in 4 MiB blocks. Aligned 64 KiB runs of zeros (and, for files, holes
//!   found with `SEEK_DATA`) are not written: they stay unallocated in the volume, which
//!   reads them as zeros. The source's plaintext is hashed (SHA-256) as it is read.
//! - Every 32 MiB or 2 seconds, the volume is `fdatasync`ed and a checkpoint (bytes done,
//!   counters, the serialized SHA-256 state at that block boundary) is appended to the
//!   journal; the end of the copy is recorded with the source's final digest. An interrupted
//!   import (SIGINT/SIGTERM: a last checkpoint is written; `kill -9`, power loss: the last
//!   one stands) continues from the last checkpoint when the same command is run again, so
//!   at most 32 MiB (or 2 s) of work is redone, and the source checksum still covers the
//!   whole source.
//! - The journal records the source's identity (path or URI, size, and for files inode and
//!   modification time), the key choice, the sector size and the partial volume's UUID; a
//!   different source or different options refuse to resume (`--restart` starts over).
//! - At the end the volume is read back through [`Volume`] (unallocated extents count as
//!   zeros without being read) and hashed; a mismatch with the source's checksum is an
//!   error and the partial volume is kept for inspection.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::copy::{restore_hasher, Done, Job};
use super::journal::{self, Journal, Record, JOURNAL_VERSION};
use super::source::{Source, SourceIdentity};
use super::{round_up, Cancel, MigrateError};
use crate::ops::{self, KeyOptions, NewKey};
use crate::volume::{self, OpenOptions, VolumeSpec, DEFAULT_SECTOR_SIZE};

/// What to do with an earlier, interrupted import into the same target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResumeMode {
    /// Continue it if there is one, else start.
    #[default]
    Auto,
    /// Continue it; fail if there is none.
    Require,
    /// Discard it and start over.
    Restart,
}

/// An import as asked for on the command line.
#[derive(Debug, Clone)]
pub struct ImportRequest<'a> {
    /// A path (file or block device) or an NBD URI.
    pub source: &'a str,
    /// The volume file to create.
    pub target: &'a Path,
    /// `None`: the default (4096), or the interrupted import's.
    pub sector_size: Option<u32>,
    /// How the key was chosen (`default`, `key:REF`, `passphrase`): recorded, and compared
    /// on resume.
    pub key_label: String,
    pub mode: ResumeMode,
}

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    pub volume: String,
    pub uuid: String,
    pub source: SourceIdentity,
    pub source_size: u64,
    pub volume_size: u64,
    pub sector_size: u32,
    /// Zero bytes appended to reach a multiple of the sector size.
    pub padding: u64,
    /// Where this run started when it continued an interrupted import.
    pub resumed_from: Option<u64>,
    /// Bytes of data written (all runs).
    pub written: u64,
    /// Bytes of zeros left unallocated (all runs).
    pub skipped_zero: u64,
    pub source_sha256: String,
    pub volume_sha256: String,
    pub checksums_match: bool,
}

/// The files an import into `target` uses.
struct Paths {
    target: PathBuf,
    partial: PathBuf,
    journal: PathBuf,
}

impl Paths {
    fn new(target: &Path) -> Result<Paths, MigrateError> {
        let name = target.file_name().ok_or_else(|| {
            MigrateError::BadDestination(format!("{} is not a file name", target.display()))
        })?;
        let dir = target.parent().unwrap_or(Path::new(""));
        let hidden = |suffix: &str| {
            let mut n = std::ffi::OsString::from(".");
            n.push(name);
            n.push(suffix);
            dir.join(n)
        };
        Ok(Paths {
            target: target.to_path_buf(),
            partial: hidden(".partial"),
            journal: hidden(".import"),
        })
    }
}

/// The partial volume file that an import into `target` works on.
pub fn partial_path(target: &Path) -> Option<PathBuf> {
    Paths::new(target).ok().map(|p| p.partial)
}

/// The journal file of an import into `target`.
pub fn journal_path(target: &Path) -> Option<PathBuf> {
    Paths::new(target).ok().map(|p| p.journal)
}

/// Imports `req.source` into a new volume `req.target`, creating its DEK under `key`, or
/// continues an interrupted import. `cancel` stops it at the next block (progress saved).
pub async fn import(
    req: &ImportRequest<'_>,
    key: NewKey<'_>,
    keys: &KeyOptions,
    cancel: &Cancel,
) -> Result<ImportReport, MigrateError> {
    let paths = Paths::new(req.target)?;
    refuse_existing_target(&paths)?;
    let (mut journal, mut records) = Journal::open(&paths.journal, &paths.target)?;
    // Checked again under the lock: a concurrent import may have just finished.
    refuse_existing_target(&paths)?;
    if req.mode == ResumeMode::Restart {
        discard(&paths, &mut journal, &mut records)?;
    }
    let source = Source::open(req.source)?;
    if source.size() == 0 {
        return Err(MigrateError::BadSource(format!(
            "the source {} is empty",
            source.identity().location
        )));
    }
    let mut prior = journal::progress(&records);
    if prior.is_some() && !paths.partial.exists() {
        if req.mode == ResumeMode::Require {
            return Err(cannot_resume(
                &paths,
                format!("its partial volume {} is missing", paths.partial.display()),
            ));
        }
        tracing::warn!(partial = %paths.partial.display(), "the partial volume of an interrupted import is missing; starting over");
        discard(&paths, &mut journal, &mut records)?;
        prior = None;
    }
    let job = match prior {
        Some(p) => resume(req, &paths, p, source, journal, keys).await?,
        None if req.mode == ResumeMode::Require => {
            return Err(cannot_resume(
                &paths,
                "there is no interrupted import to resume".into(),
            ))
        }
        None => start(req, &paths, source, journal, key, keys).await?,
    };
    let job = Box::new(job);
    let cancel = cancel.clone();
    let done = tokio::task::spawn_blocking(move || job.run(&cancel))
        .await
        .map_err(|e| MigrateError::Internal(format!("the copy task failed: {e}")))??;
    finish(&paths, done)
}

/// Refuses an existing target, naming leftovers of an earlier import if there are any.
fn refuse_existing_target(paths: &Paths) -> Result<(), MigrateError> {
    if std::fs::symlink_metadata(&paths.target).is_err() {
        return Ok(());
    }
    let hint = if paths.journal.exists() && !paths.partial.exists() {
        format!(
            " (if it is the result of an earlier import, remove the leftover journal {})",
            paths.journal.display()
        )
    } else {
        " (choose another name or remove it first)".to_string()
    };
    Err(MigrateError::TargetExists {
        path: paths.target.display().to_string(),
        hint,
    })
}

fn cannot_resume(paths: &Paths, reason: String) -> MigrateError {
    MigrateError::CannotResume {
        target: paths.target.display().to_string(),
        reason,
    }
}

/// Forgets an interrupted import: removes its partial volume and empties the journal.
fn discard(
    paths: &Paths,
    journal: &mut Journal,
    records: &mut Vec<Record>,
) -> Result<(), MigrateError> {
    if let Some(p) = journal::progress(records) {
        tracing::info!(target_file = %paths.target.display(), done = p.done, "discarding an interrupted import");
    }
    remove_if_exists(&paths.partial)?;
    journal.clear()?;
    records.clear();
    Ok(())
}

fn remove_if_exists(p: &Path) -> Result<(), MigrateError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MigrateError::io(p, e)),
    }
}

/// A fresh import: creates the partial volume and the journal's start record.
async fn start(
    req: &ImportRequest<'_>,
    paths: &Paths,
    source: Source,
    mut journal: Journal,
    key: NewKey<'_>,
    keys: &KeyOptions,
) -> Result<Job, MigrateError> {
    // A partial volume without a start record is from an import killed while creating it.
    remove_if_exists(&paths.partial)?;
    let sector_size = req.sector_size.unwrap_or(DEFAULT_SECTOR_SIZE);
    let size = source.size();
    let volume_size = round_up(size, u64::from(sector_size))
        .ok_or_else(|| MigrateError::BadSource(format!("the source's size {size} is too large")))?;
    let spec = VolumeSpec {
        size: volume_size,
        sector_size,
    };
    let (vol, header) =
        ops::create_and_open(&paths.partial, &spec, key, keys, OpenOptions::default()).await?;
    journal.append(&Record::Start {
        version: JOURNAL_VERSION,
        source: source.identity().clone(),
        key: req.key_label.clone(),
        sector_size,
        volume_size,
        uuid: header.uuid.to_string(),
    })?;
    tracing::info!(
        source = %source.identity(),
        volume = %paths.target.display(),
        uuid = %header.uuid,
        "import started"
    );
    Ok(Job::new(source, vol, journal, Sha256::new(), None))
}

/// Continues an interrupted import after checking that it is the same one.
async fn resume(
    req: &ImportRequest<'_>,
    paths: &Paths,
    p: journal::Progress,
    source: Source,
    mut journal: Journal,
    keys: &KeyOptions,
) -> Result<Job, MigrateError> {
    let here = source.identity();
    if let Some(r) = options_mismatch(req, &p, here) {
        return Err(cannot_resume(paths, r));
    }
    check_partial_is_a_file(paths)?;
    check_partial_header(paths, &p)?;
    let hasher = saved_hasher(&p, &journal)?;
    if p.done > here.size {
        return Err(cannot_resume(
            paths,
            "the journal is past the source's end".into(),
        ));
    }
    let (vol, _, _) = ops::unlock(&paths.partial, keys, OpenOptions::default()).await?;
    // Checked again on the volume actually opened (the name could have been swapped
    // since the header was read).
    if vol.uuid().to_string() != p.uuid {
        return Err(cannot_resume(
            paths,
            format!(
                "the partial volume {} changed while it was opened (UUID {}); add --restart to \
                 start over",
                paths.partial.display(),
                vol.uuid()
            ),
        ));
    }
    journal.append(&Record::Resume { from: p.done })?;
    tracing::info!(
        "resuming the import into {} at offset {} of {} ({} bytes already done, {} earlier resume(s))",
        paths.target.display(),
        p.done,
        here.size,
        p.done,
        p.resumes
    );
    let mut job = Job::new(source, vol, journal, hasher, Some(p.done));
    job.done = p.done;
    job.written = p.written;
    job.skipped = p.skipped;
    job.source_sha256 = p.copied_sha256;
    Ok(job)
}

/// Why this command is not the one that started the interrupted import (another
/// source, key choice or sector size), or `None` if it is.
fn options_mismatch(
    req: &ImportRequest<'_>,
    p: &journal::Progress,
    here: &SourceIdentity,
) -> Option<String> {
    if p.source != *here {
        Some(format!(
            "it was started from {} but this source is {}; run it with the original source to resume, or add --restart to discard the {} bytes done and start over",
            p.source, here, p.done
        ))
    } else if p.key != req.key_label {
        Some(format!(
            "it was started with key choice {:?} but this command asks for {:?}; use the same key options to resume, or add --restart",
            p.key, req.key_label
        ))
    } else if req.sector_size.is_some_and(|s| s != p.sector_size) {
        Some(format!(
            "it was started with --sector-size {}; use the same sector size to resume, or add --restart",
            p.sector_size
        ))
    } else {
        None
    }
}

/// The partial volume's name is derived from the target's, in a directory others may
/// write to: never resume through a symbolic link (it would write the source into
/// whatever volume it points to).
fn check_partial_is_a_file(paths: &Paths) -> Result<(), MigrateError> {
    match std::fs::symlink_metadata(&paths.partial) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(_) => Err(cannot_resume(
            paths,
            format!(
                "the partial volume {} is not a regular file (a symbolic link?); remove it \
                 and add --restart to start over",
                paths.partial.display()
            ),
        )),
        Err(e) => Err(MigrateError::io(&paths.partial, e)),
    }
}

/// Checks that the partial volume's header is the one the journal describes (UUID and
/// size).
fn check_partial_header(paths: &Paths, p: &journal::Progress) -> Result<(), MigrateError> {
    let (header, _) = volume::read_header(&paths.partial)?;
    if header.uuid.to_string() != p.uuid || header.size != p.volume_size {
        return Err(cannot_resume(
            paths,
            format!(
                "the partial volume {} is not the one the journal describes (UUID {}); add --restart to start over",
                paths.partial.display(),
                header.uuid
            ),
        ));
    }
    Ok(())
}

/// The source hash state at the last checkpoint (a fresh one if there was none).
fn saved_hasher(p: &journal::Progress, journal: &Journal) -> Result<Sha256, MigrateError> {
    match &p.sha256_state {
        Some(s) => restore_hasher(s).ok_or_else(|| MigrateError::BadJournal {
            path: journal.path().display().to_string(),
            detail: "bad sha256_state".into(),
        }),
        None => Ok(Sha256::new()),
    }
}

/// Compares the checksums, then publishes the volume under its final name.
fn finish(paths: &Paths, done: Done) -> Result<ImportReport, MigrateError> {
    let Done {
        job,
        source_sha256,
        volume_sha256,
    } = done;
    let checksums_match = source_sha256 == volume_sha256;
    if !checksums_match {
        return Err(MigrateError::ChecksumMismatch {
            source_sha256,
            volume_sha256,
            partial: paths.partial.display().to_string(),
        });
    }
    let Job {
        source,
        vol,
        journal,
        written,
        skipped,
        resumed_from,
        ..
    } = job;
    let report = ImportReport {
        volume: paths.target.display().to_string(),
        uuid: vol.uuid().to_string(),
        source: source.identity().clone(),
        source_size: source.size(),
        volume_size: vol.size(),
        sector_size: vol.sector_size(),
        padding: vol.size() - source.size(),
        resumed_from,
        written,
        skipped_zero: skipped,
        source_sha256,
        volume_sha256,
        checksums_match,
    };
    vol.flush()?;
    drop(vol);
    source.close();
    rename_noreplace(&paths.partial, &paths.target)?;
    sync_dir_of(&paths.target)?;
    journal.remove()?;
    Ok(report)
}

/// Renames `from` to `to`, failing if `to` exists (never replacing it).
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), MigrateError> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    let exists = || MigrateError::TargetExists {
        path: to.display().to_string(),
        hint: format!(
            " (it appeared during the import; the imported volume is kept as {})",
            from.display()
        ),
    };
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => Err(exists()),
        // Filesystems without RENAME_NOREPLACE: link (fails if `to` exists), then unlink.
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            std::fs::hard_link(from, to).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => exists(),
                _ => MigrateError::io(to, e),
            })?;
            std::fs::remove_file(from).map_err(|e| MigrateError::io(from, e))
        }
        Err(e) => Err(MigrateError::io(to, std::io::Error::from(e))),
    }
}

/// `fsync`s the directory holding `path`, so a rename or unlink in it is durable.
pub(crate) fn sync_dir_of(path: &Path) -> Result<(), MigrateError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| MigrateError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_work_files_sit_next_to_the_target() {
        let p = Paths::new(Path::new("/a/b/vol.img")).unwrap();
        assert_eq!(p.partial, Path::new("/a/b/.vol.img.partial"));
        assert_eq!(p.journal, Path::new("/a/b/.vol.img.import"));
        let p = Paths::new(Path::new("vol.img")).unwrap();
        assert_eq!(p.partial, Path::new(".vol.img.partial"));
        assert!(Paths::new(Path::new("/")).is_err());
    }

    #[test]
    fn rename_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "new").unwrap();
        std::fs::write(&b, "old").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert!(matches!(e, MigrateError::TargetExists { .. }), "{e}");
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
    }
}
