//! Validation of trees written by a previous image.
//!
//! Every node address read from memory is untrusted. A node is accepted only
//! if it is page-aligned, lies entirely inside one of the RAM ranges the
//! caller vouches for, sits at the depth the order fixes, has not been seen
//! before (in this tree or another tree adopted with the same validator),
//! and is not empty. The walk visits each node once and never deeper than
//! the order's level count, so it terminates on any memory content.

use core::ops::Range;

use crate::geometry::Geometry;
use crate::node::Node;
use crate::{AdoptError, FrameSource, PhysToVirt, SparseBitmap, ENTRIES_PER_NODE, PAGE_SIZE, PHYS_ADDR_LIMIT};

/// What a validated tree holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Bits set.
    pub(crate) count: u64,
    /// Node pages.
    pub(crate) nodes: u64,
}

/// Walks untrusted trees, remembering every node seen in an order-0 bitmap
/// of its own whose pages come from the caller's frame source.
#[derive(Debug)]
pub(crate) struct Validator<'a, M> {
    mapper: &'a M,
    ram: &'a [Range<u64>],
    seen: SparseBitmap<&'a M>,
}

impl<'a, M: PhysToVirt> Validator<'a, M> {
    pub(crate) fn new(mapper: &'a M, ram: &'a [Range<u64>]) -> Self {
        Self { mapper, ram, seen: SparseBitmap::empty(mapper, Geometry::of(0)) }
    }

    /// Validates the tree at `root` (0 = empty).
    pub(crate) fn check_tree<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        geometry: Geometry,
        root: u64,
    ) -> Result<Shape, AdoptError> {
        let mut shape = Shape::default();
        if root != 0 {
            self.check_node(frames, geometry, root, 0, &mut shape)?;
        }
        Ok(shape)
    }

    /// Gives back the pages used to remember visited nodes.
    pub(crate) fn finish<F: FrameSource + ?Sized>(mut self, frames: &mut F) {
        self.seen.clear_all(frames);
    }

    fn check_node<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        geometry: Geometry,
        pa: u64,
        level: u32,
        shape: &mut Shape,
    ) -> Result<(), AdoptError> {
        self.check_address(pa)?;
        if !self.seen.set(frames, pa).map_err(AdoptError::Tracking)? {
            return Err(AdoptError::NodeReachedTwice { pa });
        }
        shape.nodes += 1;
        // SAFETY: `check_address` proved `pa` page-aligned and inside one of
        // the RAM ranges given to `adopt`, whose safety contract makes the
        // mapper translate those pages and keeps writers away from them.
        let node = unsafe { Node::at(self.mapper, pa) };
        if level == geometry.levels() {
            let bits = node.popcount();
            if bits == 0 {
                return Err(AdoptError::EmptyNode { pa });
            }
            shape.count += bits;
            return Ok(());
        }
        let fanout = geometry.fanout(level);
        let mut children = 0_usize;
        let mut from = 0;
        while let Some((index, child)) = node.next_word_other_than(from, ENTRIES_PER_NODE, 0) {
            from = index + 1;
            if index >= fanout {
                return Err(AdoptError::EntryBeyondKeySpace { node: pa, index });
            }
            children += 1;
            self.check_node(frames, geometry, child, level + 1, shape)?;
        }
        if children == 0 {
            return Err(AdoptError::EmptyNode { pa });
        }
        Ok(())
    }

    fn check_address(&self, pa: u64) -> Result<(), AdoptError> {
        if !pa.is_multiple_of(PAGE_SIZE) {
            return Err(AdoptError::MisalignedNode { pa });
        }
        let inside = pa < PHYS_ADDR_LIMIT && self.ram.iter().any(|r| r.start <= pa && pa + PAGE_SIZE <= r.end);
        if !inside {
            return Err(AdoptError::NodeOutsideRam { pa });
        }
        Ok(())
    }
}
