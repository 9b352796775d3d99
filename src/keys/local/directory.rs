//! The keystore directory: where it is by default, creating it private, checking the
//! modes of its entries, the file mode of new files, and the keystore lock.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::keys::audit::AUDIT_FILE;
use crate::keys::KeyError;

use super::files::{io_err, ks_err};
use super::LocalKeystore;

pub(super) const LOCK_FILE: &str = ".lock";
const ROOT_KEYSTORE_DIR: &str = "/var/lib/cryptvol/keys";

/// `--keystore DIR`, else `CRYPTVOL_KEYSTORE`, else `/var/lib/cryptvol/keys` for root and
/// `$XDG_DATA_HOME/cryptvol/keys` (or `~/.local/share/cryptvol/keys`) otherwise.
///
/// (`--keystore` is handled by the CLI, which calls [`LocalKeystore::open`] directly.)
pub fn default_keystore_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .or_else(passwd_home);
    keystore_dir_for(
        std::env::var_os("CRYPTVOL_KEYSTORE"),
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_DATA_HOME"),
        home,
    )
}

fn passwd_home() -> Option<OsString> {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.dir.into_os_string())
}

/// The keystore directory from the environment values (pure, for testing).
/// Empty values count as unset; a relative `XDG_DATA_HOME` is ignored (XDG spec).
pub(super) fn keystore_dir_for(
    cryptvol_keystore: Option<OsString>,
    euid_is_root: bool,
    xdg_data_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    if let Some(dir) = cryptvol_keystore.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if euid_is_root {
        return PathBuf::from(ROOT_KEYSTORE_DIR);
    }
    if let Some(xdg) = xdg_data_home.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join("cryptvol").join("keys");
    }
    match home.filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/cryptvol/keys"),
        None => PathBuf::from(ROOT_KEYSTORE_DIR),
    }
}

pub(super) fn create_keystore_dir(dir: &Path) -> Result<(), KeyError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| io_err(parent, "cannot create the keystore's parent directory", e))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            fs::set_permissions(dir, Permissions::from_mode(0o700))
                .map_err(|e| io_err(dir, "cannot set the keystore mode", e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                // Best effort: make the new directory entry durable.
                let _ = File::open(parent).and_then(|f| f.sync_all());
            }
            Ok(())
        }
        // Created concurrently by someone else: fine, the caller checks its mode.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir, "cannot create the keystore directory", e)),
    }
}

/// Refuses a mode that lets others at the file or directory, or lets the group write.
/// A group may read (a keystore shared read-only with a dedicated group; see
/// docs/keys.md).
pub(super) fn check_private_mode(path: &Path, mode: u32, is_dir: bool) -> Result<(), KeyError> {
    let forbidden = if is_dir { 0o027 } else { 0o037 };
    if mode & forbidden == 0 {
        return Ok(());
    }
    let (what, fix, shared) = if is_dir {
        ("keystore directory", "700", "2750")
    } else {
        ("keystore file", "600", "640")
    };
    Err(ks_err(
        path,
        format!(
            "the {what} has mode {:04o}, so others (or the group, for writing) can reach \
             master keys; restrict it with `chmod {fix} {}` (or {shared} for a keystore \
             shared read-only with a group, see docs/keys.md)",
            mode & 0o7777,
            path.display()
        ),
    ))
}

impl LocalKeystore {
    /// Refuses symlinks and non-private files anywhere in the keystore directory (the
    /// audit log holds no secrets: it may be group-writable, but not a symlink).
    pub(super) fn check_entries(&self) -> Result<(), KeyError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, "cannot list the keystore", e))?;
            let path = entry.path();
            let md = fs::symlink_metadata(&path).map_err(|e| io_err(&path, "cannot inspect", e))?;
            if md.file_type().is_symlink() {
                return Err(ks_err(
                    &path,
                    "is a symbolic link; keystore files must be regular files",
                ));
            }
            if entry.file_name() == AUDIT_FILE {
                continue;
            }
            check_private_mode(&path, md.mode(), md.is_dir())?;
        }
        Ok(())
    }

    /// Takes the keystore's exclusive lock (released when the returned guard drops).
    pub(in crate::keys) fn lock(&self) -> Result<Flock<File>, KeyError> {
        let path = self.dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(self.file_mode())
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_err(&path, "cannot open the keystore lock file", e))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(guard) => return Ok(guard),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(ks_err(&path, format!("cannot lock the keystore: {e}"))),
            }
        }
    }

    /// 0640 when the keystore directory is shared read-only with a group, else 0600.
    pub(super) fn file_mode(&self) -> u32 {
        match fs::metadata(&self.dir) {
            Ok(md) if md.mode() & 0o040 != 0 => 0o640,
            _ => 0o600,
        }
    }
}
