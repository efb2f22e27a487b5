//! The preserved-memory map (`shared/DESIGN.md` §3): everything that
//! survives a live update is recorded when it is allocated, never in a pass
//! at update time, in a sparse bitmap living in the pages it tracks.

use core::fmt;
use core::ops::Range;

use sparse_bitmap::{Fit, MultiOrderBitmap, PageSize};

use crate::frames::{FrameAllocator, PAGE_SIZE};
use crate::stage2;

/// Identity phys→virt for the bitmap: the hypervisor maps RAM 1:1.
#[derive(Clone, Copy, Debug)]
pub struct IdentityPages;

// SAFETY: RAM is identity-mapped read-write at EL2/long mode for the
// hypervisor's whole life, and bitmap node pages come from the frame
// allocator (or the preserved map), which hands each page to one owner.
unsafe impl sparse_bitmap::PhysToVirt for IdentityPages {
    fn phys_to_virt(&self, pa: u64) -> *mut u8 {
        pa as *mut u8
    }
}

// SAFETY: as for `stage2::FrameSource`: each frame is free RAM handed to one
// owner at a time.
unsafe impl sparse_bitmap::FrameSource for FrameAllocator {
    fn alloc_frame(&mut self) -> Option<u64> {
        <Self as stage2::FrameSource>::alloc_frame(self)
    }

    fn free_frame(&mut self, pa: u64) {
        <Self as stage2::FrameSource>::free_frame(self, pa);
    }
}

/// Errors recording preserved memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreserveError(pub sparse_bitmap::Error);

impl fmt::Display for PreserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "preserved-memory map: {:?}", self.0)
    }
}

/// Everything that must survive an update, recorded when it is allocated
/// (never in a pass at update time): guest RAM at the largest orders, one
/// bit per stage-2 table page, guest images.
pub struct PreservedMap<M: sparse_bitmap::PhysToVirt + Clone> {
    pub bitmap: MultiOrderBitmap<M>,
}

impl<M: sparse_bitmap::PhysToVirt + Clone> fmt::Debug for PreservedMap<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreservedMap").field("frames", &self.bitmap.frame_count()).finish_non_exhaustive()
    }
}

impl<M: sparse_bitmap::PhysToVirt + Clone> PreservedMap<M> {
    pub fn new(mapper: M) -> Self {
        Self { bitmap: MultiOrderBitmap::new(mapper) }
    }

    /// Records `range` (page-rounded outwards) at the largest orders.
    pub fn preserve<F: sparse_bitmap::FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        range: Range<u64>,
    ) -> Result<(), PreserveError> {
        let start = range.start & !(PAGE_SIZE - 1);
        let end = range.end.next_multiple_of(PAGE_SIZE);
        self.bitmap.insert_range(frames, start..end, Fit::Largest).map_err(PreserveError)
    }

    pub fn preserve_page<F: sparse_bitmap::FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        pa: u64,
    ) -> Result<(), PreserveError> {
        self.bitmap.insert(frames, pa, PageSize::Size4KiB).map_err(PreserveError)
    }

    pub fn release_page<F: sparse_bitmap::FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        pa: u64,
    ) -> Result<(), PreserveError> {
        self.bitmap.remove(frames, pa, PageSize::Size4KiB).map_err(PreserveError)
    }
}

/// A frame source for second-stage tables that records every page it hands
/// out in the preserved map, so the tables survive an update.
pub struct PreservingFrames<'a, M: sparse_bitmap::PhysToVirt + Clone> {
    pub frames: &'a mut FrameAllocator,
    pub map: &'a mut PreservedMap<M>,
}

impl<M: sparse_bitmap::PhysToVirt + Clone> fmt::Debug for PreservingFrames<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreservingFrames").finish_non_exhaustive()
    }
}

// SAFETY: forwards to the frame allocator (which upholds the contract) and
// only adds bookkeeping.
unsafe impl<M: sparse_bitmap::PhysToVirt + Clone> stage2::FrameSource for PreservingFrames<'_, M> {
    fn alloc_frame(&mut self) -> Option<u64> {
        let pa = <FrameAllocator as stage2::FrameSource>::alloc_frame(self.frames)?;
        if self.map.preserve_page(self.frames, pa).is_err() {
            <FrameAllocator as stage2::FrameSource>::free_frame(self.frames, pa);
            return None;
        }
        Some(pa)
    }

    fn free_frame(&mut self, pa: u64) {
        let _ = self.map.release_page(self.frames, pa);
        <FrameAllocator as stage2::FrameSource>::free_frame(self.frames, pa);
    }
}

// SAFETY: runs of pages come from the frame allocator (one owner each), are
// recorded as preserved, and are naturally aligned to at least `align`.
unsafe impl<M: sparse_bitmap::PhysToVirt + Clone> iommu::FrameSource for PreservingFrames<'_, M> {
    fn alloc_pages(&mut self, count: usize, align: u64) -> Option<u64> {
        let bytes = (count as u64).checked_mul(PAGE_SIZE)?.max(align);
        let block = self.frames.alloc_block(bytes)?;
        if self.map.preserve(self.frames, block.base..block.base + block.size).is_err() {
            self.frames.free_block(block);
            return None;
        }
        Some(block.base)
    }

    fn free_pages(&mut self, pa: u64, count: usize) {
        // Blocks are powers of two of at least `count` pages; `alloc_pages`
        // was asked for no stricter alignment than that by the driver.
        let size = (count as u64 * PAGE_SIZE).next_power_of_two();
        let _ = self.map.bitmap.remove_range(self.frames, pa..pa + size);
        self.frames.free_block(loader::PhysRange::new(pa, size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loader::PhysRange;

    #[test]
    fn stage2_pages_are_preserved_as_they_are_allocated() {
        let arena = sparse_bitmap::testing::Arena::new(0x4000_0000, (64 << 20) / 4096);
        let mapper = &arena;
        let mut frames = FrameAllocator::new(&[PhysRange::new(0x4000_0000, 64 << 20)]);
        let mut map = PreservedMap::new(mapper);
        let guest = frames.alloc_block(16 << 20).unwrap();
        map.preserve(&mut frames, guest.base..guest.base + guest.size).unwrap();
        let before = map.bitmap.frame_count();
        let mut pf = PreservingFrames { frames: &mut frames, map: &mut map };
        let a = stage2::FrameSource::alloc_frame(&mut pf).unwrap();
        let b = stage2::FrameSource::alloc_frame(&mut pf).unwrap();
        assert!(map.bitmap.contains(a) && map.bitmap.contains(b));
        assert_eq!(map.bitmap.frame_count(), before + 2);
        // 16 MiB of guest RAM costs 8 bits at 2 MiB order, not 4096.
        assert_eq!(map.bitmap.tree(PageSize::Size2MiB).count(), 8);
        let mut pf = PreservingFrames { frames: &mut frames, map: &mut map };
        stage2::FrameSource::free_frame(&mut pf, a);
        assert!(!map.bitmap.contains(a));
    }
}
