//! A connected RADOS client. The configuration is found the way the `rbd` tool finds it
//! (an explicit path, else `CEPH_CONF`, else `/etc/ceph/ceph.conf`); the keyring is found
//! by librados from that configuration, so cephx keys never pass through argv, the
//! environment or our logs. Every RADOS wait is bounded by [`Timeouts`].

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use super::error::RbdError;
use super::ffi;

/// The default configuration file, as librados' own search.
pub const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";

/// Bounds on every wait for the cluster. Without them a full or degraded cluster makes
/// RADOS block forever (seen: writes hung for 10 minutes on a full OSD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `rados_osd_op_timeout`: one object operation (every image read, write, flush).
    pub osd_op: Duration,
    /// `rados_mon_op_timeout`: one monitor command (blocklisting, pool lookups).
    pub mon_op: Duration,
    /// `client_mount_timeout`: connecting and authenticating.
    pub mount: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            osd_op: Duration::from_secs(30),
            mon_op: Duration::from_secs(30),
            mount: Duration::from_secs(30),
        }
    }
}

/// How to reach the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// The configuration file; `None`: `CEPH_CONF`, else `/etc/ceph/ceph.conf`.
    pub conf: Option<PathBuf>,
    /// The cephx user without `client.` (the `rbd` tool's `--id`); `None`: `admin`.
    pub client_id: Option<String>,
    pub timeouts: Timeouts,
}

impl ClusterOptions {
    /// The configuration file these options name.
    pub fn conf_path(&self) -> PathBuf {
        if let Some(p) = &self.conf {
            return p.clone();
        }
        match std::env::var_os("CEPH_CONF") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_CEPH_CONF),
        }
    }

    fn entity_name(&self) -> String {
        format!("client.{}", self.client_id.as_deref().unwrap_or("admin"))
    }
}

/// The RADOS handle; shut down when the last [`Cluster`] clone (and every image and pool
/// context opened from it) is dropped.
struct Handle(ffi::RadosT);

// SAFETY: a `rados_t` is used from many threads at once by librados' own design (its
// calls take internal locks); we never free it while a reference exists (Drop runs once,
// when the last `Arc` goes).
unsafe impl Send for Handle {}
// SAFETY: as above; every call through `&Handle` is one of librados' thread-safe calls.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and this is its only shutdown; every
        // ioctx made from it holds an Arc to this handle, so none is left open.
        unsafe { ffi::rados_shutdown(self.0) };
    }
}

/// A connected RADOS client (cheap to clone).
#[derive(Clone)]
pub struct Cluster {
    handle: Arc<Handle>,
    timeouts: Timeouts,
    entity: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("entity", &self.entity)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Reads the configuration, sets the timeouts and connects (bounded by `mount`).
    pub fn connect(opts: &ClusterOptions) -> Result<Cluster, RbdError> {
        let conf = opts.conf_path();
        if !conf.is_file() {
            return Err(RbdError::NoConfig { path: conf });
        }
        let entity = opts.entity_name();
        let handle = create(&entity)?;
        let cluster = Cluster {
            handle: Arc::new(handle),
            timeouts: opts.timeouts,
            entity,
        };
        cluster.read_conf(&conf)?;
        cluster.set_timeouts()?;
        // A takeover breaks the old owner's lock and must fence it, whatever the file says.
        cluster.set_option("rbd_blocklist_on_break_lock", "true")?;
        // SAFETY: the handle is a created, configured, not yet connected rados_t.
        let r = unsafe { ffi::rados_connect(cluster.raw()) };
        cluster.check("connect", r, cluster.timeouts.mount)?;
        Ok(cluster)
    }

    fn read_conf(&self, conf: &Path) -> Result<(), RbdError> {
        let path = cstring(
            conf.as_os_str().as_encoded_bytes(),
            "the configuration path",
        )?;
        // SAFETY: a valid handle and a NUL-terminated path that outlives the call.
        let r = unsafe { ffi::rados_conf_read_file(self.raw(), path.as_ptr()) };
        self.check("reading the configuration", r, self.timeouts.mount)
    }

    fn set_timeouts(&self) -> Result<(), RbdError> {
        let t = self.timeouts;
        self.set_option("rados_osd_op_timeout", &secs(t.osd_op))?;
        self.set_option("rados_mon_op_timeout", &secs(t.mon_op))?;
        self.set_option("client_mount_timeout", &secs(t.mount))
    }

    /// Sets one configuration option before connecting.
    fn set_option(&self, name: &str, value: &str) -> Result<(), RbdError> {
        let n = cstring(name.as_bytes(), "an option name")?;
        let v = cstring(value.as_bytes(), "an option value")?;
        // SAFETY: a valid handle and two NUL-terminated strings that outlive the call
        // (librados copies them).
        let r = unsafe { ffi::rados_conf_set(self.raw(), n.as_ptr(), v.as_ptr()) };
        self.check("setting an option", r, self.timeouts.mount)
    }

    /// This client's global id (`client.N` in lock owners and `ceph` output).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: a connected handle; the call only reads.
        unsafe { ffi::rados_get_instance_id(self.raw()) }
    }

    /// This client's address (what a blocklist entry names).
    pub fn address(&self) -> Result<String, RbdError> {
        let mut out: *mut std::ffi::c_char = ptr::null_mut();
        // SAFETY: a connected handle; on success `out` is a NUL-terminated string that
        // librados allocated and we free with rados_buffer_free below.
        let r = unsafe { ffi::rados_getaddrs(self.raw(), &mut out) };
        self.check("reading the client address", r, self.timeouts.mon_op)?;
        if out.is_null() {
            return Ok(String::new());
        }
        // SAFETY: `out` is non-null and NUL-terminated (see above).
        let addr = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `out` was allocated by librados for us and is freed once.
        unsafe { ffi::rados_buffer_free(out) };
        Ok(addr)
    }

    /// Blocklists a client address (fencing a dead server before taking over), for
    /// `expire` (zero: the cluster's default, one hour).
    pub fn blocklist(&self, address: &str, expire: Duration) -> Result<(), RbdError> {
        let addr = cstring(address.as_bytes(), "the address")?;
        let expire = u32::try_from(expire.as_secs()).unwrap_or(u32::MAX);
        // SAFETY: a connected handle; librados takes `char *` but does not write to it
        // (it copies the string into a monitor command).
        let r = unsafe { ffi::rados_blocklist_add(self.raw(), addr.as_ptr().cast_mut(), expire) };
        self.check("blocklisting a client", r, self.timeouts.mon_op)
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    pub(super) fn raw(&self) -> ffi::RadosT {
        self.handle.0
    }

    fn check(&self, op: &'static str, r: i32, bound: Duration) -> Result<(), RbdError> {
        if r < 0 {
            return Err(RbdError::from_ret(
                op,
                &self.entity,
                i64::from(r),
                bound.as_secs(),
            ));
        }
        Ok(())
    }
}

fn create(entity: &str) -> Result<Handle, RbdError> {
    let cluster_name = cstring(b"ceph", "the cluster name")?;
    let name = cstring(entity.as_bytes(), "the client id")?;
    let mut raw: ffi::RadosT = ptr::null_mut();
    // SAFETY: `raw` is a valid out-pointer; both names are NUL-terminated and outlive the
    // call; flags 0 as documented.
    let r = unsafe { ffi::rados_create2(&mut raw, cluster_name.as_ptr(), name.as_ptr(), 0) };
    if r < 0 || raw.is_null() {
        return Err(RbdError::from_ret(
            "creating the client",
            entity,
            i64::from(r.min(-libc::EIO)),
            0,
        ));
    }
    Ok(Handle(raw))
}

fn secs(d: Duration) -> String {
    d.as_secs().max(1).to_string()
}

pub(super) fn cstring(bytes: &[u8], what: &'static str) -> Result<CString, RbdError> {
    CString::new(bytes).map_err(|_| RbdError::Nul { what })
}

/// A pool (and namespace) context; keeps its cluster alive.
pub(super) struct Ioctx {
    raw: ffi::RadosIoctxT,
    cluster: Cluster,
}

// SAFETY: librados io contexts may be used from many threads for I/O; the namespace is
// set once before sharing and never changed after.
unsafe impl Send for Ioctx {}
// SAFETY: as above.
unsafe impl Sync for Ioctx {}

impl Ioctx {
    pub(super) fn new(cluster: &Cluster, pool: &str, ns: Option<&str>) -> Result<Ioctx, RbdError> {
        let p = cstring(pool.as_bytes(), "the pool name")?;
        let mut raw: ffi::RadosIoctxT = ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated pool name, a valid out-pointer.
        let r = unsafe { ffi::rados_ioctx_create(cluster.raw(), p.as_ptr(), &mut raw) };
        if r < 0 {
            let bound = cluster.timeouts.mon_op.as_secs();
            return Err(match -r {
                libc::ENOENT => RbdError::Call {
                    op: "opening the pool",
                    target: format!("pool {pool} (it does not exist)"),
                    source: std::io::Error::from_raw_os_error(libc::ENOENT),
                },
                _ => RbdError::from_ret("opening the pool", pool, i64::from(r), bound),
            });
        }
        let io = Ioctx {
            raw,
            cluster: cluster.clone(),
        };
        if let Some(ns) = ns {
            let n = cstring(ns.as_bytes(), "the namespace")?;
            // SAFETY: a valid ioctx not yet shared with another thread; librados copies
            // the string.
            unsafe { ffi::rados_ioctx_set_namespace(io.raw, n.as_ptr()) };
        }
        Ok(io)
    }

    pub(super) fn raw(&self) -> ffi::RadosIoctxT {
        self.raw
    }

    pub(super) fn cluster(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for Ioctx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create and destroyed once; every image opened in
        // it holds this Ioctx and was closed before (field order in RbdImage).
        unsafe { ffi::rados_ioctx_destroy(self.raw) };
    }
}
