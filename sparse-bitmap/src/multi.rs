//! One tree per page size, used together as a set of 4 KiB frames.
//!
//! Invariant: no frame is covered by bits at two orders. Inserting a block
//! that a larger set block already covers changes nothing; inserting a
//! block clears the smaller-order bits under it; removing part of a larger
//! block re-records the rest of it at smaller orders first.

use core::ops::Range;

use crate::adopt::{Shape, Validator};
use crate::geometry::{Geometry, LEAF_SHIFT};
use crate::iter::{MergedRuns, NodePages};
use crate::{AdoptError, Error, FrameSource, PhysToVirt, SparseBitmap, PAGE_SIZE, PHYS_ADDR_LIMIT};

/// Number of page sizes, and of trees and roots in a [`MultiOrderBitmap`].
pub(crate) const ORDER_COUNT: usize = 3;

/// The page sizes a [`MultiOrderBitmap`] records, smallest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, order 0.
    Size4KiB,
    /// 2 MiB, order 9.
    Size2MiB,
    /// 1 GiB, order 18.
    Size1GiB,
}

impl PageSize {
    /// Every size, smallest first; also the order of [`MultiOrderBitmap::roots`].
    pub const ALL: [Self; ORDER_COUNT] = [Self::Size4KiB, Self::Size2MiB, Self::Size1GiB];

    /// Page order: log2 of the size in 4 KiB frames.
    pub const fn order(self) -> u32 {
        match self {
            Self::Size4KiB => 0,
            Self::Size2MiB => 9,
            Self::Size1GiB => 18,
        }
    }

    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << self.order()
    }

    /// Position in [`PageSize::ALL`] and in the roots.
    const fn index(self) -> usize {
        self as usize
    }

    const fn geometry(self) -> Geometry {
        match self {
            Self::Size4KiB => Geometry::of(Self::Size4KiB.order()),
            Self::Size2MiB => Geometry::of(Self::Size2MiB.order()),
            Self::Size1GiB => Geometry::of(Self::Size1GiB.order()),
        }
    }

    /// Bytes one leaf of this size's tree spans.
    const fn leaf_span(self) -> u64 {
        self.bytes() << LEAF_SHIFT
    }
}

/// How [`MultiOrderBitmap::insert_range`] records a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Split the range into the largest aligned blocks that fit.
    Largest,
    /// Record it in blocks of this size only; the range must be aligned to it.
    Exact(PageSize),
}

/// A set of 4 KiB frames recorded at the largest page order that fits, one
/// [`SparseBitmap`] per [`PageSize`]: a 1 GiB block costs one bit.
#[derive(Debug)]
pub struct MultiOrderBitmap<M> {
    trees: [SparseBitmap<M>; ORDER_COUNT],
}

impl<M: PhysToVirt + Clone> MultiOrderBitmap<M> {
    /// An empty set.
    pub fn new(mapper: M) -> Self {
        Self { trees: PageSize::ALL.map(|size| SparseBitmap::empty(mapper.clone(), size.geometry())) }
    }

    /// Rebuilds the set from the roots a previous image recorded (in
    /// [`PageSize::ALL`] order, 0 for an empty tree). Every node of every
    /// tree is validated as by [`SparseBitmap::adopt`], no page may serve as
    /// a node twice across the trees, and no frame may be covered at two
    /// orders.
    ///
    /// # Safety
    ///
    /// As for [`SparseBitmap::adopt`]: `mapper` must translate every page
    /// inside `ram`, nothing else may write to those pages while `adopt`
    /// runs, and the adopted pages belong to the returned handle alone.
    pub unsafe fn adopt<F: FrameSource + ?Sized>(
        mapper: M,
        frames: &mut F,
        roots: [u64; ORDER_COUNT],
        ram: &[Range<u64>],
    ) -> Result<Self, AdoptError> {
        let mut shapes = [Shape::default(); ORDER_COUNT];
        {
            let mut validator = Validator::new(&mapper, ram);
            let checked = PageSize::ALL.iter().try_for_each(|size| {
                let i = size.index();
                shapes[i] = validator.check_tree(frames, size.geometry(), roots[i])?;
                Ok(())
            });
            validator.finish(frames);
            checked?;
        }
        let map = Self {
            trees: PageSize::ALL.map(|size| {
                let i = size.index();
                SparseBitmap::from_parts(mapper.clone(), size.geometry(), roots[i], shapes[i])
            }),
        };
        map.check_disjoint()?;
        Ok(map)
    }
}

impl<M: PhysToVirt> MultiOrderBitmap<M> {
    /// Root addresses of the trees in [`PageSize::ALL`] order, 0 for an
    /// empty tree: what the handover records.
    pub fn roots(&self) -> [u64; ORDER_COUNT] {
        self.trees.each_ref().map(SparseBitmap::root)
    }

    /// The tree holding blocks of `size`.
    pub fn tree(&self, size: PageSize) -> &SparseBitmap<M> {
        &self.trees[size.index()]
    }

    /// Number of 4 KiB frames in the set.
    pub fn frame_count(&self) -> u64 {
        self.trees.iter().map(|t| t.count() << t.order()).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.trees.iter().all(SparseBitmap::is_empty)
    }

    /// Number of node pages over all trees.
    pub fn node_count(&self) -> u64 {
        self.trees.iter().map(SparseBitmap::node_count).sum()
    }

    /// Physical addresses of every node page of every tree.
    pub fn node_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.trees.iter().flat_map(NodePages::new)
    }

    /// Whether the 4 KiB frame holding `pa` is in the set.
    pub fn contains(&self, pa: u64) -> bool {
        pa < PHYS_ADDR_LIMIT
            && PageSize::ALL.iter().any(|&size| {
                let tree = &self.trees[size.index()];
                tree.contains_key(pa >> tree.geometry().block_shift())
            })
    }

    /// Whether every frame touching `range` is in the set (true when the
    /// range is empty).
    pub fn contains_range(&self, range: Range<u64>) -> bool {
        if range.start >= range.end {
            return true;
        }
        if range.end > PHYS_ADDR_LIMIT {
            return false;
        }
        let start = range.start - range.start % PAGE_SIZE;
        let end = range.end.next_multiple_of(PAGE_SIZE);
        self.runs_in(start..end).next() == Some(start..end)
    }

    /// Maximal runs of frames in the set, in address order, with blocks of
    /// different orders merged.
    pub fn runs(&self) -> MergedRuns<'_, M> {
        self.runs_in(0..PHYS_ADDR_LIMIT)
    }

    /// Runs intersecting `range`, cut to it.
    pub fn runs_in(&self, range: Range<u64>) -> MergedRuns<'_, M> {
        MergedRuns::new(self.trees.each_ref().map(|t| t.runs_in(range.clone())))
    }

    /// Adds the block of `size` at `pa` (aligned to `size`).
    pub fn insert<F: FrameSource + ?Sized>(&mut self, frames: &mut F, pa: u64, size: PageSize) -> Result<(), Error> {
        let end = pa.checked_add(size.bytes()).ok_or(Error::OutOfRange { pa })?;
        self.insert_range(frames, pa..end, Fit::Exact(size))
    }

    /// Removes the block of `size` at `pa` (aligned to `size`).
    pub fn remove<F: FrameSource + ?Sized>(&mut self, frames: &mut F, pa: u64, size: PageSize) -> Result<(), Error> {
        check_aligned(pa, size)?;
        let end = pa.checked_add(size.bytes()).ok_or(Error::OutOfRange { pa })?;
        self.remove_range(frames, pa..end)
    }

    /// Adds the frames of `range` (4 KiB-aligned ends), recorded as `fit`
    /// says; parts already covered by a larger block stay as they are.
    ///
    /// On error, some of the range may be added; nothing outside it changes
    /// and the set stays well-formed.
    pub fn insert_range<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        range: Range<u64>,
        fit: Fit,
    ) -> Result<(), Error> {
        let (start, end) = check_range(&range)?;
        match fit {
            Fit::Exact(size) => {
                check_aligned(start, size)?;
                check_aligned(end, size)?;
                self.insert_blocks(frames, start..end, size)
            }
            Fit::Largest => {
                for (piece, size) in Pieces::new(start..end, ORDER_COUNT) {
                    self.insert_blocks(frames, piece, size)?;
                }
                Ok(())
            }
        }
    }

    /// Removes the frames of `range` (4 KiB-aligned ends). A larger block
    /// straddling an end of the range is split: its part outside the range is
    /// re-recorded at the largest smaller orders that fit before the block's
    /// bit is cleared.
    ///
    /// On error (no frame for the split), some of the range may be removed;
    /// every frame outside it is still in the set.
    pub fn remove_range<F: FrameSource + ?Sized>(&mut self, frames: &mut F, range: Range<u64>) -> Result<(), Error> {
        let (start, end) = check_range(&range)?;
        if start >= end {
            return Ok(());
        }
        for &size in PageSize::ALL[1..].iter().rev() {
            let bytes = size.bytes();
            let head = start - start % bytes;
            let tail = (end - 1) - (end - 1) % bytes;
            self.split_edge(frames, head, start..end, size)?;
            if tail != head {
                self.split_edge(frames, tail, start..end, size)?;
            }
            let inner = start.next_multiple_of(bytes)..end - end % bytes;
            self.clear_blocks(frames, inner, size);
        }
        self.clear_blocks(frames, start..end, PageSize::Size4KiB);
        Ok(())
    }

    /// Empties the set and gives every node page back to `frames`.
    pub fn clear_all<F: FrameSource + ?Sized>(&mut self, frames: &mut F) {
        for tree in &mut self.trees {
            tree.clear_all(frames);
        }
    }

    /// Records `range` (aligned to `size`) in blocks of `size`, skipping
    /// what larger blocks cover and clearing smaller-order bits under the
    /// new blocks. Works one leaf of the `size` tree at a time and clears the
    /// smaller bits only after the leaf is set, so no frame is ever dropped.
    fn insert_blocks<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        range: Range<u64>,
        size: PageSize,
    ) -> Result<(), Error> {
        let mut pos = range.start;
        while pos < range.end {
            if let Some(covered_to) = self.covered_above(pos, size) {
                pos = covered_to;
                continue;
            }
            let next_cover = self.next_cover_above(pos, size).unwrap_or(range.end);
            let leaf_end = pos - pos % size.leaf_span() + size.leaf_span();
            let stop = range.end.min(next_cover).min(leaf_end);
            self.set_blocks(frames, pos..stop, size)?;
            for &smaller in &PageSize::ALL[..size.index()] {
                self.clear_blocks(frames, pos..stop, smaller);
            }
            pos = stop;
        }
        Ok(())
    }

    /// If a set block larger than `size` covers `pa`, where that block ends.
    fn covered_above(&self, pa: u64, size: PageSize) -> Option<u64> {
        PageSize::ALL[size.index() + 1..].iter().find_map(|&larger| {
            let block = pa - pa % larger.bytes();
            let tree = &self.trees[larger.index()];
            tree.contains_key(block >> tree.geometry().block_shift()).then_some(block + larger.bytes())
        })
    }

    /// Start of the first set block larger than `size` at or after `pa`.
    fn next_cover_above(&self, pa: u64, size: PageSize) -> Option<u64> {
        PageSize::ALL[size.index() + 1..]
            .iter()
            .filter_map(|&larger| {
                let tree = &self.trees[larger.index()];
                let g = tree.geometry();
                let from = pa.div_ceil(larger.bytes());
                tree.next_set_key(from).map(|key| g.pa_of(key))
            })
            .min()
    }

    /// If the block of `size` at `block` is set and sticks out of `removed`,
    /// re-records its part outside `removed` at smaller orders, then clears
    /// it. If re-recording fails, the smaller-order bits it added are
    /// cleared again, so the block stays exactly as it was.
    fn split_edge<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        block: u64,
        removed: Range<u64>,
        size: PageSize,
    ) -> Result<(), Error> {
        let block_end = block + size.bytes();
        let tree = &self.trees[size.index()];
        let inside = removed.start <= block && block_end <= removed.end;
        if inside || !tree.contains_key(block >> tree.geometry().block_shift()) {
            return Ok(());
        }
        let kept = [block..removed.start.clamp(block, block_end), removed.end.clamp(block, block_end)..block_end];
        for part in kept {
            for (piece, smaller) in Pieces::new(part, size.index()) {
                if let Err(err) = self.set_blocks(frames, piece, smaller) {
                    for &undo in &PageSize::ALL[..size.index()] {
                        self.clear_blocks(frames, block..block_end, undo);
                    }
                    return Err(err);
                }
            }
        }
        self.clear_blocks(frames, block..block_end, size);
        Ok(())
    }

    /// Sets the bits of `range` (aligned to `size`) in the `size` tree.
    fn set_blocks<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        range: Range<u64>,
        size: PageSize,
    ) -> Result<(), Error> {
        let tree = &mut self.trees[size.index()];
        let shift = tree.geometry().block_shift();
        tree.set_keys(frames, range.start >> shift, range.end >> shift).map(drop)
    }

    /// Clears the bits of `range` (aligned to `size`) in the `size` tree.
    fn clear_blocks<F: FrameSource + ?Sized>(&mut self, frames: &mut F, range: Range<u64>, size: PageSize) {
        let tree = &mut self.trees[size.index()];
        let shift = tree.geometry().block_shift();
        tree.clear_keys(frames, range.start >> shift, range.end >> shift);
    }

    /// Fails with the address of a frame covered at two orders, if any.
    fn check_disjoint(&self) -> Result<(), AdoptError> {
        for larger in &PageSize::ALL[1..] {
            for run in self.trees[larger.index()].runs() {
                for smaller in &self.trees[..larger.index()] {
                    let g = smaller.geometry();
                    // Runs are never empty; no need to look past this one.
                    let limit = ((run.end - 1) >> g.block_shift()) + 1;
                    let clash = smaller
                        .next_set_key_before(run.start >> g.block_shift(), limit)
                        .map(|key| g.pa_of(key))
                        .filter(|&pa| pa < run.end);
                    if let Some(pa) = clash {
                        return Err(AdoptError::OverlappingOrders { pa });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Checks that `range` has 4 KiB-aligned ends inside the 52-bit space;
/// returns its ends with an inverted range made empty.
fn check_range(range: &Range<u64>) -> Result<(u64, u64), Error> {
    for &pa in &[range.start, range.end] {
        if pa > PHYS_ADDR_LIMIT {
            return Err(Error::OutOfRange { pa });
        }
        check_aligned(pa, PageSize::Size4KiB)?;
    }
    Ok((range.start, range.end.max(range.start)))
}

fn check_aligned(pa: u64, size: PageSize) -> Result<(), Error> {
    if pa.is_multiple_of(size.bytes()) {
        Ok(())
    } else {
        Err(Error::Misaligned { pa })
    }
}

/// Splits a 4 KiB-aligned range into maximal pieces of equal-size blocks,
/// using the largest aligned size among the first `sizes` of
/// [`PageSize::ALL`] at every point.
struct Pieces {
    pos: u64,
    end: u64,
    sizes: usize,
}

impl Pieces {
    fn new(range: Range<u64>, sizes: usize) -> Self {
        Self { pos: range.start, end: range.end, sizes }
    }
}

impl Iterator for Pieces {
    type Item = (Range<u64>, PageSize);

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let allowed = &PageSize::ALL[..self.sizes];
        let fits = |s: &PageSize| self.pos.is_multiple_of(s.bytes()) && self.pos + s.bytes() <= self.end;
        let chosen = allowed.iter().rposition(fits).unwrap_or(0);
        let size = allowed[chosen];
        let mut stop = self.end - self.end % size.bytes();
        if let Some(larger) = allowed.get(chosen + 1) {
            stop = stop.min(self.pos - self.pos % larger.bytes() + larger.bytes());
        }
        let piece = self.pos..stop;
        self.pos = stop;
        Some((piece, size))
    }
}
