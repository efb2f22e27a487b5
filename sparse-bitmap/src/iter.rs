//! Iterators over set runs and over node pages.

use core::ops::Range;

use crate::geometry::MAX_LEVELS;
use crate::multi::ORDER_COUNT;
use crate::node::Node;
use crate::tree::{scan_leaf, BitOp};
use crate::{PhysToVirt, SparseBitmap, BITS_PER_LEAF, PHYS_ADDR_LIMIT};

/// Runs of set blocks of one tree, in address order, as physical address
/// ranges; from [`SparseBitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a, M> {
    tree: &'a SparseBitmap<M>,
    /// Next key to look at.
    next: u64,
    /// One past the last key to report.
    end: u64,
    /// Bounds the reported ranges are cut to.
    clip: Range<u64>,
    /// The leaf last looked at: its first key and the leaf, if present. Runs
    /// mostly start and end in the same leaf, so most steps need no descent
    /// from the root. The tree cannot change while `self` borrows it.
    leaf: Option<(u64, Option<Node>)>,
}

impl<'a, M: PhysToVirt> Runs<'a, M> {
    pub(crate) fn new(tree: &'a SparseBitmap<M>, range: Range<u64>) -> Self {
        let shift = tree.geometry().block_shift();
        let clip = range.start..range.end.min(PHYS_ADDR_LIMIT);
        let (next, end) =
            if clip.start < clip.end { (clip.start >> shift, ((clip.end - 1) >> shift) + 1) } else { (0, 0) };
        Self { tree, next, end, clip, leaf: None }
    }

    /// First key at or after `from` whose bit is set or clear, as `want`
    /// says: in the cached leaf if `from` falls in it, else by descent.
    fn find(&mut self, from: u64, want: BitOp) -> Option<u64> {
        let base = from - from % BITS_PER_LEAF;
        let leaf = match self.leaf {
            Some((cached, leaf)) if cached == base => leaf,
            _ => {
                let leaf = self.tree.leaf_of(from);
                self.leaf = Some((base, leaf));
                leaf
            }
        };
        match (leaf, want) {
            (Some(node), _) => {
                if let Some(bit) = scan_leaf(node, from - base, want) {
                    return Some(base + bit);
                }
            }
            (None, BitOp::Clear) => return Some(from),
            (None, BitOp::Set) => {}
        }
        let after = base + BITS_PER_LEAF;
        match want {
            // Nothing past the range's end is reported: no need to look.
            BitOp::Set => self.tree.next_set_key_before(after, self.end),
            BitOp::Clear => self.tree.next_clear_key_before(after, self.end),
        }
    }
}

impl<M: PhysToVirt> Iterator for Runs<'_, M> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        if self.next >= self.end {
            return None;
        }
        let Some(start) = self.find(self.next, BitOp::Set).filter(|&k| k < self.end) else {
            self.next = self.end;
            return None;
        };
        let g = self.tree.geometry();
        let stop = self.find(start, BitOp::Clear).unwrap_or(g.key_limit()).min(self.end);
        self.next = stop;
        Some(g.pa_of(start).max(self.clip.start)..g.pa_of(stop).min(self.clip.end))
    }
}

/// Runs of a multi-order bitmap with adjacent runs of different orders
/// merged, in address order; from
/// [`MultiOrderBitmap::runs`](crate::MultiOrderBitmap::runs).
#[derive(Debug)]
pub struct MergedRuns<'a, M> {
    sources: [Runs<'a, M>; ORDER_COUNT],
    heads: [Option<Range<u64>>; ORDER_COUNT],
}

impl<'a, M: PhysToVirt> MergedRuns<'a, M> {
    pub(crate) fn new(mut sources: [Runs<'a, M>; ORDER_COUNT]) -> Self {
        let heads = core::array::from_fn(|i| sources[i].next());
        Self { sources, heads }
    }
}

impl<M: PhysToVirt> Iterator for MergedRuns<'_, M> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let first = (0..ORDER_COUNT).filter_map(|i| self.heads[i].as_ref().map(|run| (run.start, i))).min()?.1;
        let mut run = self.heads[first].take()?;
        self.heads[first] = self.sources[first].next();
        // Each source's runs are sorted and separated by gaps, so absorbing
        // heads until none touches the run yields a maximal run.
        loop {
            let mut grew = false;
            for i in 0..ORDER_COUNT {
                if let Some(head) = self.heads[i].clone().filter(|h| h.start <= run.end) {
                    run.end = run.end.max(head.end);
                    self.heads[i] = self.sources[i].next();
                    grew = true;
                }
            }
            if !grew {
                return Some(run);
            }
        }
    }
}

/// Physical addresses of a tree's node pages, parents before children; from
/// [`SparseBitmap::node_pages`].
#[derive(Debug)]
pub struct NodePages<'a, M> {
    tree: &'a SparseBitmap<M>,
    /// Interior nodes being walked: (address, next entry to look at).
    stack: [(u64, usize); MAX_LEVELS],
    depth: usize,
    started: bool,
}

impl<'a, M: PhysToVirt> NodePages<'a, M> {
    pub(crate) fn new(tree: &'a SparseBitmap<M>) -> Self {
        Self { tree, stack: [(0, 0); MAX_LEVELS], depth: 0, started: false }
    }

    /// Yields `pa`, first remembering to walk its children if it has any.
    fn visit(&mut self, pa: u64, level: u32) -> u64 {
        if level < self.tree.geometry().levels() {
            self.stack[self.depth] = (pa, 0);
            self.depth += 1;
        }
        pa
    }
}

impl<M: PhysToVirt> Iterator for NodePages<'_, M> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if !self.started {
            self.started = true;
            let root = self.tree.root();
            return (root != 0).then(|| self.visit(root, 0));
        }
        let g = self.tree.geometry();
        while self.depth > 0 {
            let level = self.depth - 1;
            let (pa, from) = self.stack[level];
            let node = self.tree.node(pa);
            match node.next_word_other_than(from, g.fanout(level as u32), 0) {
                Some((index, child)) => {
                    self.stack[level].1 = index + 1;
                    return Some(self.visit(child, level as u32 + 1));
                }
                None => self.depth -= 1,
            }
        }
        None
    }
}
