//! Break-glass recovery (`cryptvol break-glass`): hands a volume's data key out of
//! cryptvol, through the normal key path (key states, policies and the audit log apply),
//! to a descriptor the caller opened, in the raw form `cryptsetup open --type plain`
//! and `dmsetup` accept, and says how dm-crypt maps the volume with it.
//!
//! The refusals: a caller who is neither root nor the owner of the volume file; a
//! descriptor that is a terminal, a regular file others may read, not open for writing,
//! or one of 0/1/2 without `allow_std_fd`; a volume in the middle of a re-encryption (its
//! sectors are under two keys, which no single dm-crypt mapping can read). The data key
//! is checked against the header (key check value and MAC) before it is written, and an
//! audit record (`break-glass`) says that it left cryptvol before the first byte does.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{FromRawFd as _, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};

use crate::keys::{AuditEvent, KeyError, KeyOp, Principal};
use crate::volume::{self, Header};

use super::unlock::{unlock_dek, warn_health};
use super::{keyslot_err, KeyOptions, OpsError};

/// Bytes per dm-crypt / cryptsetup sector (offsets and sizes are counted in these).
const DM_SECTOR: u64 = 512;

/// The descriptor the data key goes to, checked (see [`DekFd::check`]).
#[derive(Debug)]
pub struct DekFd {
    file: File,
    fd: RawFd,
    /// What it is, for the audit record (`pipe`, `socket`, `file PATH`, ...).
    kind: String,
    /// The path of a regular file, to name it in the printed commands.
    path: Option<PathBuf>,
}

impl DekFd {
    /// Takes descriptor `fd` for the data key after checking that it is open for
    /// writing, no terminal, no regular file readable by group or others, and not 0/1/2
    /// unless `allow_std_fd`.
    pub fn check(fd: RawFd, allow_std_fd: bool) -> Result<DekFd, OpsError> {
        let refuse = |reason: String| OpsError::BreakGlass {
            reason: format!("descriptor {fd}: {reason}"),
        };
        if fd < 0 {
            return Err(refuse("not a descriptor number".into()));
        }
        if fd <= 2 && !allow_std_fd {
            return Err(refuse("is standard input, output or error; pass the key on another descriptor (e.g. --dek-fd 3 3>FILE), or add --allow-std-fd if you really mean it".into()));
        }
        let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| {
            refuse(format!(
                "is not open ({e}); open it in the shell, e.g. --dek-fd 3 3>FILE"
            ))
        })?;
        let mode = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE;
        if mode != OFlag::O_WRONLY && mode != OFlag::O_RDWR {
            return Err(refuse(
                "is not open for writing (use N>FILE or a pipe)".into(),
            ));
        }
        if nix::unistd::isatty(fd).unwrap_or(false) {
            return Err(refuse("is a terminal: the raw data key is never written to a terminal; redirect it to a pipe or a private file".into()));
        }
        let st = fstat(fd).map_err(|e| refuse(format!("cannot inspect it: {e}")))?;
        let (kind, path) = describe(fd, st.st_mode)?;
        if path.is_some() && st.st_mode & 0o077 != 0 {
            return Err(refuse(format!(
                "is a file that group or others may read (mode {:o}); create it private first (umask 077, or on a tmpfs such as /run) ",
                st.st_mode & 0o7777
            )));
        }
        // SAFETY: `fd` is open (F_GETFL succeeded) and the caller hands it to us for this
        // one purpose; nothing else in this process uses it, and the File closes it once.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(DekFd {
            file,
            fd,
            kind,
            path,
        })
    }

    pub fn number(&self) -> RawFd {
        self.fd
    }

    /// The regular file the key went to, if it is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// What descriptor `fd` (of type `st_mode`) is, and a regular file's path.
fn describe(fd: RawFd, st_mode: u32) -> Result<(String, Option<PathBuf>), OpsError> {
    let ty = SFlag::from_bits_truncate(st_mode) & SFlag::S_IFMT;
    Ok(match ty {
        SFlag::S_IFIFO => ("pipe".into(), None),
        SFlag::S_IFSOCK => ("socket".into(), None),
        SFlag::S_IFCHR => ("character device".into(), None),
        SFlag::S_IFREG => {
            let p = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
            let label = p
                .as_ref()
                .map(|p| format!("file {}", p.display()))
                .unwrap_or_else(|| "file".into());
            (label, p)
        }
        _ => {
            return Err(OpsError::BreakGlass {
                reason: format!("descriptor {fd}: is neither a pipe, a socket nor a regular file"),
            })
        }
    })
}

/// How dm-crypt maps the volume: what [`break_glass`] returns to print.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recovery {
    pub file: PathBuf,
    pub uuid: String,
    /// Data-area offset and length in 512-byte sectors.
    pub offset_sectors: u64,
    pub size_sectors: u64,
    pub sector_size: u32,
    /// Whether the volume is thin (has an allocation map): unallocated chunks hold no
    /// ciphertext and read as garbage through dm-crypt.
    pub thin: bool,
    /// The keyslot that gave the data key.
    pub keyslot: usize,
}

impl Recovery {
    fn of(path: &Path, h: &Header, keyslot: usize) -> Recovery {
        Recovery {
            // Absolute, so that the printed commands work from any directory.
            file: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            uuid: h.uuid.to_string(),
            offset_sectors: h.data_offset / DM_SECTOR,
            size_sectors: h.size / DM_SECTOR,
            sector_size: h.sector_size,
            thin: h.allocation_map.is_some(),
            keyslot,
        }
    }

    /// `cryptsetup open --type plain …` for this volume, the key read from `key_file`
    /// (`-` for standard input), mapped as `/dev/mapper/NAME`.
    pub fn cryptsetup_line(&self, key_file: &str, name: &str, read_only: bool) -> String {
        let mut line = format!(
            "cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 \
             --key-file={} --keyfile-size=64 --offset {} --size {} --sector-size {}",
            shell_word(key_file),
            self.offset_sectors,
            self.size_sectors,
            self.sector_size
        );
        if self.sector_size as u64 != DM_SECTOR {
            // cryptvol's tweak counts volume sectors, not 512-byte ones.
            line.push_str(" --iv-large-sectors");
        }
        if read_only {
            line.push_str(" --readonly");
        }
        line.push_str(&format!(
            " {} {}",
            shell_word(&self.file.display().to_string()),
            shell_word(name)
        ));
        line
    }

    /// The dm-crypt table line (`dmsetup create NAME --table '…'`) over the block device
    /// `device` that holds the volume file (e.g. a loop device), the key as hex `hex_key`.
    pub fn dm_table(&self, hex_key: &str, device: &str) -> String {
        let opts = if self.sector_size as u64 != DM_SECTOR {
            format!("2 sector_size:{} iv_large_sectors", self.sector_size)
        } else {
            String::new()
        };
        format!(
            "0 {} crypt aes-xts-plain64 {hex_key} 0 {device} {} {opts}",
            self.size_sectors, self.offset_sectors
        )
        .trim_end()
        .to_string()
    }
}

/// `s` quoted for a POSIX shell when it holds anything but safe characters.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Refuses unless the caller is root or owns the volume file.
fn check_caller(path: &Path, caller: &Principal) -> Result<(), OpsError> {
    let md = std::fs::metadata(path).map_err(|e| OpsError::BreakGlass {
        reason: format!("{}: cannot inspect the volume file: {e}", path.display()),
    })?;
    if caller.uid == 0 || caller.uid == md.uid() {
        return Ok(());
    }
    Err(OpsError::BreakGlass {
        reason: format!(
            "{}: {caller} may not take this volume's data key out: only root or the owner of the volume file (uid {}) may",
            path.display(),
            md.uid()
        ),
    })
}

/// Unwraps the data key of the volume at `path` (for [`KeyOp::BreakGlass`]), checks it
/// against the header, audits that it leaves cryptvol and writes its 64 bytes to `out`.
pub async fn break_glass(path: &Path, keys: &KeyOptions, out: DekFd) -> Result<Recovery, OpsError> {
    let svc = keys.service();
    check_caller(path, svc.principal())?;
    let (header, health) = volume::read_header(path)?;
    warn_health(path, &health);
    if header.reencrypt.is_some() {
        return Err(keyslot_err(path, "a re-encryption is in progress: its sectors are under two data keys, which no single dm-crypt mapping reads; finish it first (`cryptvol reencrypt`)".into()));
    }
    let order: Vec<usize> = (0..header.keyslots.len()).collect();
    // Checked against the key check value and the header MAC inside.
    let (dek, slot) = unlock_dek(path, &header, keys, KeyOp::BreakGlass, &order).await?;
    let recovery = Recovery::of(path, &header, slot);
    let ctx = crate::keys::EncryptionContext::for_volume(&header.uuid);
    let slot_ref = header
        .keyslots
        .get(slot)
        .ok_or_else(|| keyslot_err(path, format!("keyslot {slot} vanished")))?;
    let detail = format!(
        "the data key left cryptvol: written to descriptor {} ({}) for dm-crypt; volume file {}; keyslot {slot}",
        out.fd,
        out.kind,
        path.display()
    );
    let event = |outcome| AuditEvent {
        operation: "break-glass",
        backend: &slot_ref.backend,
        key_id: &slot_ref.key_id,
        context: Some(&ctx),
        principal: svc.principal(),
        outcome,
        detail: Some(&detail),
    };
    // Fail closed: no record, no key.
    svc.audit_log().record(&event(Ok(())))?;
    let mut file = out.file;
    if let Err(e) = file.write_all(dek.expose()).and_then(|()| file.flush()) {
        let err = KeyError::Unsupported(format!("writing the data key failed: {e}"));
        let _ = svc.audit_log().record(&event(Err(&err)));
        return Err(OpsError::BreakGlass {
            reason: format!("descriptor {}: cannot write the data key: {e}", out.fd),
        });
    }
    if out.path.is_some() {
        // A regular file: make the key durable before saying where it is.
        let _ = file.sync_all();
    }
    drop(file);
    Ok(recovery)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sector_size: u32) -> Recovery {
        Recovery {
            file: PathBuf::from("/srv/vol 1.img"),
            uuid: String::new(),
            offset_sectors: 2048,
            size_sectors: 20480,
            sector_size,
            thin: true,
            keyslot: 0,
        }
    }

    #[test]
    fn cryptsetup_line_has_large_sector_ivs_for_4096() {
        let l = rec(4096).cryptsetup_line("-", "vol", true);
        assert_eq!(
            l,
            "cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 \
             --key-file=- --keyfile-size=64 --offset 2048 --size 20480 --sector-size 4096 \
             --iv-large-sectors --readonly '/srv/vol 1.img' vol"
        );
        let l = rec(512).cryptsetup_line("/run/k", "v", false);
        assert!(!l.contains("--iv-large-sectors"), "{l}");
        assert!(!l.contains("--readonly"), "{l}");
    }

    #[test]
    fn dm_table_options() {
        assert_eq!(
            rec(4096).dm_table("KEY", "/dev/loop0"),
            "0 20480 crypt aes-xts-plain64 KEY 0 /dev/loop0 2048 2 sector_size:4096 iv_large_sectors"
        );
        assert_eq!(
            rec(512).dm_table("KEY", "/dev/loop0"),
            "0 20480 crypt aes-xts-plain64 KEY 0 /dev/loop0 2048"
        );
    }

    #[test]
    fn standard_descriptors_and_closed_ones_are_refused() {
        let e = DekFd::check(1, false).err().unwrap();
        assert!(e.to_string().contains("--allow-std-fd"), "{e}");
        let e = DekFd::check(987_654, false).err().unwrap();
        assert!(e.to_string().contains("is not open"), "{e}");
    }
}
