//! The unencrypted source of an import: a regular file (raw image), a block device, or an
//! NBD export. Knows the source's size, reads it, finds holes in files, and describes it
//! ([`SourceIdentity`]) so that a resumed import can tell it is reading the same source.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::MigrateError;
use crate::nbdclient::{NbdClient, NbdUri};

/// What a source is, as recorded in the import journal. Two identities are equal when the
/// source is (as far as can be told) unchanged: same path or URI, size, and for regular
/// files the same inode and modification time. Block devices and NBD exports cannot be
/// checked for changes beyond their size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceIdentity {
    /// `file`, `block-device` or `nbd`.
    pub kind: String,
    /// Canonical path, or the URI as given.
    pub location: String,
    pub size: u64,
    /// Regular files: modification time (seconds, nanoseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<(i64, i64)>,
    /// Regular files and block devices: (device, inode) of the file or device node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<(u64, u64)>,
}

impl std::fmt::Display for SourceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({} bytes", self.kind, self.location, self.size)?;
        if let Some((s, ns)) = self.mtime {
            write!(f, ", modified {s}.{ns:09}")?;
        }
        write!(f, ")")
    }
}

/// An open source.
#[derive(Debug)]
pub enum Source {
    /// A regular file or a block device.
    Local {
        file: File,
        path: PathBuf,
        identity: SourceIdentity,
        /// Regular files: holes can be found with `SEEK_DATA`.
        seekable_holes: bool,
    },
    Nbd {
        client: NbdClient,
        identity: SourceIdentity,
    },
}

impl Source {
    /// Opens `spec`: an NBD URI (`nbd://…`, `nbd+unix://…`) or a path.
    pub fn open(spec: &str) -> Result<Source, MigrateError> {
        if NbdUri::looks_like_uri(spec) {
            let uri = NbdUri::parse(spec)?;
            let client = NbdClient::connect(&uri)?;
            let identity = SourceIdentity {
                kind: "nbd".into(),
                location: uri.to_string(),
                size: client.size(),
                mtime: None,
                inode: None,
            };
            return Ok(Source::Nbd { client, identity });
        }
        let path = Path::new(spec);
        let file = File::open(path).map_err(|err| MigrateError::Open {
            path: spec.to_string(),
            err,
        })?;
        let (identity, seekable_holes) = local_identity(&file, path)?;
        Ok(Source::Local {
            file,
            path: path.to_path_buf(),
            identity,
            seekable_holes,
        })
    }

    pub fn identity(&self) -> &SourceIdentity {
        match self {
            Source::Local { identity, .. } | Source::Nbd { identity, .. } => identity,
        }
    }

    pub fn size(&self) -> u64 {
        self.identity().size
    }

    /// The identity as it is now (re-reads a file's metadata), to detect a source that
    /// changed during the import.
    pub fn current_identity(&self) -> Result<SourceIdentity, MigrateError> {
        match self {
            Source::Local { file, path, .. } => Ok(local_identity(file, path)?.0),
            Source::Nbd { identity, .. } => Ok(identity.clone()),
        }
    }

    /// Fills `buf` from `offset` (which must lie within the source).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), MigrateError> {
        match self {
            Source::Local { file, path, .. } => {
                file.read_exact_at(buf, offset).map_err(|e| match e.kind() {
                    ErrorKind::UnexpectedEof => MigrateError::SourceChanged(format!(
                        "{} ended before {} bytes",
                        path.display(),
                        offset + buf.len() as u64
                    )),
                    _ => MigrateError::io(path, e),
                })
            }
            Source::Nbd { client, .. } => Ok(client.read_at(buf, offset)?),
        }
    }

    /// The first offset `>= offset` that may hold data: for regular files the next data
    /// region (`SEEK_DATA`; the size when only a hole follows), otherwise `offset` itself.
    pub fn next_data(&self, offset: u64) -> Result<u64, MigrateError> {
        let Source::Local {
            file,
            path,
            identity,
            seekable_holes: true,
        } = self
        else {
            return Ok(offset);
        };
        let Ok(off) = i64::try_from(offset) else {
            return Ok(offset);
        };
        match lseek(file.as_raw_fd(), off, Whence::SeekData) {
            Ok(pos) => Ok(u64::try_from(pos).unwrap_or(offset).max(offset)),
            // No data at or after `offset`: the rest is a hole.
            Err(Errno::ENXIO) => Ok(identity.size.max(offset)),
            // Filesystems without SEEK_DATA: treat everything as data.
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => Ok(offset),
            Err(e) => Err(MigrateError::io(path, std::io::Error::from(e))),
        }
    }

    /// Closes the source (an NBD connection is disconnected cleanly).
    pub fn close(self) {
        if let Source::Nbd { client, .. } = self {
            client.disconnect();
        }
    }
}

/// Identity and hole support of a local file or block device.
fn local_identity(file: &File, path: &Path) -> Result<(SourceIdentity, bool), MigrateError> {
    let meta = file.metadata().map_err(|e| MigrateError::io(path, e))?;
    let location = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let ft = meta.file_type();
    if ft.is_file() {
        let identity = SourceIdentity {
            kind: "file".into(),
            location,
            size: meta.len(),
            mtime: Some((meta.mtime(), meta.mtime_nsec())),
            inode: Some((meta.dev(), meta.ino())),
        };
        Ok((identity, true))
    } else if ft.is_block_device() {
        let end = lseek(file.as_raw_fd(), 0, Whence::SeekEnd)
            .map_err(|e| MigrateError::io(path, std::io::Error::from(e)))?;
        let identity = SourceIdentity {
            kind: "block-device".into(),
            location,
            size: u64::try_from(end).unwrap_or(0),
            mtime: None,
            inode: Some((meta.dev(), meta.ino())),
        };
        Ok((identity, false))
    } else {
        Err(MigrateError::BadSource(format!(
            "{} is neither a regular file, a block device nor an NBD URI",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_identity_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 4 << 20).unwrap();
        drop(f);
        let mut s = Source::open(p.to_str().unwrap()).unwrap();
        assert_eq!(s.size(), 8 << 20);
        assert_eq!(s.identity().kind, "file");
        assert!(s.identity().mtime.is_some());
        assert_eq!(s.current_identity().unwrap(), *s.identity());
        // tmpfs and ext4 report the hole before the data; others may say "data" everywhere.
        let d = s.next_data(0).unwrap();
        assert!(d == 0 || d == 4 << 20, "next data at {d}");
        let after = s.next_data((4 << 20) + 4096).unwrap();
        assert!(after == (4 << 20) + 4096 || after == 8 << 20, "{after}");
        let mut buf = [0u8; 4];
        s.read_at(&mut buf, 4 << 20).unwrap();
        assert_eq!(buf, [7; 4]);
        let mut past = [0u8; 8];
        let e = s.read_at(&mut past, (8 << 20) - 4).unwrap_err();
        assert!(matches!(e, MigrateError::SourceChanged(_)), "{e}");
    }

    #[test]
    fn refuses_directories_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = Source::open(dir.path().to_str().unwrap()).err().unwrap();
        assert!(e.to_string().contains("neither a regular file"), "{e}");
        let missing = dir.path().join("nope");
        let e = Source::open(missing.to_str().unwrap()).err().unwrap();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
}
