//! A byte budget shared by every connection: bounds the request and reply payloads held
//! in memory at once. Blocking (used from the transmission threads).

use std::sync::{Arc, Condvar, Mutex, PoisonError};

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
