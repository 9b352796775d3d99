//! A lock table over sector ranges: writers to disjoint ranges proceed in parallel,
//! writers to overlapping ranges serialize. A `Mutex` guards a short list of the
//! active ranges; a `Condvar` wakes waiters when a range is released.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::sectors::Span;

#[derive(Debug, Default)]
struct State {
    /// Ranges currently held: (ticket, span).
    active: Vec<(u64, Span)>,
    next_ticket: u64,
}

/// The lock table.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    state: Mutex<State>,
    released: Condvar,
    /// Test-only count of non-empty ranges taken, so tests can assert how often a
    /// request locks.
    #[cfg(test)]
    acquired: std::sync::atomic::AtomicU64,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    table: &'a RangeLocks,
    ticket: Option<u64>,
}

fn overlaps(a: Span, b: Span) -> bool {
    a.first < b.end && b.first < a.end
}

impl RangeLocks {
    fn state(&self) -> MutexGuard<'_, State> {
        // The table stays consistent even if a holder panicked: its guard's Drop
        // still removes its entry, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until no held range overlaps `span`, then holds it. An empty span
    /// locks nothing.
    pub fn lock(&self, span: Span) -> RangeGuard<'_> {
        if span.is_empty() {
            return RangeGuard {
                table: self,
                ticket: None,
            };
        }
        let mut st = self.state();
        while st.active.iter().any(|(_, s)| overlaps(*s, span)) {
            st = self
                .released
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        #[cfg(test)]
        self.acquired
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ticket = st.next_ticket;
        st.next_ticket = st.next_ticket.wrapping_add(1);
        st.active.push((ticket, span));
        RangeGuard {
            table: self,
            ticket: Some(ticket),
        }
    }

    /// How many non-empty ranges were taken so far (tests only).
    #[cfg(test)]
    pub(crate) fn acquisitions(&self) -> u64 {
        self.acquired.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state().active.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket else {
            return;
        };
        let mut st = self.table.state();
        if let Some(i) = st.active.iter().position(|(t, _)| *t == ticket) {
            st.active.swap_remove(i);
        }
        drop(st);
        self.table.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    fn span(first: u64, end: u64) -> Span {
        Span { first, end }
    }

    #[test]
    fn disjoint_ranges_are_held_together() {
        let t = RangeLocks::default();
        let a = t.lock(span(0, 4));
        let b = t.lock(span(4, 8));
        assert_eq!(t.held(), 2);
        drop(a);
        drop(b);
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn empty_span_locks_nothing() {
        let t = RangeLocks::default();
        let _a = t.lock(span(0, 4));
        let _b = t.lock(span(2, 2));
        assert_eq!(t.held(), 1);
    }

    #[test]
    fn overlapping_ranges_serialize() {
        let t = Arc::new(RangeLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4u64)
            .map(|i| {
                let (t, inside, max_inside, barrier) = (
                    t.clone(),
                    inside.clone(),
                    max_inside.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..50 {
                        // All ranges share sector 10.
                        let _g = t.lock(span(i, 11 + i));
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        max_inside.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(50));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        assert_eq!(t.held(), 0);
    }
}
