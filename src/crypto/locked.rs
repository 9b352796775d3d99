//! Locked memory for key material, and process-wide hardening for the daemon.
//!
//! [`Locked<T>`] places one value in its own anonymous mapping (whole pages, used by
//! nothing else), `mlock`s those pages so they are never written to swap and marks them
//! `MADV_DONTDUMP` so they never appear in a core dump. The value's own `Drop` runs first
//! (our secret types zeroize there), then the pages are wiped again, unlocked and
//! unmapped.
//!
//! Why a dedicated mapping rather than locking the pages of an ordinary heap allocation:
//! `mlock` is not reference counted, so when two secrets shared a heap page, unlocking
//! one on drop would silently unlock the other; and never unlocking would leave
//! unrelated heap data locked and let the locked total grow without bound. A private
//! mapping per secret costs one page per volume (plus one for its cipher state), which
//! is nothing next to the volume itself, and makes unlock-on-drop exact.
//!
//! Failure to lock (typically `RLIMIT_MEMLOCK`, e.g. when not run under the systemd unit
//! that raises `LimitMEMLOCK`) is logged once as a warning and is not an error: the key
//! is still wiped on drop and still excluded from core dumps.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};

use super::CryptoError;

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);
static DONTDUMP_WARNED: AtomicBool = AtomicBool::new(false);

fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as usize,
        _ => 4096,
    }
}

/// A private anonymous mapping, locked (when permitted) and excluded from core dumps.
/// Dropping it wipes, unlocks and unmaps the pages.
struct Pages {
    base: NonNull<c_void>,
    len: usize,
    locked: bool,
}

impl Pages {
    fn new(size: usize) -> Result<Pages, CryptoError> {
        let page = page_size();
        let len = size.max(1).div_ceil(page).saturating_mul(page);
        let nz = NonZeroUsize::new(len)
            .ok_or_else(|| CryptoError::Memory("zero-sized mapping".into()))?;
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choice;
        // it aliases nothing. The result is checked before use.
        let base = unsafe {
            mman::mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(|e| CryptoError::Memory(format!("mmap of {len} bytes failed: {e}")))?;
        // SAFETY: `base..base+len` is the mapping just created and owned by us alone.
        let dontdump = unsafe { mman::madvise(base, len, MmapAdvise::MADV_DONTDUMP) };
        if let Err(e) = dontdump {
            if !DONTDUMP_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!("madvise(MADV_DONTDUMP) on key memory failed: {e}");
            }
        }
        // SAFETY: as above; locking our own mapping has no effect on other memory.
        let locked = match unsafe { mman::mlock(base, len) } {
            Ok(()) => true,
            Err(e) => {
                if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "could not lock key memory ({e}); data keys may be swapped out. \
                         Raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the systemd unit, \
                         `ulimit -l`) to fix this"
                    );
                }
                false
            }
        };
        Ok(Pages { base, len, locked })
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the whole mapping is ours and writable; any value in it is gone.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().cast::<u8>(), self.len) };
        zeroize::Zeroize::zeroize(bytes);
        if self.locked {
            // SAFETY: unlocks exactly the pages we locked; no one else uses them.
            let _ = unsafe { mman::munlock(self.base, self.len) };
        }
        // SAFETY: the mapping was created by `Pages::new` with this length and nothing
        // refers to it any more.
        let _ = unsafe { mman::munmap(self.base, self.len) };
    }
}

/// One value of type `T` in its own locked, non-dumpable pages.
pub(crate) struct Locked<T> {
    ptr: NonNull<T>,
    // Declared after `ptr` only for readability: `Drop for Locked` drops the value
    // explicitly before the fields (and thus the pages) are dropped.
    pages: Pages,
    _owns: PhantomData<T>,
}

// SAFETY: `Locked<T>` owns its `T` exclusively (like `Box<T>`); the raw pointers are only
// an implementation detail, so it is as thread-safe as `T` itself.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T` (see `Deref`), exactly like `Box<T>`.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    /// Allocates the pages, then stores `make()` in them (built as late as possible so
    /// that as few copies of the secret as possible pass through the stack).
    pub(crate) fn try_new_with(
        make: impl FnOnce() -> Result<T, CryptoError>,
    ) -> Result<Locked<T>, CryptoError> {
        let page = page_size();
        if std::mem::align_of::<T>() > page {
            return Err(CryptoError::Memory(format!(
                "alignment {} exceeds the page size {page}",
                std::mem::align_of::<T>()
            )));
        }
        let pages = Pages::new(std::mem::size_of::<T>())?;
        let value = make()?; // on error `pages` is wiped and unmapped
        let ptr = pages.base.cast::<T>();
        // SAFETY: the mapping is at least `size_of::<T>()` bytes, page aligned (so aligned
        // for `T`, checked above), writable, and holds no value yet.
        unsafe { ptr.as_ptr().write(value) };
        Ok(Locked {
            ptr,
            pages,
            _owns: PhantomData,
        })
    }

    /// Moves `value` into fresh locked pages.
    #[cfg(test)]
    pub(crate) fn new(value: T) -> Result<Locked<T>, CryptoError> {
        Locked::try_new_with(|| Ok(value))
    }

    /// Whether the pages are locked in RAM (false when `mlock` was refused).
    pub(crate) fn is_locked(&self) -> bool {
        self.pages.locked
    }
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` for the whole life of `self`.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`, and `&mut self` guarantees exclusive access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds an initialised `T` that is dropped exactly once, here; it is
        // not used afterwards. The pages are wiped and released when `self.pages` drops.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
    }
}

/// A byte string of fixed length in its own locked, non-dumpable pages (a master key, a
/// KEK, a passphrase). The pages are wiped, unlocked and unmapped on drop.
pub(crate) struct LockedBytes {
    pages: Pages,
    len: usize,
}

// SAFETY: `LockedBytes` owns its mapping exclusively (like `Box<[u8]>`); shared access
// only hands out `&[u8]`.
unsafe impl Send for LockedBytes {}
// SAFETY: as above; `&LockedBytes` only gives `&[u8]`.
unsafe impl Sync for LockedBytes {}

impl LockedBytes {
    /// Copies `bytes` into fresh locked pages.
    pub(crate) fn from_slice(bytes: &[u8]) -> Result<LockedBytes, CryptoError> {
        let pages = Pages::new(bytes.len())?;
        // SAFETY: the mapping is at least `bytes.len()` bytes, writable and ours alone; the
        // source is a distinct allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                pages.base.as_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        Ok(LockedBytes {
            pages,
            len: bytes.len(),
        })
    }

    /// `len` zero bytes in fresh locked pages (a buffer to read a secret into).
    pub(crate) fn zeroed(len: usize) -> Result<LockedBytes, CryptoError> {
        // A fresh anonymous mapping reads as zeros.
        Ok(LockedBytes {
            pages: Pages::new(len)?,
            len,
        })
    }

    /// Shortens the visible length (the pages are still wiped whole on drop).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Whether the pages are locked in RAM (false when `mlock` was refused).
    pub(crate) fn is_locked(&self) -> bool {
        self.pages.locked
    }
}

impl std::ops::DerefMut for LockedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.pages.base.as_ptr().cast::<u8>(), self.len) }
    }
}

impl std::ops::Deref for LockedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping holds at least `len` initialised bytes for the whole life of
        // `self`, and is only written through `&mut self`.
        unsafe { std::slice::from_raw_parts(self.pages.base.as_ptr().cast::<u8>(), self.len) }
    }
}

/// Hardens the current process for holding keys: not dumpable (no core dumps, no
/// `ptrace` attach by other same-uid processes, `/proc/PID` owned by root) and a core
/// size limit of zero. Called at the start of every command (`cli::main`).
pub fn harden_process() -> Result<(), CryptoError> {
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| CryptoError::Memory(format!("prctl(PR_SET_DUMPABLE, 0) failed: {e}")))?;
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `setrlimit` only reads the struct passed by reference.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    if rc != 0 {
        return Err(CryptoError::Memory(format!(
            "setrlimit(RLIMIT_CORE, 0) failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_lck_kb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn value_round_trips_and_drops_once() {
        let mut v = Locked::new([7u8; 64]).expect("map");
        assert_eq!(v[0], 7);
        v[1] = 9;
        assert_eq!(&v[..3], &[7, 9, 7]);
        let s = Locked::new(String::from("abc")).expect("map");
        assert_eq!(s.as_str(), "abc");
        drop(s);
    }

    #[test]
    fn locked_bytes_hold_their_content() {
        let b = LockedBytes::from_slice(b"master key material").expect("map");
        assert_eq!(&b[..], b"master key material");
        let empty = LockedBytes::from_slice(b"").expect("map");
        assert!(empty.is_empty());
        let mut z = LockedBytes::zeroed(10_000).expect("map");
        assert!(z.iter().all(|&b| b == 0));
        z[9_999] = 1;
        z.truncate(5);
        assert_eq!(&z[..], &[0; 5]);
    }

    #[test]
    fn large_values_span_several_pages() {
        let v = Locked::new([1u8; 10_000]).expect("map");
        assert!(v.pages.len >= 10_000 && v.pages.len % page_size() == 0);
        assert!(v.iter().all(|&b| b == 1));
    }

    #[test]
    fn locking_shows_in_vmlck_when_permitted() {
        // Other tests in this process lock and unlock pages concurrently, so compare
        // against this value's own lock state rather than exact totals.
        let v = Locked::new([3u8; 64]).expect("map");
        if v.is_locked() {
            assert!(vm_lck_kb() >= (page_size() / 1024) as u64);
        } else {
            // mlock refused: must only happen when the limit is exhausted.
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into the struct we own.
            let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
            assert_eq!(rc, 0);
            assert!(lim.rlim_cur != libc::RLIM_INFINITY);
        }
    }

    #[test]
    fn dek_and_engine_key_schedules_are_in_locked_pages() {
        let dek = crate::crypto::Dek::generate().expect("dek");
        let engine =
            crate::crypto::XtsEngine::new(&dek, crate::crypto::SectorSize::S512).expect("engine");
        if dek.is_memory_locked() {
            // The engine's key schedules take at least one more locked page while alive
            // (other tests run concurrently, so only a lower bound is reliable).
            assert!(engine.keys.is_locked());
            assert!(vm_lck_kb() >= (page_size() / 1024) as u64);
        }
        drop(engine);
        drop(dek);
    }

    #[test]
    fn harden_process_clears_dumpable() {
        harden_process().expect("harden");
        assert!(!nix::sys::prctl::get_dumpable().expect("get_dumpable"));
        let mut lim = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: getrlimit writes into the struct we own.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) };
        assert_eq!(rc, 0);
        assert_eq!(lim.rlim_cur, 0);
    }
}
