//! A byte budget shared by every connection: bounds the request and reply payloads held
//! in memory at once. Blocking (used from the transmission threads).

use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// Payload buffers at least this large are given back to the system when freed.
pub(crate) const MMAP_THRESHOLD: usize = 128 * 1024;

/// Makes freed payload buffers leave the process (RSS), so that memory held after the
/// requests that needed it stays within the budget.
///
/// glibc malloc serves blocks of at least `M_MMAP_THRESHOLD` (128 KiB) with `mmap` and
/// unmaps them on free, but by default it raises that threshold to the size of every
/// mmapped block freed (up to 32 MiB): after the first 4 MiB buffer is freed, later ones
/// come from the heap arenas (one per thread), whose free memory usually stays
/// resident. Setting the threshold explicitly turns that adjustment off. Process-wide;
/// idempotent.
pub(crate) fn return_freed_memory_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it takes plain integers and
        // is safe to call at any time, from any thread.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
        if ok != 1 {
            tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed: freed buffers may stay resident");
        }
    }
}

/// Large payload buffers kept between requests, shared by every connection, so that a
/// busy server does not map and fault in a fresh multi-MiB buffer for every request.
/// Holds at most `limit` bytes (capacity); what does not fit is freed. Idle connections
/// hold none of it: a thread takes a buffer for one request and puts it back after.
pub(crate) struct BufferPool {
    free: Mutex<(Vec<Vec<u8>>, usize)>,
    limit: usize,
}

impl BufferPool {
    pub fn new(limit: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new((Vec::new(), 0)),
            limit,
        }
    }

    /// The smallest pooled buffer with room for `len` bytes, if any.
    pub fn take(&self, len: usize) -> Option<Vec<u8>> {
        let mut g = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (bufs, bytes) = &mut *g;
        let i = bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        let b = bufs.swap_remove(i);
        *bytes -= b.capacity();
        Some(b)
    }

    /// Keeps `buf` for later requests if the pool has room, else frees it.
    pub fn put(&self, buf: Vec<u8>) {
        let mut g = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (bufs, bytes) = &mut *g;
        if *bytes + buf.capacity() <= self.limit {
            *bytes += buf.capacity();
            bufs.push(buf);
        }
    }

    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.free.lock().unwrap_or_else(PoisonError::into_inner).1
    }
}

/// A counting semaphore over bytes.
pub(crate) struct ByteBudget {
    available: Mutex<usize>,
    freed: Condvar,
    total: usize,
}

impl ByteBudget {
    pub fn new(total: usize) -> ByteBudget {
        ByteBudget {
            available: Mutex::new(total),
            freed: Condvar::new(),
            total,
        }
    }

    /// Takes `n` bytes (clamped to the total so one request can always proceed), waiting
    /// while they are in use elsewhere. Released when the returned guard drops.
    pub fn acquire(self: &Arc<Self>, n: usize) -> BudgetGuard {
        let n = n.clamp(1, self.total);
        let mut avail = self
            .available
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *avail < n {
            avail = self
                .freed
                .wait(avail)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *avail -= n;
        BudgetGuard {
            budget: self.clone(),
            n,
        }
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        *self
            .available
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes held from a [`ByteBudget`].
pub(crate) struct BudgetGuard {
    budget: Arc<ByteBudget>,
    n: usize,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let mut avail = self
            .budget
            .available
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *avail += self.n;
        drop(avail);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn acquire_and_release() {
        let b = Arc::new(ByteBudget::new(100));
        let g = b.acquire(60);
        assert_eq!(b.available(), 40);
        let h = b.acquire(0); // counts as one byte
        assert_eq!(b.available(), 39);
        drop(g);
        drop(h);
        assert_eq!(b.available(), 100);
        // Larger than the total: clamped, so it cannot deadlock.
        let g = b.acquire(1000);
        assert_eq!(b.available(), 0);
        drop(g);
    }

    #[test]
    fn buffer_pool_stays_within_its_limit_and_hands_out_the_smallest_fit() {
        let p = BufferPool::new(10 << 20);
        p.put(Vec::with_capacity(4 << 20));
        p.put(Vec::with_capacity(1 << 20));
        p.put(Vec::with_capacity(4 << 20));
        // 9 MiB pooled; another 4 MiB would pass the limit and is freed instead.
        p.put(Vec::with_capacity(4 << 20));
        assert!(p.pooled() <= 10 << 20);
        let b = p.take(512 << 10).expect("fits");
        assert!(b.capacity() >= 512 << 10 && b.capacity() < 4 << 20);
        assert!(p.take(8 << 20).is_none());
        let b4 = p.take(4 << 20).expect("a 4 MiB buffer");
        assert!(b4.capacity() >= 4 << 20);
        drop((b, b4));
        assert!(p.pooled() >= 4 << 20);
    }

    #[test]
    fn never_exceeds_the_total_under_contention() {
        let b = Arc::new(ByteBudget::new(1000));
        let in_use = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (b, in_use, peak) = (b.clone(), in_use.clone(), peak.clone());
                std::thread::spawn(move || {
                    for j in 0..200 {
                        let n = 100 + (i * 37 + j * 11) % 400;
                        let _g = b.acquire(n);
                        let now = in_use.fetch_add(n, Ordering::SeqCst) + n;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        in_use.fetch_sub(n, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(
            peak.load(Ordering::SeqCst) <= 1000,
            "peak {}",
            peak.load(Ordering::SeqCst)
        );
        assert_eq!(b.available(), 1000);
    }
}
