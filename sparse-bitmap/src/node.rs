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

    /// The page's words for one scan, which neither writes them nor keeps
    /// the slice: the scans below are the hot loops of adopting and
    /// iterating a tree, and a slice lets them run without a bounds check
    /// per word (and vectorized where the target can).
    fn scan<R>(self, f: impl FnOnce(&[u64]) -> R) -> R {
        // SAFETY: `Node::at`'s contract makes `words` valid and 8-byte
        // aligned for 512 words with no concurrent access; the slice lives
        // only for the call and nothing writes the page meanwhile.
        f(unsafe { core::slice::from_raw_parts(self.words, ENTRIES_PER_NODE) })
    }

    /// Whether every word of the page is zero.
    pub(crate) fn is_zero(self) -> bool {
        self.scan(|words| words.iter().all(|&w| w == 0))
    }

    /// Number of bits set in the page.
    pub(crate) fn popcount(self) -> u64 {
        self.scan(|words| words.iter().map(|w| u64::from(w.count_ones())).sum())
    }

    /// The first word at or after `from` (and before `end`, at most 512)
    /// that is not `skip`, with its index: an interior node's next child
    /// (`skip` 0), or a leaf's next word with a set (`skip` 0) or clear
    /// (`skip` all ones) bit.
    pub(crate) fn next_word_other_than(self, from: usize, end: usize, skip: u64) -> Option<(usize, u64)> {
        self.scan(|words| {
            let words = words.get(from..end.min(ENTRIES_PER_NODE))?;
            let at = words.iter().position(|&w| w != skip)?;
            Some((from + at, u64::from_le(words[at])))
        })
    }
}
