//! Models and strategies shared by the test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use proptest::prelude::*;
use sparse_bitmap::{Fit, PageSize, PAGE_SIZE, PHYS_ADDR_LIMIT};

/// Where test arenas place the simulated node pages: above 256 GiB.
pub const ARENA_BASE: u64 = 0x40_0000_0000;

/// Merges a set of keys into runs `start..end` of consecutive keys.
pub fn key_runs(keys: &BTreeSet<u64>) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &key in keys {
        match runs.last_mut() {
            Some(run) if run.end == key => run.end = key + 1,
            _ => runs.push(key..key + 1),
        }
    }
    runs
}

/// Reference set of 4 KiB frames kept as disjoint, non-adjacent intervals
/// of physical addresses, for ranges too large to list frame by frame.
#[derive(Clone, Debug, Default)]
pub struct IntervalModel {
    /// start -> end
    runs: BTreeMap<u64, u64>,
}

impl IntervalModel {
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        let touching: Vec<(u64, u64)> =
            self.runs.range(..=end).filter(|&(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.runs.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.runs.insert(start, end);
    }

    pub fn remove(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let overlapping: Vec<(u64, u64)> =
            self.runs.range(..range.end).filter(|&(_, &e)| e > range.start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in overlapping {
            self.runs.remove(&s);
            if s < range.start {
                self.runs.insert(s, range.start);
            }
            if e > range.end {
                self.runs.insert(range.end, e);
            }
        }
    }

    pub fn contains(&self, pa: u64) -> bool {
        self.runs.range(..=pa).next_back().is_some_and(|(_, &e)| pa < e)
    }

    /// Whether every frame of `self` is in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        let mut rest = self.clone();
        for run in other.runs() {
            rest.remove(run);
        }
        rest.frames() == 0
    }

    pub fn frames(&self) -> u64 {
        self.runs.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum()
    }

    pub fn runs(&self) -> Vec<Range<u64>> {
        self.runs.iter().map(|(&s, &e)| s..e).collect()
    }
}

/// An operation on a multi-order bitmap.
#[derive(Clone, Debug)]
pub enum MapOp {
    Insert(Range<u64>, Fit),
    Remove(Range<u64>),
}

/// Anchors spread over the 52-bit space: the bottom, the arena's own region,
/// an interior-node boundary, and the very top.
const ANCHORS: [u64; 4] = [0, ARENA_BASE, 1 << 45, PHYS_ADDR_LIMIT - (8 << 30)];

/// A 4 KiB-aligned offset made of whole 1 GiB, 2 MiB and 4 KiB blocks,
/// biased towards block boundaries so that large orders get used.
fn block_offset(max_gib: u64) -> impl Strategy<Value = u64> {
    let part = || prop_oneof![Just(0_u64), Just(511), Just(1), 0..512_u64];
    (0..=max_gib, part(), part()).prop_map(|(g, m, f)| (g << 30) + (m << 21) + (f << 12))
}

/// A 4 KiB-aligned range near one of the anchors.
pub fn frame_range() -> impl Strategy<Value = Range<u64>> {
    (prop::sample::select(ANCHORS.to_vec()), block_offset(3), block_offset(2)).prop_map(|(anchor, offset, len)| {
        let start = (anchor + offset).min(PHYS_ADDR_LIMIT);
        start..(start + len).min(PHYS_ADDR_LIMIT)
    })
}

fn page_size() -> impl Strategy<Value = PageSize> {
    prop::sample::select(PageSize::ALL.to_vec())
}

/// Rounds `range` inwards to `size` (possibly to an empty range).
pub fn align_inwards(range: &Range<u64>, size: PageSize) -> Range<u64> {
    let start = range.start.next_multiple_of(size.bytes());
    let end = range.end - range.end % size.bytes();
    start..end.max(start)
}

pub fn map_op() -> impl Strategy<Value = MapOp> {
    prop_oneof![
        3 => frame_range().prop_map(|r| MapOp::Insert(r, Fit::Largest)),
        1 => (frame_range(), page_size())
            .prop_map(|(r, size)| MapOp::Insert(align_inwards(&r, size), Fit::Exact(size))),
        3 => frame_range().prop_map(MapOp::Remove),
    ]
}
