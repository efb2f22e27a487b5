//! Circular queue arithmetic (§3.5 "Command and Event queues").
//!
//! A queue of 2^n entries is indexed by a PROD and a CONS register, each an
//! index in bits [n-1:0] plus a wrap flag at bit n that flips every time
//! the index passes the end. Equal index and equal wrap: empty. Equal index
//! and different wrap: full.

/// Geometry of a queue of `2^log2_entries` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ring {
    log2_entries: u8,
}

/// The widest queue the registers can describe (LOG2SIZE is 5 bits).
const MAX_LOG2_ENTRIES: u8 = 31;

impl Ring {
    /// A queue of `2^log2_entries` entries, or `None` beyond 2^31.
    pub const fn new(log2_entries: u8) -> Option<Ring> {
        if log2_entries > MAX_LOG2_ENTRIES {
            return None;
        }
        Some(Ring { log2_entries })
    }

    /// log2 of the number of entries.
    pub const fn log2_entries(self) -> u8 {
        self.log2_entries
    }

    /// Number of entries.
    pub const fn entries(self) -> u32 {
        1 << self.log2_entries
    }

    /// The wrap flag.
    pub const fn wrap_bit(self) -> u32 {
        1 << self.log2_entries
    }

    /// The bits of a pointer: wrap flag and index.
    pub const fn pointer_mask(self) -> u32 {
        (self.wrap_bit() << 1).wrapping_sub(1)
    }

    /// Whether `pointer` has no bits beyond the wrap flag.
    pub const fn is_pointer(self, pointer: u32) -> bool {
        pointer & !self.pointer_mask() == 0
    }

    /// The entry a pointer designates.
    pub const fn index(self, pointer: u32) -> u32 {
        pointer & (self.entries() - 1)
    }

    /// Entries between `cons` and `prod`. Meaningful only when
    /// [`is_consistent`](Self::is_consistent) holds; the arithmetic is
    /// modulo 2^(n+1), which the wrap flag makes exact.
    pub const fn used(self, prod: u32, cons: u32) -> u32 {
        prod.wrapping_sub(cons) & self.pointer_mask()
    }

    /// Whether `prod` is at most a full queue ahead of `cons`; anything else
    /// means one of them is corrupt.
    pub const fn is_consistent(self, prod: u32, cons: u32) -> bool {
        self.used(prod, cons) <= self.entries()
    }

    /// Entries a producer may still fill.
    pub const fn free(self, prod: u32, cons: u32) -> u32 {
        self.entries().saturating_sub(self.used(prod, cons))
    }

    pub const fn is_empty(self, prod: u32, cons: u32) -> bool {
        (prod ^ cons) & self.pointer_mask() == 0
    }

    pub const fn is_full(self, prod: u32, cons: u32) -> bool {
        (prod ^ cons) & self.pointer_mask() == self.wrap_bit()
    }

    /// `pointer` moved on by `count` entries, wrap flag included.
    pub const fn advance(self, pointer: u32, count: u32) -> u32 {
        pointer.wrapping_add(count) & self.pointer_mask()
    }
}
