//! Where the control socket is: the path given, or the default one for root.

use std::path::{Path, PathBuf};

use super::protocol::DEFAULT_CONTROL_PATH;

/// The control socket path in effect: the one given, else [`DEFAULT_CONTROL_PATH`] when
/// running as root and its directory exists or could be created (`dir_ready`), else none.
pub fn choose_control_path(
    given: Option<PathBuf>,
    is_root: bool,
    dir_ready: impl FnOnce() -> bool,
) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p),
        None if is_root && dir_ready() => Some(PathBuf::from(DEFAULT_CONTROL_PATH)),
        None => None,
    }
}

/// [`choose_control_path`] for this process: creates `/run/cryptvol` (0700) for root
/// when missing.
pub fn control_path(given: Option<PathBuf>) -> Option<PathBuf> {
    choose_control_path(given, nix::unistd::geteuid().is_root(), || {
        let dir = Path::new(DEFAULT_CONTROL_PATH)
            .parent()
            .unwrap_or(Path::new("/run"));
        if dir.is_dir() {
            return true;
        }
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().mode(0o700).create(dir).is_ok()
    })
}
