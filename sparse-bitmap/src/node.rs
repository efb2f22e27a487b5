//! Word access to one node page.
//!
//! A node is 512 little-endian `u64` words. In an interior node word `i` is
//! the physical address of child `i` (0 = absent); in a leaf, bit `b` of the
//! leaf is bit `b % 64` of word `b / 64`. Words are read and written through
//! raw pointers, one at a time, so no reference to node memory outlives a
//! single access.

use crate::{PhysToVirt, ENTRIES_PER_NODE};

/// One node page, reachable for word reads and writes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Node {
    words: *mut u64,
}

impl Node {
    /// Reaches the page at `pa`.
    ///
    /// # Safety
    ///
    /// `pa` must be a page the [`PhysToVirt`] contract covers for this
    /// bitmap (a node it allocated and has not freed, or a page inside the
    /// RAM ranges given to `adopt`), and the returned `Node` must not be used
    /// after that page is freed.
    #[expect(clippy::cast_ptr_alignment, reason = "the PhysToVirt contract guarantees 8-byte alignment")]
    pub(crate) unsafe fn at<M: PhysToVirt + ?Sized>(mapper: &M, pa: u64) -> Self {
        let words = mapper.phys_to_virt(pa).cast::<u64>();
        debug_assert!(words.is_aligned());
        Self { words }
    }

    /// Word `index` of the page.
    pub(crate) fn get(self, index: usize) -> u64 {
        assert!(index < ENTRIES_PER_NODE);
        // SAFETY: `Node::at`'s contract makes `words` valid and 8-byte aligned
        // for 512 words with no concurrent access; `index < 512`.
        u64::from_le(unsafe { self.words.add(index).read() })
    }

    /// Stores `value` into word `index` of the page.
    pub(crate) fn set(self, index: usize, value: u64) {
        assert!(index < ENTRIES_PER_NODE);
        // SAFETY: as in `get`; the contract also grants write access.
        unsafe { self.words.add(index).write(value.to_le()) }
    }

    /// Zeroes the whole page.
    pub(crate) fn zero(self) {
        // SAFETY: `words` is valid for writes of 512 words (`Node::at`).
        unsafe { self.words.write_bytes(0, ENTRIES_PER_NODE) }
    }

    /// Whether every word of the page is zero.
    pub(crate) fn is_zero(self) -> bool {
        (0..ENTRIES_PER_NODE).all(|i| self.get(i) == 0)
    }

    /// Number of bits set in the page.
    pub(crate) fn popcount(self) -> u64 {
        (0..ENTRIES_PER_NODE).map(|i| u64::from(self.get(i).count_ones())).sum()
    }
}
