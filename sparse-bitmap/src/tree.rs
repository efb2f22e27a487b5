//! One radix tree of bits at one page order.

use core::ops::Range;

use crate::adopt::{Shape, Validator};
use crate::geometry::{Geometry, MAX_LEVELS};
use crate::iter::{NodePages, Runs};
use crate::node::Node;
use crate::{AdoptError, Error, FrameSource, PhysToVirt, BITS_PER_LEAF, PAGE_SIZE, PHYS_ADDR_LIMIT};

/// A set of blocks of `4 KiB << order` bytes, kept as a radix tree of 4 KiB
/// pages in physical memory.
///
/// Bit `n` stands for the block starting at `n << (12 + order)`. Nodes are
/// allocated on first set and freed as soon as they become empty, so the
/// tree never holds an empty node. Dropping the handle leaves the pages in
/// place (that is how they survive into the next image); [`clear_all`]
/// gives them back.
///
/// [`clear_all`]: SparseBitmap::clear_all
#[derive(Debug)]
pub struct SparseBitmap<M> {
    mapper: M,
    geometry: Geometry,
    /// Physical address of the root node, 0 when the tree is empty.
    root: u64,
    /// Bits set.
    count: u64,
    /// Node pages linked into the tree.
    nodes: u64,
}

impl<M: PhysToVirt> SparseBitmap<M> {
    /// An empty tree of blocks of `4 KiB << order`; `order` is at most
    /// [`MAX_ORDER`](crate::MAX_ORDER).
    pub fn new(mapper: M, order: u32) -> Result<Self, Error> {
        Ok(Self::empty(mapper, Geometry::new(order)?))
    }

    /// Rebuilds a handle on the tree at `root` (0 for an empty tree) written
    /// by a previous image, after validating every node: each lies inside one
    /// of `ram`, is page-aligned, appears at a depth fixed by the order, is
    /// reached only once, and is not empty. Validation borrows a few pages
    /// from `frames` to remember visited nodes and gives them back. Later
    /// clears give emptied adopted nodes to `frames` too.
    ///
    /// # Safety
    ///
    /// `mapper` must translate every page inside `ram` as the
    /// [`PhysToVirt`] contract describes, nothing else may write to those
    /// pages while `adopt` runs, and from then on the adopted tree's pages
    /// belong to the returned handle alone.
    pub unsafe fn adopt<F: FrameSource + ?Sized>(
        mapper: M,
        frames: &mut F,
        order: u32,
        root: u64,
        ram: &[Range<u64>],
    ) -> Result<Self, AdoptError> {
        let geometry = Geometry::new(order).map_err(|_| AdoptError::UnsupportedOrder(order))?;
        let shape = {
            let mut validator = Validator::new(&mapper, ram);
            let shape = validator.check_tree(frames, geometry, root);
            validator.finish(frames);
            shape?
        };
        Ok(Self::from_parts(mapper, geometry, root, shape))
    }

    pub(crate) fn empty(mapper: M, geometry: Geometry) -> Self {
        Self::from_parts(mapper, geometry, 0, Shape::default())
    }

    pub(crate) fn from_parts(mapper: M, geometry: Geometry, root: u64, shape: Shape) -> Self {
        Self { mapper, geometry, root, count: shape.count, nodes: shape.nodes }
    }

    /// Page order of the blocks.
    pub fn order(&self) -> u32 {
        self.geometry.order()
    }

    /// Bytes one bit stands for.
    pub fn block_size(&self) -> u64 {
        1 << self.geometry.block_shift()
    }

    /// Physical address of the root node, 0 when empty; this is what a
    /// handover records so that the next image can [`adopt`](Self::adopt).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Number of blocks set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no block is set.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Number of node pages the tree uses.
    pub fn node_count(&self) -> u64 {
        self.nodes
    }

    /// Sets the block starting at `pa`; returns whether it was clear before.
    pub fn set<F: FrameSource + ?Sized>(&mut self, frames: &mut F, pa: u64) -> Result<bool, Error> {
        let key = self.geometry.key_of(pa)?;
        Ok(self.set_keys(frames, key, key + 1)? == 1)
    }

    /// Clears the block starting at `pa`, freeing nodes that become empty;
    /// returns whether it was set before.
    pub fn clear<F: FrameSource + ?Sized>(&mut self, frames: &mut F, pa: u64) -> Result<bool, Error> {
        let key = self.geometry.key_of(pa)?;
        Ok(self.clear_key(frames, key))
    }

    /// Whether the block starting at `pa` is set.
    pub fn test(&self, pa: u64) -> Result<bool, Error> {
        Ok(self.contains_key(self.geometry.key_of(pa)?))
    }

    /// Sets every block in `range`, whose ends must be block-aligned; returns
    /// how many were clear before. Each leaf is filled only once its path
    /// exists, so on [`Error::OutOfFrames`] the range is set up to some leaf
    /// boundary and the tree is otherwise unchanged.
    pub fn set_range<F: FrameSource + ?Sized>(&mut self, frames: &mut F, range: Range<u64>) -> Result<u64, Error> {
        let (first, end) = self.geometry.keys_of(range.start, range.end)?;
        self.set_keys(frames, first, end)
    }

    /// Clears every block in `range`, whose ends must be block-aligned,
    /// freeing nodes that become empty; returns how many were set before.
    pub fn clear_range<F: FrameSource + ?Sized>(&mut self, frames: &mut F, range: Range<u64>) -> Result<u64, Error> {
        let (first, end) = self.geometry.keys_of(range.start, range.end)?;
        Ok(self.clear_keys(frames, first, end))
    }

    /// Runs of set blocks, in address order, each merged to its full extent.
    pub fn runs(&self) -> Runs<'_, M> {
        Runs::new(self, 0..PHYS_ADDR_LIMIT)
    }

    /// Runs of set blocks that intersect `range`, cut to `range`.
    pub fn runs_in(&self, range: Range<u64>) -> Runs<'_, M> {
        Runs::new(self, range)
    }

    /// Physical addresses of the node pages, root first, parents before
    /// children: the pages to preserve along with the bits.
    pub fn node_pages(&self) -> NodePages<'_, M> {
        NodePages::new(self)
    }

    /// Clears everything and gives every node page back to `frames`.
    pub fn clear_all<F: FrameSource + ?Sized>(&mut self, frames: &mut F) {
        if self.root != 0 {
            self.free_subtree(frames, self.root, 0);
        }
        self.root = 0;
        self.count = 0;
        self.nodes = 0;
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Reaches a node of this tree.
    pub(crate) fn node(&self, pa: u64) -> Node {
        // SAFETY: every caller passes the root or an entry read from a node
        // of this tree. The tree links only pages its frame source handed
        // out or that `adopt` validated against the RAM ranges, and unlinks a
        // page before freeing it, so `pa` is covered by `PhysToVirt`.
        unsafe { Node::at(&self.mapper, pa) }
    }

    /// Whether block `key` is set.
    pub(crate) fn contains_key(&self, key: u64) -> bool {
        self.leaf_of(key).is_some_and(|leaf| {
            let bit = key % BITS_PER_LEAF;
            leaf.get((bit / 64) as usize) & (1 << (bit % 64)) != 0
        })
    }

    /// Sets blocks `first..end`, leaf by leaf; returns how many were clear.
    pub(crate) fn set_keys<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        first: u64,
        end: u64,
    ) -> Result<u64, Error> {
        let mut key = first;
        let mut added = 0;
        while key < end {
            let leaf_base = key - key % BITS_PER_LEAF;
            let stop = end.min(leaf_base + BITS_PER_LEAF);
            let leaf = self.ensure_leaf(frames, key)?;
            let newly = update_bits(leaf, key - leaf_base, stop - leaf_base, BitOp::Set);
            self.count += newly;
            added += newly;
            key = stop;
        }
        Ok(added)
    }

    /// Clears blocks `first..end`; returns how many were set.
    pub(crate) fn clear_keys<F: FrameSource + ?Sized>(&mut self, frames: &mut F, first: u64, end: u64) -> u64 {
        if first >= end || self.root == 0 {
            return 0;
        }
        let (removed, emptied) = self.clear_in(frames, self.root, 0, 0, first..end);
        if emptied {
            frames.free_frame(self.root);
            self.nodes -= 1;
            self.root = 0;
        }
        self.count -= removed;
        removed
    }

    /// First set key at or after `from`.
    pub(crate) fn next_set_key(&self, from: u64) -> Option<u64> {
        self.next_set_key_before(from, self.geometry.key_limit())
    }

    /// First set key at or after `from`, looking no further than the
    /// subtrees that start below `limit` (a key at or past `limit` may
    /// still be returned: callers bound what they take).
    pub(crate) fn next_set_key_before(&self, from: u64, limit: u64) -> Option<u64> {
        if self.root == 0 || from >= self.geometry.key_limit() || from >= limit {
            return None;
        }
        self.next_in(self.root, 0, 0, from, limit, BitOp::Set)
    }

    /// First clear key at or after `from`, bounded as
    /// [`Self::next_set_key_before`] (`None`: none below `limit`).
    pub(crate) fn next_clear_key_before(&self, from: u64, limit: u64) -> Option<u64> {
        if from >= self.geometry.key_limit() || from >= limit {
            return None;
        }
        if self.root == 0 {
            return Some(from);
        }
        self.next_in(self.root, 0, 0, from, limit, BitOp::Clear)
    }

    /// The leaf holding `key`, if its path exists.
    pub(crate) fn leaf_of(&self, key: u64) -> Option<Node> {
        let mut pa = self.root;
        for level in 0..self.geometry.levels() {
            if pa == 0 {
                return None;
            }
            pa = self.node(pa).get(self.geometry.index(level, key));
        }
        (pa != 0).then(|| self.node(pa))
    }

    /// The leaf holding `key`, allocating the missing part of its path. All
    /// missing pages are allocated before any is linked, so a failure leaves
    /// the tree as it was.
    fn ensure_leaf<F: FrameSource + ?Sized>(&mut self, frames: &mut F, key: u64) -> Result<Node, Error> {
        let g = self.geometry;
        let levels = g.levels();
        // Where the first missing node gets linked: `None` for the root.
        let mut link: Option<(Node, usize)> = None;
        let mut level = 0;
        if self.root != 0 {
            let mut pa = self.root;
            loop {
                if level == levels {
                    return Ok(self.node(pa));
                }
                let node = self.node(pa);
                let index = g.index(level, key);
                level += 1;
                let child = node.get(index);
                if child == 0 {
                    link = Some((node, index));
                    break;
                }
                pa = child;
            }
        }
        // Nodes at levels `level..=levels` are missing.
        let missing = (levels + 1 - level) as usize;
        let mut fresh = [0_u64; MAX_LEVELS + 1];
        for slot in 0..missing {
            match alloc_node(frames) {
                Ok(pa) => fresh[slot] = pa,
                Err(err) => {
                    for &pa in &fresh[..slot] {
                        frames.free_frame(pa);
                    }
                    return Err(err);
                }
            }
        }
        for &pa in &fresh[..missing] {
            // SAFETY: `pa` was just handed out by the frame source used with
            // this tree, so `PhysToVirt` covers it.
            let node = unsafe { Node::at(&self.mapper, pa) };
            node.zero();
            match link {
                Some((parent, index)) => parent.set(index, pa),
                None => self.root = pa,
            }
            if level < levels {
                link = Some((node, g.index(level, key)));
            }
            level += 1;
        }
        self.nodes += missing as u64;
        // The last fresh page is the leaf, now linked.
        Ok(self.node(fresh[missing - 1]))
    }

    /// Clears one key, pruning the nodes it empties.
    fn clear_key<F: FrameSource + ?Sized>(&mut self, frames: &mut F, key: u64) -> bool {
        let g = self.geometry;
        let levels = g.levels() as usize;
        let mut path = [(0_u64, 0_usize); MAX_LEVELS];
        let mut pa = self.root;
        for (level, step) in path.iter_mut().enumerate().take(levels) {
            if pa == 0 {
                return false;
            }
            let index = g.index(level as u32, key);
            *step = (pa, index);
            pa = self.node(pa).get(index);
        }
        if pa == 0 {
            return false;
        }
        let leaf = self.node(pa);
        let bit = key % BITS_PER_LEAF;
        let word = (bit / 64) as usize;
        let mask = 1 << (bit % 64);
        let old = leaf.get(word);
        if old & mask == 0 {
            return false;
        }
        leaf.set(word, old & !mask);
        self.count -= 1;
        if old == mask && leaf.is_zero() {
            self.prune(frames, &path[..levels], pa);
        }
        true
    }

    /// Frees `empty`, the node below the last step of `path`, and every
    /// ancestor that its removal leaves empty.
    fn prune<F: FrameSource + ?Sized>(&mut self, frames: &mut F, path: &[(u64, usize)], empty: u64) {
        frames.free_frame(empty);
        self.nodes -= 1;
        for &(pa, index) in path.iter().rev() {
            let node = self.node(pa);
            node.set(index, 0);
            if !node.is_zero() {
                return;
            }
            frames.free_frame(pa);
            self.nodes -= 1;
        }
        self.root = 0;
    }

    /// Clears `keys` below the node `pa` at `level`, whose first key is
    /// `base`; returns the bits cleared and whether the node is now empty.
    fn clear_in<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        pa: u64,
        level: u32,
        base: u64,
        keys: Range<u64>,
    ) -> (u64, bool) {
        let node = self.node(pa);
        if level == self.geometry.levels() {
            let removed = update_bits(node, keys.start - base, keys.end - base, BitOp::Clear);
            return (removed, removed > 0 && node.is_zero());
        }
        let shift = self.geometry.child_shift(level);
        let first = ((keys.start - base) >> shift) as usize;
        let last = ((keys.end - 1 - base) >> shift) as usize;
        let mut removed = 0;
        let mut freed = false;
        for index in first..=last {
            let child = node.get(index);
            if child == 0 {
                continue;
            }
            let child_base = base + ((index as u64) << shift);
            let child_keys = keys.start.max(child_base)..keys.end.min(child_base + (1 << shift));
            let (cleared, emptied) = self.clear_in(frames, child, level + 1, child_base, child_keys);
            removed += cleared;
            if emptied {
                node.set(index, 0);
                frames.free_frame(child);
                self.nodes -= 1;
                freed = true;
            }
        }
        (removed, freed && node.is_zero())
    }

    /// First key at or after `from` below the node `pa` at `level` (first
    /// key `base`) whose bit is set (`BitOp::Set`) or clear (`BitOp::Clear`).
    fn next_in(&self, pa: u64, level: u32, base: u64, from: u64, limit: u64, want: BitOp) -> Option<u64> {
        let node = self.node(pa);
        if level == self.geometry.levels() {
            return scan_leaf(node, from - base, want).map(|bit| base + bit);
        }
        let shift = self.geometry.child_shift(level);
        let first = ((from - base) >> shift) as usize;
        for index in first..self.geometry.fanout(level) {
            let child = node.get(index);
            let child_base = base + ((index as u64) << shift);
            if child_base >= limit {
                break;
            }
            let child_from = from.max(child_base);
            if child == 0 {
                if want == BitOp::Clear {
                    return Some(child_from);
                }
                continue;
            }
            if let Some(key) = self.next_in(child, level + 1, child_base, child_from, limit, want) {
                return Some(key);
            }
        }
        None
    }

    /// Gives back every page of the subtree at `pa`.
    fn free_subtree<F: FrameSource + ?Sized>(&self, frames: &mut F, pa: u64, level: u32) {
        if level < self.geometry.levels() {
            let node = self.node(pa);
            for index in 0..self.geometry.fanout(level) {
                let child = node.get(index);
                if child != 0 {
                    self.free_subtree(frames, child, level + 1);
                }
            }
        }
        frames.free_frame(pa);
    }
}

/// Takes a page for a node, refusing addresses that cannot be one.
fn alloc_node<F: FrameSource + ?Sized>(frames: &mut F) -> Result<u64, Error> {
    let pa = frames.alloc_frame().ok_or(Error::OutOfFrames)?;
    if pa == 0 || !pa.is_multiple_of(PAGE_SIZE) || pa >= PHYS_ADDR_LIMIT {
        return Err(Error::BadFrame { pa });
    }
    Ok(pa)
}

/// Which bits an update writes or a scan looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BitOp {
    Set,
    Clear,
}

/// Sets or clears leaf bits `first..end`; returns how many changed.
fn update_bits(leaf: Node, first: u64, end: u64, op: BitOp) -> u64 {
    let mut changed = 0;
    let mut bit = first;
    while bit < end {
        let word = (bit / 64) as usize;
        let lo = bit % 64;
        let hi = (end - (bit - lo)).min(64);
        let mask = (u64::MAX >> (64 - (hi - lo))) << lo;
        let old = leaf.get(word);
        let new = match op {
            BitOp::Set => old | mask,
            BitOp::Clear => old & !mask,
        };
        changed += u64::from((old ^ new).count_ones());
        leaf.set(word, new);
        bit += hi - lo;
    }
    changed
}

/// First bit at or after `from` in the leaf that is set (`BitOp::Set`) or
/// clear (`BitOp::Clear`).
pub(crate) fn scan_leaf(leaf: Node, from: u64, want: BitOp) -> Option<u64> {
    let flip = match want {
        BitOp::Set => 0,
        BitOp::Clear => u64::MAX,
    };
    let word = (from / 64) as usize;
    let bits = (leaf.get(word) ^ flip) & (u64::MAX << (from % 64));
    if bits != 0 {
        return Some(word as u64 * 64 + u64::from(bits.trailing_zeros()));
    }
    // Whole words of the other kind are skipped in one scan.
    let (word, value) = leaf.next_word_other_than(word + 1, crate::ENTRIES_PER_NODE, flip)?;
    Some(word as u64 * 64 + u64::from((value ^ flip).trailing_zeros()))
}
