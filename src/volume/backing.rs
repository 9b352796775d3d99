//! Where a volume lives: a file (every path but one starting `rbd:`, opened as before:
//! `O_NOFOLLOW` rules, the header `flock`, the in-use record lock, the file identity) or
//! an RBD image on a Ceph cluster (`rbd:[POOL/[NAMESPACE/]]IMAGE`, parsed by
//! [`ImageSpec::parse`]). An image is reached through the same [`FileEngine`] seam as a
//! file: header copies, allocation map and data all go through it, so the layout on the
//! image is byte for byte the layout of a volume file.
//!
//! For an image, the in-use lock is the image's exclusive lock (`lock_exclusive`: a
//! second writer, on this host or another, is refused naming the holder), or, with
//! [`RbdSettings::takeover`] (`serve --takeover`, failover from a dead host), the lock
//! taken over from its holder, who is blocklisted and can never write again. The cluster
//! is found as the `rbd` tool finds it ([`RbdSettings::conf`], else `CEPH_CONF`, else
//! `/etc/ceph/ceph.conf`; the user from [`RbdSettings::client_id`], else `CEPH_ID`, else
//! `admin`); the keyring is read by librados from that configuration, never by us.
//!
//! Without the cargo feature `rbd`, an `rbd:` path is refused with the build option that
//! adds it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::engine::FileEngine;
use super::VolumeError;
use crate::rbd::ImageSpec;

/// How this process reaches the Ceph cluster of `rbd:` volumes (set once by the CLI from
/// `--ceph-conf`, `--ceph-id`, `serve --takeover`).
#[derive(Debug, Clone, Default)]
pub struct RbdSettings {
    /// The configuration file; `None`: `CEPH_CONF`, else `/etc/ceph/ceph.conf`.
    pub conf: Option<PathBuf>,
    /// The cephx user without `client.`; `None`: `CEPH_ID`, else `admin`.
    pub client_id: Option<String>,
    /// Take a writable image over from its current holder (blocklisting it) instead of
    /// refusing to open it: failover when the old server's host is dead.
    pub takeover: bool,
}

/// The environment variable naming the cephx user when `--ceph-id` is not given.
pub const CEPH_ID_ENV: &str = "CEPH_ID";

static SETTINGS: Mutex<Option<RbdSettings>> = Mutex::new(None);

/// Installs how this process reaches the cluster of `rbd:` volumes.
pub fn set_rbd_settings(settings: RbdSettings) {
    *SETTINGS.lock().unwrap_or_else(|e| e.into_inner()) = Some(settings);
}

/// The settings in effect (defaults when the CLI set none).
#[cfg_attr(not(feature = "rbd"), allow(dead_code))]
fn settings() -> RbdSettings {
    SETTINGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// The image an `rbd:` path names (`None` for a file path; a non-UTF-8 path is a file).
pub(crate) fn rbd_spec(path: &Path) -> Option<Result<ImageSpec, VolumeError>> {
    let s = path.to_str()?;
    if !ImageSpec::is_rbd(s) {
        return None;
    }
    Some(ImageSpec::parse(s).map_err(|e| VolumeError::Io {
        path: s.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    }))
}

/// True when `path` names an RBD image rather than a file.
pub fn is_rbd_path(path: &Path) -> bool {
    path.to_str().is_some_and(ImageSpec::is_rbd)
}

/// What an open of an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "rbd"), allow(dead_code))]
pub(crate) enum Access {
    /// Reading the header or the map (`info`, `check`): no lock; works while served.
    Inspect,
    /// A read-only open of the volume: no lock.
    ReadOnly,
    /// A writable open: the exclusive lock (or a takeover, see [`RbdSettings`]).
    Write,
}

#[cfg(feature = "rbd")]
mod imp {
    use std::path::Path;

    use super::{settings, Access, CEPH_ID_ENV};
    use crate::rbd::{Cluster, ClusterOptions, ImageSpec, RbdError, RbdImage};
    use crate::volume::engine::FileEngine;
    use crate::volume::VolumeError;

    /// The process's connected client, made on first use and shared by every image.
    static CLUSTER: std::sync::Mutex<Option<Cluster>> = std::sync::Mutex::new(None);

    pub(crate) fn rbd_err(path: &Path, e: RbdError) -> VolumeError {
        VolumeError::Io {
            path: path.display().to_string(),
            source: e.into(),
        }
    }

    fn cluster() -> Result<Cluster, RbdError> {
        let mut slot = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let s = settings();
        let client_id = s
            .client_id
            .or_else(|| std::env::var(CEPH_ID_ENV).ok().filter(|v| !v.is_empty()));
        let opts = ClusterOptions {
            conf: s.conf,
            client_id,
            ..Default::default()
        };
        let c = Cluster::connect(&opts)?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Opens the image `spec` for `access`, taking its exclusive lock (or taking it over)
    /// for a writable open.
    pub(crate) fn open_engine(
        path: &Path,
        spec: &ImageSpec,
        access: Access,
    ) -> Result<Box<dyn FileEngine>, VolumeError> {
        let c = cluster().map_err(|e| rbd_err(path, e))?;
        let image = RbdImage::open(&c, spec).map_err(|e| rbd_err(path, e))?;
        if access == Access::Write {
            lock(&c, &image, path)?;
        }
        Ok(Box::new(image))
    }

    /// The exclusive lock of a writable open, or its takeover.
    fn lock(c: &Cluster, image: &RbdImage, path: &Path) -> Result<(), VolumeError> {
        if !settings().takeover {
            return image.lock_exclusive().map_err(|e| rbd_err(path, e));
        }
        let fenced = image.take_over().map_err(|e| rbd_err(path, e))?;
        let me = c.address().unwrap_or_default();
        if fenced.is_empty() {
            tracing::info!(image = %path.display(), "--takeover: the image had no lock holder; took its lock");
        } else {
            tracing::warn!(image = %path.display(), fenced = %fenced.join(", "), this_client = %format!("client.{} ({me})", c.instance_id()), "took the image over: its previous holder is blocklisted and can no longer write");
        }
        Ok(())
    }

    /// Creates the image `spec` of `len` bytes (refusing an existing one), opens it and
    /// takes its exclusive lock while the new volume is written.
    pub(crate) fn create_engine(
        path: &Path,
        spec: &ImageSpec,
        len: u64,
    ) -> Result<Box<dyn FileEngine>, VolumeError> {
        let c = cluster().map_err(|e| rbd_err(path, e))?;
        if let Err(e) = RbdImage::create(&c, spec, len) {
            if let RbdError::Call { source, .. } = &e {
                if source.raw_os_error() == Some(libc::EEXIST) {
                    return Err(VolumeError::AlreadyExists {
                        path: path.display().to_string(),
                    });
                }
            }
            return Err(rbd_err(path, e));
        }
        let image = RbdImage::open(&c, spec).map_err(|e| rbd_err(path, e))?;
        image.lock_exclusive().map_err(|e| rbd_err(path, e))?;
        Ok(Box::new(image))
    }

    /// Removes the image `spec` (a create that failed half-way).
    pub(crate) fn remove(path: &Path, spec: &ImageSpec) {
        let removed = cluster().and_then(|c| RbdImage::remove(&c, spec));
        if let Err(e) = removed {
            tracing::warn!(image = %path.display(), "cannot remove the half-created image: {e}");
        }
    }
}

#[cfg(not(feature = "rbd"))]
mod imp {
    use std::path::Path;

    use super::Access;
    use crate::rbd::ImageSpec;
    use crate::volume::engine::FileEngine;
    use crate::volume::VolumeError;

    fn unsupported(path: &Path) -> VolumeError {
        VolumeError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this build has no RBD support (build with --features rbd)",
            ),
        }
    }

    pub(crate) fn open_engine(
        path: &Path,
        _spec: &ImageSpec,
        _access: Access,
    ) -> Result<Box<dyn FileEngine>, VolumeError> {
        Err(unsupported(path))
    }

    pub(crate) fn create_engine(
        path: &Path,
        _spec: &ImageSpec,
        _len: u64,
    ) -> Result<Box<dyn FileEngine>, VolumeError> {
        Err(unsupported(path))
    }

    pub(crate) fn remove(_path: &Path, _spec: &ImageSpec) {}
}

pub(crate) use imp::{create_engine, open_engine, remove};

/// Opens the engine of the `rbd:` path `path` for `access` (an error for a file path).
pub(crate) fn open_rbd_path(
    path: &Path,
    access: Access,
) -> Option<Result<Box<dyn FileEngine>, VolumeError>> {
    let spec = rbd_spec(path)?;
    Some(spec.and_then(|s| open_engine(path, &s, access)))
}

/// The first `len` bytes (fewer when the image is shorter) and the length of the RBD
/// image `path` names, without a lock (`cryptvol check` of an image that may be served).
pub fn read_image_prefix(path: &Path, len: usize) -> Result<(Vec<u8>, u64), VolumeError> {
    let engine = match open_rbd_path(path, Access::Inspect) {
        Some(engine) => engine?,
        None => {
            return Err(VolumeError::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not an rbd:POOL/IMAGE path",
                ),
            })
        }
    };
    let io = |source| VolumeError::Io {
        path: path.display().to_string(),
        source,
    };
    let size = engine.len().map_err(io)?;
    let n = usize::try_from(size).map_or(len, |s| s.min(len));
    let mut buf = vec![0u8; n];
    engine.read_exact_at(&mut buf, 0).map_err(io)?;
    Ok((buf, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rbd_prefixed_paths_are_images() {
        assert!(rbd_spec(Path::new("vol.img")).is_none());
        assert!(rbd_spec(Path::new("./rbd:vol")).is_none());
        let spec = rbd_spec(Path::new("rbd:rbd/vol1")).unwrap().unwrap();
        assert_eq!((spec.pool.as_str(), spec.image.as_str()), ("rbd", "vol1"));
        let bad = rbd_spec(Path::new("rbd:rbd/vol1@snap"))
            .unwrap()
            .unwrap_err();
        assert!(bad.to_string().contains("snapshots"), "{bad}");
        assert!(is_rbd_path(Path::new("rbd:x")) && !is_rbd_path(Path::new("x")));
    }

    #[cfg(not(feature = "rbd"))]
    #[test]
    fn without_the_feature_an_image_is_refused_naming_the_build_option() {
        let Some(Err(e)) = open_rbd_path(Path::new("rbd:rbd/vol1"), Access::Inspect) else {
            panic!("an rbd: path must be refused without the feature");
        };
        assert!(e.to_string().contains("--features rbd"), "{e}");
    }
}
