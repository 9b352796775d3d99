//! Creating and rewriting files without following symlinks.
//!
//! cryptvol often runs as root next to files in directories other accounts may write to
//! (a volume in `/srv/shared`, an import target in `/tmp`). Every file whose name the tool
//! derives itself — temporaries (`.cbt.tmp`, keystore `.tmp-…`), journals, partial
//! volumes, sidecars — is therefore opened here:
//!
//! - new files with `O_CREAT | O_EXCL` ([`create_new_nofollow`]): fails on anything already
//!   at the name, a symlink (even a dangling one) included;
//! - files that may already exist with `O_NOFOLLOW`, and only if they are a regular file
//!   with a single link owned by us ([`open_or_create_nofollow`]), so neither a planted
//!   symlink nor a planted hard link to a file elsewhere is written through;
//! - whole-file replacements through a fresh temporary and `rename(2)`
//!   ([`write_atomically`]), which replaces a symlink at the final name, never its target.
//!
//! Paths the user names explicitly (the volume itself, `export DEST`, `--audit-log`,
//! `--keystore`) are not routed through here by default; each call site says whether it
//! follows a symlink the user gave (as `cryptsetup` and `qemu-img` do for their devices
//! and images) and why.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Opens flags shared by every helper: never follow a final symlink, never leak the
/// descriptor into a child process.
const FLAGS: i32 = libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Creates `path`, which must not exist (not even as a dangling symlink), with `mode`,
/// opened for reading and writing.
pub fn create_new_nofollow(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(FLAGS)
        .open(path)
}

/// Like [`create_new_nofollow`], but first removes whatever is at `path` (a temporary left
/// by a crash, or a symlink someone planted: `unlink` removes the link, not its target).
/// If something reappears between the removal and the creation, this fails rather than
/// retrying: someone is racing us.
pub fn replace_new_nofollow(path: &Path, mode: u32) -> io::Result<File> {
    match create_new_nofollow(path, mode) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            create_new_nofollow(path, mode)
        }
        other => other,
    }
}

/// Opens `path` for reading and writing, creating it with `mode` if missing, without
/// following a symlink; an existing file is accepted only if it is a regular file with a
/// single link owned by the effective uid (a planted hard link or someone else's file is
/// refused).
pub fn open_or_create_nofollow(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        // O_NONBLOCK: opening a planted FIFO must not hang; it is refused below.
        .custom_flags(FLAGS | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| explain_loop(path, e))?;
    check_private_regular(&file, path)?;
    // Back to blocking mode for the caller's reads and writes.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let fl = nix::fcntl::OFlag::from_bits_truncate(fl) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(io::Error::from)?;
    Ok(file)
}

/// Reads a file this tool wrote itself (a sidecar next to a volume): not through a
/// symlink, only a regular file owned by the effective uid, at most `max` bytes.
pub fn read_own_file_nofollow(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(FLAGS | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| explain_loop(path, e))?;
    let md = file.metadata()?;
    let euid = nix::unistd::geteuid().as_raw();
    if !md.file_type().is_file() || md.uid() != euid {
        return Err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} is not a regular file of ours (uid {euid}); ignoring it",
                path.display()
            ),
        ));
    }
    if md.len() > max {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} has {} bytes, more than the {max} expected",
                path.display(),
                md.len()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(md.len() as usize);
    file.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Refuses anything but a regular file with one link, owned by the effective uid.
fn check_private_regular(file: &File, path: &Path) -> io::Result<()> {
    let md = file.metadata()?;
    let refuse = |why: String| {
        Err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} {why}; refusing to use it (remove it if it is not yours)",
                path.display()
            ),
        ))
    };
    if !md.file_type().is_file() {
        return refuse("is not a regular file".into());
    }
    if md.nlink() != 1 {
        return refuse(format!(
            "has {} hard links (it may be a link to another file)",
            md.nlink()
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if md.uid() != euid {
        return refuse(format!(
            "belongs to uid {}, not to us (uid {euid})",
            md.uid()
        ));
    }
    Ok(())
}

/// `ELOOP` from `O_NOFOLLOW` means "a symlink is at that name": say so.
fn explain_loop(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::new(
            e.kind(),
            format!(
                "{} is a symbolic link; refusing to follow it (remove it if it is not yours)",
                path.display()
            ),
        )
    } else {
        e
    }
}

/// Whether a rename must also be made durable (fsync of the file and of the directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the data and the directory: the new content survives a crash.
    Durable,
    /// fdatasync the data only (the rename may be lost in a crash; the old content or the
    /// new one is then found, never a mix).
    DataOnly,
}

/// Replaces `path` with `bytes`: written to `tmp` (created with `O_EXCL | O_NOFOLLOW`
/// after removing a stale one), synced, renamed over `path`. A symlink at `path` is
/// replaced, its target left alone.
pub fn write_atomically_via(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    let result = (|| {
        let mut f = replace_new_nofollow(tmp, mode)?;
        f.write_all(bytes)?;
        match durability {
            Durability::Durable => f.sync_all()?,
            Durability::DataOnly => f.sync_data()?,
        }
        drop(f);
        std::fs::rename(tmp, path)?;
        if durability == Durability::Durable {
            sync_dir_of(path)?;
        }
        Ok(())
    })();
    if result.is_err() {
        // Only ever our own temporary: it was created with O_EXCL (or is not there).
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// [`write_atomically_via`] with the temporary `path` + `.tmp`.
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    write_atomically_via(path, Path::new(&tmp), bytes, mode, durability)
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsyncs the directory holding `path` (makes a create, rename or unlink durable).
pub fn sync_dir_of(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn victim(dir: &Path) -> PathBuf {
        let v = dir.join("victim");
        std::fs::write(&v, b"precious").unwrap();
        v
    }

    #[test]
    fn create_new_refuses_a_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        let v = victim(d.path());
        let p = d.path().join("tmp");
        std::os::unix::fs::symlink(&v, &p).unwrap();
        let e = create_new_nofollow(&p, 0o600).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        // Dangling too (O_CREAT alone would create the target).
        let dangling = d.path().join("dangling");
        let target = d.path().join("created-through-link");
        std::os::unix::fs::symlink(&target, &dangling).unwrap();
        assert!(create_new_nofollow(&dangling, 0o600).is_err());
        assert!(!target.exists());
        assert_eq!(std::fs::read(&v).unwrap(), b"precious");
    }

    #[test]
    fn write_atomically_replaces_symlinks_not_their_targets() {
        let d = tempfile::tempdir().unwrap();
        let v = victim(d.path());
        let p = d.path().join("file");
        let tmp = d.path().join("file.tmp");
        std::os::unix::fs::symlink(&v, &p).unwrap();
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        write_atomically(&p, b"new", 0o600, Durability::Durable).unwrap();
        assert_eq!(std::fs::read(&v).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!tmp.exists());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn open_or_create_refuses_symlinks_hard_links_and_fifos() {
        let d = tempfile::tempdir().unwrap();
        let v = victim(d.path());
        let link = d.path().join("sym");
        std::os::unix::fs::symlink(&v, &link).unwrap();
        let e = open_or_create_nofollow(&link, 0o600).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let hard = d.path().join("hard");
        std::fs::hard_link(&v, &hard).unwrap();
        let e = open_or_create_nofollow(&hard, 0o600).unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_or_create_nofollow(&fifo, 0o600).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert_eq!(std::fs::read(&v).unwrap(), b"precious");
        // A fresh name is created, and opened again later.
        let fresh = d.path().join("fresh");
        drop(open_or_create_nofollow(&fresh, 0o600).unwrap());
        drop(open_or_create_nofollow(&fresh, 0o600).unwrap());
    }
}
