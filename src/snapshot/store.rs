//! The snapshot store: any `object_store` backend, addressed as
//!
//! - `file:///path` or a plain path (the default): a local directory (created mode 0700
//!   when written to; writes are atomic renames and fsynced);
//! - `s3://bucket/prefix`: an S3-compatible store, configured from the standard AWS
//!   environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//!   `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_S3`, web
//!   identity, ECS and EC2 instance credentials). Plain `http://` endpoints are allowed
//!   only on loopback (a local MinIO or moto), or with `AWS_ALLOW_HTTP=true`.
//!
//! Layout under the store root: `chunks/<aa>/<sha256-hex>` (the name is the SHA-256 of
//! the stored bytes, `aa` its first two hex digits) and `snapshots/<snapshot-id>.json`.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::manifest::SnapshotId;
use super::SnapshotError;

/// Prefix of chunk objects.
pub const CHUNKS_DIR: &str = "chunks";
/// Prefix of manifest objects.
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// An opened snapshot store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    /// Root directory of a `file://` store.
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// The default store: `$CRYPTVOL_SNAPSHOT_STORE`, else `/var/lib/cryptvol/snapshots` for
/// root, else `$XDG_DATA_HOME/cryptvol/snapshots` (`~/.local/share/cryptvol/snapshots`).
pub fn default_store() -> String {
    if let Some(s) = std::env::var_os("CRYPTVOL_SNAPSHOT_STORE").filter(|s| !s.is_empty()) {
        return s.to_string_lossy().into_owned();
    }
    if nix::unistd::geteuid().is_root() {
        return "/var/lib/cryptvol/snapshots".into();
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|x| !x.is_empty() && FsPath::new(x).is_absolute())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("cryptvol/snapshots").display().to_string()
}

/// Whether an endpoint URL names a loopback host.
fn is_loopback_endpoint(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn bad(spec: &str, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::BadStore {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

impl Store {
    /// Opens the store named by `spec`. A local directory is created (mode 0700) when
    /// `create` is set; otherwise a missing one is an error.
    pub fn open(spec: &str, create: bool) -> Result<Store, SnapshotError> {
        if spec.is_empty() {
            return Err(bad(spec, "it is empty"));
        }
        if let Some(rest) = spec.strip_prefix("s3://") {
            return Store::open_s3(spec, rest);
        }
        let path = match spec.strip_prefix("file://") {
            Some(p) if p.starts_with('/') => PathBuf::from(p),
            Some(_) => {
                return Err(bad(
                    spec,
                    "a file:// store needs an absolute path (file:///dir)",
                ))
            }
            None if spec.contains("://") => return Err(bad(
                spec,
                "unknown scheme; use file:///DIR, a plain directory path, or s3://BUCKET/PREFIX",
            )),
            None => PathBuf::from(spec),
        };
        Store::open_local(spec, &path, create)
    }

    fn open_local(spec: &str, path: &FsPath, create: bool) -> Result<Store, SnapshotError> {
        if !path.is_dir() {
            if !create {
                return Err(bad(
                    spec,
                    format!("directory {} does not exist", path.display()),
                ));
            }
            if path.exists() {
                return Err(bad(
                    spec,
                    format!(
                        "{} exists and is not a directory; give a directory (it is created if missing)",
                        path.display()
                    ),
                ));
            }
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| SnapshotError::Io {
                    path: path.display().to_string(),
                    source: e,
                })?;
        }
        let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
            .map_err(|e| bad(spec, e.to_string()))?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        let root = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Store {
            inner: Arc::new(fs),
            url: format!("file://{}", root.display()),
            local_root: Some(root),
        })
    }

    fn open_s3(spec: &str, rest: &str) -> Result<Store, SnapshotError> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad(spec, "no bucket name (s3://BUCKET/PREFIX)"));
        }
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
        if let Some(ep) = &endpoint {
            if ep.starts_with("http://") && is_loopback_endpoint(ep) {
                b = b.with_allow_http(true);
            }
        }
        let has_region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
        if !has_region {
            b = b.with_region("us-east-1");
        }
        let s3 = b.build().map_err(|e| bad(spec, e.to_string()))?;
        let prefix = prefix.trim_matches('/');
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        };
        let url = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        Ok(Store {
            inner,
            url,
            local_root: None,
        })
    }

    /// The store's canonical URL (for messages).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The root directory of a local store.
    pub fn local_root(&self) -> Option<&FsPath> {
        self.local_root.as_deref()
    }

    fn err(&self, op: impl Into<String>, source: object_store::Error) -> SnapshotError {
        SnapshotError::Store {
            store: self.url.clone(),
            op: op.into(),
            source,
        }
    }

    /// The object name of a chunk: `chunks/<aa>/<hash>`.
    pub fn chunk_object(hash: &str) -> String {
        format!("{CHUNKS_DIR}/{}/{hash}", hash.get(..2).unwrap_or("00"))
    }

    /// The object name of a manifest: `snapshots/<id>.json`.
    pub fn manifest_object(id: &SnapshotId) -> String {
        format!("{SNAPSHOTS_DIR}/{id}.json")
    }

    /// Whether a chunk object exists.
    pub async fn has_chunk(&self, hash: &str) -> Result<bool, SnapshotError> {
        let name = Store::chunk_object(hash);
        match self.inner.head(&Path::from(name.as_str())).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(format!("checking {name}"), e)),
        }
    }

    /// Stores a chunk (atomically: readers see the whole object or none).
    pub async fn put_chunk(&self, hash: &str, data: Bytes) -> Result<(), SnapshotError> {
        let name = Store::chunk_object(hash);
        self.inner
            .put(&Path::from(name.as_str()), PutPayload::from(data))
            .await
            .map_err(|e| self.err(format!("uploading {name}"), e))?;
        Ok(())
    }

    /// A chunk's bytes, `None` when it does not exist.
    pub async fn get_chunk(&self, hash: &str) -> Result<Option<Bytes>, SnapshotError> {
        let name = Store::chunk_object(hash);
        let max = u64::from(super::manifest::MAX_CHUNK_SIZE);
        self.get(&name, "chunk", max).await
    }

    /// Deletes a chunk (missing is fine).
    pub async fn delete_chunk(&self, hash: &str) -> Result<(), SnapshotError> {
        self.delete(&Store::chunk_object(hash)).await
    }

    /// Writes a manifest: this is what makes a snapshot visible.
    pub async fn put_manifest(&self, id: &SnapshotId, data: Vec<u8>) -> Result<(), SnapshotError> {
        let name = Store::manifest_object(id);
        self.inner
            .put(&Path::from(name.as_str()), PutPayload::from(data))
            .await
            .map_err(|e| self.err(format!("writing {name}"), e))?;
        Ok(())
    }

    /// A manifest's bytes, `None` when the snapshot does not exist.
    pub async fn get_manifest(&self, id: &SnapshotId) -> Result<Option<Bytes>, SnapshotError> {
        self.get(
            &Store::manifest_object(id),
            "manifest",
            super::manifest::MAX_MANIFEST_LEN,
        )
        .await
    }

    /// Deletes a manifest (missing is fine).
    pub async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), SnapshotError> {
        self.delete(&Store::manifest_object(id)).await
    }

    /// An object's bytes, refused before the download when its size is above `max` (the
    /// store is not trusted: a planted object must not make us allocate without limit).
    async fn get(
        &self,
        name: &str,
        what: &'static str,
        max: u64,
    ) -> Result<Option<Bytes>, SnapshotError> {
        let path = Path::from(name);
        let res = match self.inner.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(format!("reading {name}"), e)),
        };
        let len = res.meta.size;
        if len > max {
            return Err(SnapshotError::ObjectTooLarge {
                store: self.url.clone(),
                object: name.to_string(),
                what,
                len,
                max,
            });
        }
        match res.bytes().await {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(format!("reading {name}"), e)),
        }
    }

    async fn delete(&self, name: &str) -> Result<(), SnapshotError> {
        match self.inner.delete(&Path::from(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(format!("deleting {name}"), e)),
        }
    }

    /// The ids of all snapshots in the store (objects under `snapshots/` that are not
    /// `<id>.json` are ignored), sorted.
    pub async fn list_ids(&self) -> Result<Vec<SnapshotId>, SnapshotError> {
        let prefix = Path::from(SNAPSHOTS_DIR);
        let metas: Vec<_> = self
            .inner
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.err("listing snapshots", e))?;
        let mut ids: Vec<SnapshotId> = metas
            .iter()
            .filter_map(|m| m.location.filename())
            .filter_map(|f| f.strip_suffix(".json"))
            .filter_map(|s| SnapshotId::parse(s).ok())
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The hashes of all chunk objects in the store (one listing; for garbage collection
    /// and tests).
    pub async fn list_chunks(&self) -> Result<Vec<String>, SnapshotError> {
        let prefix = Path::from(CHUNKS_DIR);
        let metas: Vec<_> = self
            .inner
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.err("listing chunks", e))?;
        Ok(metas
            .iter()
            .filter_map(|m| m.location.filename())
            .filter(|f| super::manifest::is_hash(f))
            .map(str::to_string)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names() {
        let h = "ab".repeat(32);
        assert_eq!(Store::chunk_object(&h), format!("chunks/ab/{h}"));
        let id = SnapshotId::parse("snap-0123456789abcdef0").unwrap();
        assert_eq!(
            Store::manifest_object(&id),
            "snapshots/snap-0123456789abcdef0.json"
        );
    }

    #[test]
    fn loopback_endpoints() {
        assert!(is_loopback_endpoint("http://127.0.0.1:5000"));
        assert!(is_loopback_endpoint("http://localhost:9000/"));
        assert!(is_loopback_endpoint("http://[::1]:9000"));
        assert!(!is_loopback_endpoint("http://10.0.0.1:9000"));
        assert!(!is_loopback_endpoint("http://s3.example.com"));
    }

    #[test]
    fn store_specs() {
        assert!(matches!(
            Store::open("gs://bucket", false),
            Err(SnapshotError::BadStore { .. })
        ));
        assert!(matches!(
            Store::open("file://relative", false),
            Err(SnapshotError::BadStore { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("store");
        assert!(Store::open(missing.to_str().unwrap(), false).is_err());
        let s = Store::open(&format!("file://{}", missing.display()), true).unwrap();
        assert!(s.url().starts_with("file:///"));
        assert!(missing.is_dir());
    }

    #[tokio::test]
    async fn oversized_objects_are_refused_before_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().to_str().unwrap(), true).unwrap();
        // A planted (sparse) chunk object one byte above the largest chunk size.
        let h = "ab".repeat(32);
        std::fs::create_dir_all(dir.path().join("chunks/ab")).unwrap();
        let f = std::fs::File::create(dir.path().join("chunks/ab").join(&h)).unwrap();
        f.set_len(u64::from(super::super::manifest::MAX_CHUNK_SIZE) + 1)
            .unwrap();
        match s.get_chunk(&h).await {
            Err(SnapshotError::ObjectTooLarge { what, len, .. }) => {
                assert_eq!(what, "chunk");
                assert_eq!(len, (64 << 20) + 1);
            }
            other => panic!(
                "expected ObjectTooLarge, got {:?}",
                other.map(|b| b.map(|b| b.len()))
            ),
        }
        // At the limit it is read.
        f.set_len(u64::from(super::super::manifest::MAX_CHUNK_SIZE))
            .unwrap();
        assert_eq!(s.get_chunk(&h).await.unwrap().unwrap().len(), 64 << 20);
    }

    #[tokio::test]
    async fn chunks_and_manifests_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().to_str().unwrap(), true).unwrap();
        let h = "cd".repeat(32);
        assert!(!s.has_chunk(&h).await.unwrap());
        s.put_chunk(&h, Bytes::from_static(b"xyz")).await.unwrap();
        assert!(s.has_chunk(&h).await.unwrap());
        assert!(dir.path().join("chunks/cd").join(&h).is_file());
        assert_eq!(s.get_chunk(&h).await.unwrap().unwrap().as_ref(), b"xyz");
        assert_eq!(s.list_chunks().await.unwrap(), vec![h.clone()]);
        let id = SnapshotId::parse("snap-0123456789abcdef0").unwrap();
        assert!(s.get_manifest(&id).await.unwrap().is_none());
        s.put_manifest(&id, b"{}".to_vec()).await.unwrap();
        assert_eq!(s.list_ids().await.unwrap(), vec![id.clone()]);
        s.delete_manifest(&id).await.unwrap();
        s.delete_chunk(&h).await.unwrap();
        s.delete_chunk(&h).await.unwrap();
        assert!(s.list_ids().await.unwrap().is_empty());
        assert!(s.list_chunks().await.unwrap().is_empty());
    }
}
