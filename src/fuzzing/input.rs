//! Reading structured values off the front of a fuzz input.

/// The unread rest of a fuzz input.
pub(super) struct Input<'a>(pub(super) &'a [u8]);

impl<'a> Input<'a> {
    /// The next `n` bytes, or `None` (consuming nothing) when fewer are left.
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }

    /// One byte, 0 once the input is exhausted.
    pub(super) fn byte(&mut self) -> u8 {
        self.array::<1>().map_or(0, |[b]| b)
    }

    pub(super) fn u32(&mut self) -> u32 {
        self.array().map_or(0, u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> u64 {
        self.array().map_or(0, u64::from_le_bytes)
    }

    /// Everything left.
    pub(super) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}
