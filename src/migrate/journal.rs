//! The resume journal of an import: `.FILE.import` next to the target, one JSON record per
//! line, appended and `fdatasync`ed. The file is `flock`ed for the whole import, so two
//! imports into the same target cannot run at once.
//!
//! Records: `start` (source identity, options, the partial volume's UUID) once, then
//! `checkpoint`s (bytes done and the SHA-256 state of the source read so far), and a
//! `resume` line each time an import continues. A line without its newline (a crash while
//! appending) is dropped when the journal is opened.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::source::SourceIdentity;
use super::MigrateError;

/// Version of the record format.
pub const JOURNAL_VERSION: u32 = 1;
/// Largest journal read back: about a million records (a checkpoint every 32 MiB of a
/// 32 TiB import, or every 2 s for three weeks). A larger file is not an import journal.
pub const MAX_JOURNAL_LEN: u64 = 256 << 20;

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Record {
    /// The import began: what it reads, how the volume was made.
    Start {
        version: u32,
        source: SourceIdentity,
        /// How the key was chosen (`default`, `key:REF`, `passphrase`).
        key: String,
        sector_size: u32,
        volume_size: u64,
        /// UUID of the partial volume.
        uuid: String,
    },
    /// Everything below `done` is durably in the partial volume.
    Checkpoint {
        done: u64,
        /// Serialized SHA-256 state over source bytes `[0, done)`, hex.
        sha256_state: String,
        /// Bytes written so far (non-zero data).
        written: u64,
        /// Zero bytes skipped so far (left unallocated).
        skipped: u64,
    },
    /// The whole source is copied and durable; `sha256` is its checksum. (The last
    /// checkpoint's hash state could hold the source's last < 64 bytes unprocessed, i.e.
    /// plaintext, so the end is recorded as a digest instead.)
    Copied {
        sha256: String,
        written: u64,
        skipped: u64,
    },
    /// An interrupted import continued from `from`.
    Resume { from: u64 },
}

/// An open, locked journal.
#[derive(Debug)]
pub struct Journal {
    file: Flock<File>,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating) and locks the journal at `path`; returns it with its records.
    pub fn open(path: &Path, target: &Path) -> Result<(Journal, Vec<Record>), MigrateError> {
        let file = loop {
            // The journal's name is derived from the target's, in a directory others may
            // write to: never through a symlink or a planted hard link, only our own file.
            let file = crate::fsutil::open_or_create_nofollow(path, 0o600)
                .map_err(|e| MigrateError::io(path, e))?;
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(MigrateError::Busy(target.display().to_string()))
                }
                Err((_, e)) => return Err(MigrateError::io(path, std::io::Error::from(e))),
            };
            // The previous holder may have removed the file before we locked it: then the
            // lock is on a file nobody else will find; open the path again.
            if same_file(&file, path) {
                break file;
            }
        };
        let mut j = Journal {
            file,
            path: path.to_path_buf(),
        };
        let records = j.read_records()?;
        Ok((j, records))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_records(&mut self) -> Result<Vec<Record>, MigrateError> {
        // Bounded before it is read: the file is only as trustworthy as its directory.
        let len = self
            .file
            .metadata()
            .map_err(|e| MigrateError::io(&self.path, e))?
            .len();
        if len > MAX_JOURNAL_LEN {
            return Err(self.bad(format!(
                "it is {len} bytes, more than an import writes ({MAX_JOURNAL_LEN}); it is damaged or not an import journal: remove it to start the import over"
            )));
        }
        let mut text = String::new();
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| {
                (&*self.file)
                    .take(MAX_JOURNAL_LEN)
                    .read_to_string(&mut text)
            })
            .map_err(|e| self.bad(format!("unreadable: {e}")))?;
        // A torn last line (no newline): cut it off so later appends start clean.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            tracing::warn!(journal = %self.path.display(), "dropping an incomplete last line (interrupted while writing it)");
            self.file
                .set_len(complete as u64)
                .map_err(|e| MigrateError::io(&self.path, e))?;
            text.truncate(complete);
        }
        parse_records(&text).map_err(|detail| self.bad(detail))
    }

    fn bad(&self, detail: String) -> MigrateError {
        MigrateError::BadJournal {
            path: self.path.display().to_string(),
            detail,
        }
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, r: &Record) -> Result<(), MigrateError> {
        let mut line =
            serde_json::to_string(r).map_err(|e| MigrateError::Internal(e.to_string()))?;
        line.push('\n');
        let path = self.path.clone();
        self.file
            .seek(SeekFrom::End(0))
            .and_then(|_| self.file.write_all(line.as_bytes()))
            .and_then(|_| self.file.sync_data())
            .map_err(|e| MigrateError::io(&path, e))
    }

    /// Empties the journal (start over).
    pub fn clear(&mut self) -> Result<(), MigrateError> {
        let path = self.path.clone();
        self.file
            .set_len(0)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| MigrateError::io(&path, e))
    }

    /// Deletes the journal file (the import is complete), then releases the lock.
    pub fn remove(self) -> Result<(), MigrateError> {
        std::fs::remove_file(&self.path).map_err(|e| MigrateError::io(&self.path, e))?;
        super::import::sync_dir_of(&self.path)
    }
}

impl Drop for Journal {
    /// An import that failed before recording anything leaves no journal behind.
    fn drop(&mut self) {
        if self.file.metadata().is_ok_and(|m| m.len() == 0) && same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` still names the open `file`.
/// Parses the complete lines of a journal (`text` ends after a newline or is empty):
/// its records, or why it is not a journal this version can resume from.
pub(crate) fn parse_records(text: &str) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let r: Record = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        records.push(r);
    }
    if let Some(Record::Start { version, .. }) = records.first() {
        if *version != JOURNAL_VERSION {
            return Err(format!("unknown version {version}"));
        }
    } else if !records.is_empty() {
        return Err("it does not begin with a start record".into());
    }
    Ok(records)
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Where an interrupted import stands, from its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub source: SourceIdentity,
    pub key: String,
    pub sector_size: u32,
    pub volume_size: u64,
    pub uuid: String,
    pub done: u64,
    pub sha256_state: Option<String>,
    pub written: u64,
    pub skipped: u64,
    /// Set when the copy finished (only the verification remains).
    pub copied_sha256: Option<String>,
    pub resumes: usize,
}

/// The state the records describe; `None` for an empty journal.
pub fn progress(records: &[Record]) -> Option<Progress> {
    let Some(Record::Start {
        source,
        key,
        sector_size,
        volume_size,
        uuid,
        ..
    }) = records.first()
    else {
        return None;
    };
    let mut p = Progress {
        source: source.clone(),
        key: key.clone(),
        sector_size: *sector_size,
        volume_size: *volume_size,
        uuid: uuid.clone(),
        done: 0,
        sha256_state: None,
        written: 0,
        skipped: 0,
        copied_sha256: None,
        resumes: 0,
    };
    for r in records.iter().skip(1) {
        match r {
            Record::Checkpoint {
                done,
                sha256_state,
                written,
                skipped,
            } => {
                p.done = *done;
                p.sha256_state = Some(sha256_state.clone());
                p.written = *written;
                p.skipped = *skipped;
            }
            Record::Copied {
                sha256,
                written,
                skipped,
            } => {
                p.done = p.source.size;
                p.copied_sha256 = Some(sha256.clone());
                p.written = *written;
                p.skipped = *skipped;
            }
            Record::Resume { .. } => p.resumes += 1,
            Record::Start { .. } => {}
        }
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Record {
        Record::Start {
            version: JOURNAL_VERSION,
            source: SourceIdentity {
                kind: "file".into(),
                location: "/x".into(),
                size: 10,
                mtime: Some((1, 2)),
                inode: Some((3, 4)),
            },
            key: "default".into(),
            sector_size: 4096,
            volume_size: 4096,
            uuid: "u".into(),
        }
    }

    fn ckpt(done: u64) -> Record {
        Record::Checkpoint {
            done,
            sha256_state: format!("{done:02x}"),
            written: done,
            skipped: 0,
        }
    }

    #[test]
    fn round_trip_torn_line_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".t.import");
        let target = dir.path().join("t");
        {
            let (mut j, recs) = Journal::open(&p, &target).unwrap();
            assert!(recs.is_empty());
            j.append(&start()).unwrap();
            j.append(&ckpt(5)).unwrap();
            // A second opener is refused while the first holds the lock.
            let e = Journal::open(&p, &target).err().unwrap();
            assert!(matches!(e, MigrateError::Busy(_)), "{e}");
        }
        // Simulate a crash while appending.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"event\":\"checkpoint\",\"do").unwrap();
        drop(f);
        let (mut j, recs) = Journal::open(&p, &target).unwrap();
        assert_eq!(recs, vec![start(), ckpt(5)]);
        j.append(&Record::Resume { from: 5 }).unwrap();
        j.append(&ckpt(9)).unwrap();
        drop(j);
        let (mut j, recs) = Journal::open(&p, &target).unwrap();
        let pr = progress(&recs).unwrap();
        // (an empty journal is removed when dropped; this one is not empty)
        assert_eq!((pr.done, pr.resumes, pr.written), (9, 1, 9));
        assert_eq!(pr.sha256_state.as_deref(), Some("09"));
        assert_eq!(pr.copied_sha256, None);
        j.append(&Record::Copied {
            sha256: "ab".into(),
            written: 10,
            skipped: 0,
        })
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let recs: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let pr = progress(&recs).unwrap();
        assert_eq!((pr.done, pr.copied_sha256.as_deref()), (10, Some("ab")));
        j.remove().unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn an_unused_journal_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".t.import");
        let (j, _) = Journal::open(&p, &dir.path().join("t")).unwrap();
        assert!(p.exists());
        drop(j);
        assert!(!p.exists());
    }

    #[test]
    fn damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".t.import");
        std::fs::write(&p, "{\"event\":\"resume\",\"from\":1}\n").unwrap();
        let e = Journal::open(&p, &dir.path().join("t")).err().unwrap();
        assert!(e.to_string().contains("start record"), "{e}");
        std::fs::write(&p, "garbage\n").unwrap();
        let e = Journal::open(&p, &dir.path().join("t")).err().unwrap();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert_eq!(progress(&[]), None);
    }

    #[test]
    fn an_oversized_journal_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".t.import");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(MAX_JOURNAL_LEN + 1).unwrap(); // sparse: nothing is written
        let e = Journal::open(&p, &dir.path().join("t")).err().unwrap();
        assert!(e.to_string().contains("more than an import writes"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), MAX_JOURNAL_LEN + 1);
    }
}
