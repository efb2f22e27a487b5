//! The physical frame allocator: a buddy allocator over RAM minus
//! everything reserved (the image, firmware, boot blobs).
//!
//! Blocks are naturally aligned powers of two, so a guest's RAM block is
//! aligned to its size and its stage-2 mapping can use large blocks.

use alloc::vec::Vec;

use loader::PhysRange;

use crate::stage2::FrameSource;

pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

/// `ram` minus `reserved`, page-aligned inwards, sorted.
pub fn subtract(ram: &[PhysRange], reserved: &[PhysRange]) -> Vec<PhysRange> {
    let mut holes: Vec<(u64, u64)> = reserved
        .iter()
        .filter_map(|r| Some((r.base & !(PAGE_SIZE - 1), r.end()?.checked_next_multiple_of(PAGE_SIZE)?)))
        .collect();
    holes.sort_unstable();
    let mut out = Vec::new();
    for r in ram {
        let Some(end) = r.end() else { continue };
        let mut start = r.base.next_multiple_of(PAGE_SIZE);
        let end = end & !(PAGE_SIZE - 1);
        for &(h_start, h_end) in &holes {
            if h_end <= start || h_start >= end {
                continue;
            }
            if h_start > start {
                out.push(PhysRange::new(start, h_start - start));
            }
            start = start.max(h_end);
        }
        if start < end {
            out.push(PhysRange::new(start, end - start));
        }
    }
    out
}

/// Frames handed out by a buddy allocator.
pub struct FrameAllocator {
    inner: buddy_system_allocator::FrameAllocator<32>,
    free_bytes: u64,
}

impl FrameAllocator {
    pub fn new(free: &[PhysRange]) -> Self {
        let mut inner = buddy_system_allocator::FrameAllocator::<32>::new();
        let mut free_bytes = 0;
        for r in free {
            inner.add_frame((r.base >> PAGE_SHIFT) as usize, ((r.base + r.size) >> PAGE_SHIFT) as usize);
            free_bytes += r.size;
        }
        Self { inner, free_bytes }
    }

    /// A block of at least `bytes`, aligned to its (power-of-two) size.
    pub fn alloc_block(&mut self, bytes: u64) -> Option<PhysRange> {
        let pages = bytes.div_ceil(PAGE_SIZE).next_power_of_two();
        let frame = self.inner.alloc(usize::try_from(pages).ok()?)?;
        self.free_bytes -= pages * PAGE_SIZE;
        Some(PhysRange::new((frame as u64) << PAGE_SHIFT, pages * PAGE_SIZE))
    }

    pub fn free_block(&mut self, block: PhysRange) {
        let pages = block.size >> PAGE_SHIFT;
        self.inner.dealloc((block.base >> PAGE_SHIFT) as usize, pages as usize);
        self.free_bytes += block.size;
    }

    /// Hands RAM that is no longer needed (e.g. a consumed handover) to
    /// the allocator.
    pub fn add_free(&mut self, range: PhysRange) {
        let start = range.base.next_multiple_of(PAGE_SIZE);
        let end = range.base.saturating_add(range.size) & !(PAGE_SIZE - 1);
        if start < end {
            self.inner.add_frame((start >> PAGE_SHIFT) as usize, (end >> PAGE_SHIFT) as usize);
            self.free_bytes += end - start;
        }
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }
}

impl core::fmt::Debug for FrameAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameAllocator").field("free_bytes", &self.free_bytes).finish_non_exhaustive()
    }
}

// SAFETY: every frame comes from RAM the caller declared free when building
// the allocator, is page-aligned, and is handed out to one owner at a time.
unsafe impl FrameSource for FrameAllocator {
    fn alloc_frame(&mut self) -> Option<u64> {
        self.alloc_block(PAGE_SIZE).map(|b| b.base)
    }

    fn free_frame(&mut self, pa: u64) {
        self.free_block(PhysRange::new(pa, PAGE_SIZE));
    }
}

// SAFETY: runs come from RAM the caller declared free, as blocks of a
// power of two of at least `count` pages, naturally aligned (so to `align`
// when it is no larger), one owner at a time.
unsafe impl iommu::FrameSource for FrameAllocator {
    fn alloc_pages(&mut self, count: usize, align: u64) -> Option<u64> {
        let bytes = (count as u64).checked_mul(PAGE_SIZE)?.max(align);
        self.alloc_block(bytes).map(|b| b.base)
    }

    fn free_pages(&mut self, pa: u64, count: usize) {
        // The block `alloc_pages` took: a power of two of at least `count`
        // pages (the driver asks for no stricter alignment than that).
        self.free_block(PhysRange::new(pa, (count as u64 * PAGE_SIZE).next_power_of_two()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_splits_around_holes() {
        let ram = [PhysRange::new(0x4000_0000, 0x1000_0000)];
        let reserved = [PhysRange::new(0x4020_0000, 0x1_0001), PhysRange::new(0x4800_0000, 0x2000)];
        let free = subtract(&ram, &reserved);
        assert_eq!(
            free,
            [
                PhysRange::new(0x4000_0000, 0x20_0000),
                PhysRange::new(0x4021_1000, 0x4800_0000 - 0x4021_1000),
                PhysRange::new(0x4800_2000, 0x5000_0000 - 0x4800_2000),
            ]
        );
    }

    #[test]
    fn blocks_are_naturally_aligned() {
        let mut a = FrameAllocator::new(&[PhysRange::new(0x4000_0000, 0x1000_0000)]);
        let b = a.alloc_block(16 << 20).unwrap();
        assert_eq!(b.size, 16 << 20);
        assert_eq!(b.base % (16 << 20), 0);
        let odd = a.alloc_block(3 << 20).unwrap();
        assert_eq!(odd.size, 4 << 20);
        assert_eq!(odd.base % (4 << 20), 0);
        let before = a.free_bytes();
        a.free_block(odd);
        assert_eq!(a.free_bytes(), before + (4 << 20));
        assert!(a.alloc_block(1 << 30).is_none());
    }
}
