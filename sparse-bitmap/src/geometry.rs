//! Shape of one tree: how a block number splits into node indices.
//!
//! A key (block number at the tree's order) has `52 - 12 - order` bits. Its
//! low [`LEAF_SHIFT`] bits select a bit in a leaf; every interior level above
//! consumes [`INDEX_BITS`] more, and the root consumes what is left (fewer
//! than 512 entries may be in use there).

use crate::{Error, MAX_ORDER, PAGE_SHIFT, PHYS_ADDR_BITS, PHYS_ADDR_LIMIT};

/// Key bits resolved inside one leaf (32,768 bits).
pub(crate) const LEAF_SHIFT: u32 = 15;
/// Key bits resolved by one interior node (512 entries).
pub(crate) const INDEX_BITS: u32 = 9;
/// Most interior levels any order needs (order 0: 25 bits above the leaf).
pub(crate) const MAX_LEVELS: usize = 3;

/// Node-index arithmetic for one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    order: u32,
    /// Interior levels above the leaves; 0 means the root is a leaf.
    levels: u32,
}

impl Geometry {
    pub(crate) fn new(order: u32) -> Result<Self, Error> {
        if order > MAX_ORDER {
            return Err(Error::UnsupportedOrder(order));
        }
        Ok(Self::of(order))
    }

    /// Geometry of an order already known to be at most [`MAX_ORDER`]; used
    /// for constants, where an out-of-range order fails to compile.
    pub(crate) const fn of(order: u32) -> Self {
        let above_leaf = PHYS_ADDR_BITS - PAGE_SHIFT - order - LEAF_SHIFT;
        Self { order, levels: above_leaf.div_ceil(INDEX_BITS) }
    }

    pub(crate) fn order(self) -> u32 {
        self.order
    }

    /// Interior levels; a node at level `levels()` is a leaf.
    pub(crate) fn levels(self) -> u32 {
        self.levels
    }

    /// log2 of the bytes one block (one bit) stands for.
    pub(crate) fn block_shift(self) -> u32 {
        PAGE_SHIFT + self.order
    }

    /// Number of keys: one past the largest block number.
    pub(crate) fn key_limit(self) -> u64 {
        PHYS_ADDR_LIMIT >> self.block_shift()
    }

    /// log2 of the keys one node at `level` spans.
    pub(crate) fn span_shift(self, level: u32) -> u32 {
        LEAF_SHIFT + INDEX_BITS * (self.levels - level)
    }

    /// log2 of the keys each child of an interior node at `level` spans.
    pub(crate) fn child_shift(self, level: u32) -> u32 {
        self.span_shift(level + 1)
    }

    /// Entries in use in an interior node at `level`; only the root can use
    /// fewer than 512.
    pub(crate) fn fanout(self, level: u32) -> usize {
        if level == 0 {
            let used = (PHYS_ADDR_BITS - self.block_shift()) - self.child_shift(0);
            1 << used
        } else {
            crate::ENTRIES_PER_NODE
        }
    }

    /// Entry index for `key` in an interior node at `level`.
    pub(crate) fn index(self, level: u32, key: u64) -> usize {
        ((key >> self.child_shift(level)) as usize) & (crate::ENTRIES_PER_NODE - 1)
    }

    /// Block number of the block starting at `pa`, which must be aligned to
    /// the block size and inside the 52-bit space.
    pub(crate) fn key_of(self, pa: u64) -> Result<u64, Error> {
        if pa >= PHYS_ADDR_LIMIT {
            return Err(Error::OutOfRange { pa });
        }
        if pa & ((1 << self.block_shift()) - 1) != 0 {
            return Err(Error::Misaligned { pa });
        }
        Ok(pa >> self.block_shift())
    }

    /// Keys of the blocks making up `start..end`; both ends must be aligned
    /// and `end` may equal [`PHYS_ADDR_LIMIT`].
    pub(crate) fn keys_of(self, start: u64, end: u64) -> Result<(u64, u64), Error> {
        let first = self.key_of(start)?;
        let last = if end == PHYS_ADDR_LIMIT { self.key_limit() } else { self.key_of(end)? };
        Ok((first, last.max(first)))
    }

    /// Physical address of the block `key`.
    pub(crate) fn pa_of(self, key: u64) -> u64 {
        key << self.block_shift()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_orders_have_expected_depth() {
        let depth = |order| Geometry::new(order).map(Geometry::levels);
        assert_eq!(depth(0), Ok(3));
        assert_eq!(depth(9), Ok(2));
        assert_eq!(depth(18), Ok(1));
        assert_eq!(depth(MAX_ORDER), Ok(0));
        assert_eq!(depth(MAX_ORDER + 1), Err(Error::UnsupportedOrder(26)));
    }

    #[test]
    fn root_fanout_covers_exactly_the_key_space() {
        for order in 0..=MAX_ORDER {
            let g = Geometry::new(order).unwrap();
            if g.levels() == 0 {
                continue;
            }
            let covered = (g.fanout(0) as u64) << g.child_shift(0);
            assert_eq!(covered, g.key_limit(), "order {order}");
        }
    }
}
