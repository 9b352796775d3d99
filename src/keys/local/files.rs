//! Keystore files: reading them safely (no symlinks, private modes, bounded size, into
//! locked pages), writing them atomically, shredding them, and the keystore error
//! helpers.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::crypto::LockedBytes;
use crate::keys::seal;
use crate::keys::KeyError;

use super::directory::check_private_mode;
use super::record::KEY_FORMAT_VERSION;
use super::LocalKeystore;

pub(super) const TMP_PREFIX: &str = ".tmp-";
/// Keystore files are small; refuse to read anything larger than this.
const MAX_FILE_LEN: u64 = 1 << 20;

pub(in crate::keys) fn ks_err(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Keystore {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

pub(super) fn io_err(path: &Path, what: &str, e: std::io::Error) -> KeyError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return ks_err(
            path,
            format!("{what}: it is a symbolic link; keystore files must be regular files"),
        );
    }
    ks_err(path, format!("{what}: {e}"))
}

/// Describes a JSON error without echoing file content (it could be key material).
pub(super) fn json_err(path: &Path, what: &str, e: &serde_json::Error) -> KeyError {
    ks_err(
        path,
        format!(
            "{what} is not valid ({:?} error at line {} column {}); restore it from a backup",
            e.classify(),
            e.line(),
            e.column()
        ),
    )
}

pub(super) fn newer_format(path: &Path, version: u32) -> KeyError {
    ks_err(
        path,
        format!(
            "written in keystore format version {version}, newer than this cryptvol supports \
             ({KEY_FORMAT_VERSION}); upgrade cryptvol"
        ),
    )
}

/// A keystore file's content (in locked pages, wiped on drop) and its owner's uid.
pub(super) struct FileContent {
    pub(super) bytes: LockedBytes,
    pub(super) owner: u32,
}

/// Reads a keystore file (no symlinks, private mode, bounded size) into a buffer in
/// locked, non-dumpable pages (a key file holds master key material). `None` if it does
/// not exist.
pub(super) fn read_private_file(path: &Path) -> Result<Option<FileContent>, KeyError> {
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "cannot open", e)),
    };
    let md = file
        .metadata()
        .map_err(|e| io_err(path, "cannot inspect", e))?;
    if !md.is_file() {
        return Err(ks_err(path, "not a regular file"));
    }
    check_private_mode(path, md.mode(), false)?;
    if md.len() > MAX_FILE_LEN {
        return Err(ks_err(path, "file is too large to be a keystore file"));
    }
    // One byte more than the file: a file that grew meanwhile is noticed, never
    // reallocated into (which would leave copies of key material behind).
    let mut buf = LockedBytes::zeroed(md.len() as usize + 1)?;
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(ks_err(
                path,
                "the file changed while it was read; try again",
            ));
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, "cannot read", e)),
        }
    }
    buf.truncate(len);
    Ok(Some(FileContent {
        bytes: buf,
        owner: md.uid(),
    }))
}

/// Overwrites a file in place with zeros, syncs it, removes it and syncs the directory.
/// (Copies a filesystem keeps elsewhere, e.g. after copy-on-write or in backups, are
/// beyond reach; see docs/keys.md.)
pub(super) fn shred_file(path: &Path) -> Result<(), KeyError> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_err(path, "cannot open for destruction", e))?;
    let len = file
        .metadata()
        .map_err(|e| io_err(path, "cannot inspect", e))?
        .len();
    let zeros = vec![0u8; usize::try_from(len.min(MAX_FILE_LEN)).unwrap_or(0)];
    file.write_all_at(&zeros, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(path, "cannot overwrite", e))?;
    fs::remove_file(path).map_err(|e| io_err(path, "cannot remove", e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, "cannot sync the keystore directory", e))?;
    }
    Ok(())
}

impl LocalKeystore {
    /// Reads and parses a keystore JSON file (not key files); `None` if missing.
    pub(in crate::keys) fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        what: &str,
    ) -> Result<Option<T>, KeyError> {
        let path = self.dir.join(name);
        let Some(buf) = read_private_file(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&buf.bytes)
            .map(Some)
            .map_err(|e| json_err(&path, what, &e))
    }

    /// Writes a keystore JSON file atomically; the caller holds the lock.
    pub(in crate::keys) fn write_json<T: serde::Serialize>(
        &self,
        name: &str,
        v: &T,
    ) -> Result<(), KeyError> {
        let path = self.dir.join(name);
        let mut json = serde_json::to_vec_pretty(v)
            .map_err(|e| ks_err(&path, format!("cannot encode: {e}")))?;
        json.push(b'\n');
        self.write_private_file(name, &json)
    }

    /// Atomically replaces `DIR/name`: temp file, fsync, rename, fsync of the directory.
    pub(super) fn write_private_file(&self, name: &str, bytes: &[u8]) -> Result<(), KeyError> {
        let final_path = self.dir.join(name);
        let tmp_path = self
            .dir
            .join(format!("{TMP_PREFIX}{name}-{}", seal::random_hex(8)?));
        let mode = self.file_mode();
        let result = (|| -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp_path)?;
            // The umask cannot add bits, but make the mode exact regardless.
            file.set_permissions(Permissions::from_mode(mode))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&tmp_path, &final_path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp_path);
            return Err(io_err(&final_path, "cannot write", e));
        }
        Ok(())
    }

    pub(super) fn remove_stale_tmp_files(&self) -> Result<(), KeyError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with(TMP_PREFIX)) {
                shred_file(&entry.path())?;
            }
        }
        Ok(())
    }
}
