//! Files built under a hidden name and published only when complete: `.FILE.partial`
//! beside `FILE` (preallocated creates, restores), its publication by hard link (never
//! replacing a file that appeared meanwhile), and its removal when a build does not finish.

use std::path::{Path, PathBuf};

use crate::volume::VolumeError;

/// The hidden name a restore writes to before renaming: `.FILE.partial` beside `FILE`.
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "volume".into());
    path.with_file_name(format!(".{name}.partial"))
}

/// Gives a finished `.FILE.partial` its final name `path`: a hard link (never replacing a
/// file that appeared at `path` meanwhile), then the partial name is removed. On
/// filesystems without hard links, a rename after checking that `path` is free.
pub(super) fn publish_partial(partial: &Path, path: &Path) -> Result<(), VolumeError> {
    let io = |p: &Path, e: std::io::Error| VolumeError::Io {
        path: p.display().to_string(),
        source: e,
    };
    match std::fs::hard_link(partial, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(VolumeError::AlreadyExists {
                path: path.display().to_string(),
            })
        }
        Err(_) if !path.exists() => {
            std::fs::rename(partial, path).map_err(|e| io(path, e))?;
        }
        Err(e) => return Err(io(path, e)),
    }
    #[cfg(test)]
    crate::volume::crashstates::note_linked(partial);
    match std::fs::remove_file(partial) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(partial, e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(&dir, e))
}

/// Removes a file on drop unless disarmed (a restore that did not finish).
pub(super) struct RemoveOnDrop(pub(super) Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p);
        }
    }
}
