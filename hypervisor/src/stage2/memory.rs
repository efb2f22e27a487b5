//! How the engine reaches physical memory: a caller's frame source for new
//! table pages and a caller's phys-to-virt translation for every access.

use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use super::{ADDRESS_LIMIT, ENTRIES_PER_TABLE, INVALID_DESCRIPTOR, PAGE_SIZE};

/// Hands out and takes back 4 KiB physical pages for table pages.
///
/// # Safety
///
/// A page returned by [`alloc_frame`](Self::alloc_frame) must be 4 KiB
/// aligned, reachable through the [`PhysToVirt`] used with the same table,
/// and owned by nobody else until it is given back with
/// [`free_frame`](Self::free_frame): the engine overwrites it.
pub unsafe trait FrameSource {
    /// Takes one page and returns its physical address, or `None` when no
    /// page is left. The content need not be zeroed: the engine clears it.
    fn alloc_frame(&mut self) -> Option<u64>;

    /// Gives back a page obtained from [`alloc_frame`](Self::alloc_frame).
    fn free_frame(&mut self, pa: u64);
}

/// Translates a table page's physical address into a pointer the engine
/// reads and writes descriptors through.
///
/// # Safety
///
/// For every 4 KiB aligned `pa` the engine passes in — a page handed out by
/// the [`FrameSource`] used with the table and not yet freed, or a page
/// inside the RAM ranges given to [`Stage2Table::adopt`] — `phys_to_virt`
/// must return a pointer aligned to 8 bytes and valid for volatile reads and
/// writes of 4096 bytes for as long as the table is in use. Apart from the
/// hardware's table walkers, nothing else may write that page meanwhile.
///
/// [`Stage2Table::adopt`]: super::Stage2Table::adopt
pub unsafe trait PhysToVirt {
    /// Pointer to the first of the 512 descriptors in the page at `pa`.
    fn phys_to_virt(&self, pa: u64) -> *mut u64;
}

// SAFETY: forwards to `T`, which upholds the contract.
unsafe impl<T: PhysToVirt + ?Sized> PhysToVirt for &T {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        (**self).phys_to_virt(pa)
    }
}

// SAFETY: forwards to `T`, which upholds the contract.
unsafe impl<T: FrameSource + ?Sized> FrameSource for &mut T {
    fn alloc_frame(&mut self) -> Option<u64> {
        (**self).alloc_frame()
    }

    fn free_frame(&mut self, pa: u64) {
        (**self).free_frame(pa);
    }
}

/// Physical memory mapped at a constant offset in the hypervisor's address
/// space (offset 0 for an identity map).
#[derive(Clone, Copy, Debug)]
pub struct LinearMap {
    offset: u64,
}

impl LinearMap {
    /// # Safety
    ///
    /// `offset` must be a multiple of 4096, and every page the table may
    /// touch (see [`PhysToVirt`]) must be mapped read/write at `pa + offset`
    /// for as long as the table is in use, with nothing but the hardware's
    /// table walkers writing it meanwhile.
    pub const unsafe fn new(offset: u64) -> LinearMap {
        LinearMap { offset }
    }
}

// SAFETY: `LinearMap::new`'s caller promised that every such page is mapped
// at `pa + offset`, and a page-aligned `pa` plus a page-aligned offset is
// 8-byte aligned.
unsafe impl PhysToVirt for LinearMap {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        pa.wrapping_add(self.offset) as usize as *mut u64
    }
}

/// Reads descriptor `index` (< 512) of the table page at `table`.
pub(super) fn read_entry<P: PhysToVirt>(phys: &P, table: u64, index: usize) -> u64 {
    debug_assert!(index < ENTRIES_PER_TABLE);
    let base = phys.phys_to_virt(table);
    // SAFETY: `table` is a table page the engine allocated or validated
    // inside RAM, so `PhysToVirt` promises 4096 readable, aligned bytes at
    // `base`; `index` < 512 keeps the read inside them.
    unsafe { base.add(index).read_volatile() }
}

/// The first descriptor at or after `from` in the table page at `table`
/// that is not zero, with its index. A validation walk reads every
/// descriptor of every page, and most are zero: they are read eight at a
/// time and skipped when all eight are.
pub(super) fn next_nonzero<P: PhysToVirt>(phys: &P, table: u64, from: usize) -> Option<(usize, u64)> {
    let base = phys.phys_to_virt(table);
    let read = |index: usize| {
        // SAFETY: as in `read_entry`: a page of this table, 4096 readable,
        // aligned bytes, and every caller's `index` is < 512.
        unsafe { base.add(index).read_volatile() }
    };
    let mut index = from;
    // Up to a multiple of 8, one at a time; then eight at a time (a tree's
    // scan is most of an adoption's work: three mostly empty pages per
    // guest, 1536 descriptors), down to the first non-zero group.
    while index < ENTRIES_PER_TABLE && !index.is_multiple_of(8) {
        let entry = read(index);
        if entry != 0 {
            return Some((index, entry));
        }
        index += 1;
    }
    while index + 8 <= ENTRIES_PER_TABLE {
        let any = (0..8).fold(0, |acc, k| acc | read(index + k));
        if any != 0 {
            break;
        }
        index += 8;
    }
    (index..ENTRIES_PER_TABLE).map(|i| (i, read(i))).find(|&(_, entry)| entry != 0)
}

/// Writes descriptor `index` (< 512) of the table page at `table` with one
/// 64-bit store, so a concurrent hardware walk sees the old or the new value.
pub(super) fn write_entry<P: PhysToVirt>(phys: &P, table: u64, index: usize, value: u64) {
    debug_assert!(index < ENTRIES_PER_TABLE);
    let base = phys.phys_to_virt(table);
    // SAFETY: as in `read_entry`: a page of this table, 4096 writable,
    // aligned bytes, `index` < 512.
    unsafe { base.add(index).write_volatile(value) }
}

/// Makes the stores that filled a new table page visible before the store
/// that links it, so no walker sees the link and stale contents.
pub(super) fn publish() {
    fence(Ordering::Release);
}

/// Pages taken from the frame source before an edit starts, so the edit
/// either gets every table page it needs or changes nothing.
pub(super) struct FrameReserve {
    frames: Vec<u64>,
}

impl FrameReserve {
    /// Takes `count` pages, or none (returning what it took) if the source
    /// runs dry or hands out a page the formats cannot address.
    pub(super) fn fill<S: FrameSource + ?Sized>(frames: &mut S, count: usize) -> Result<FrameReserve, ReserveError> {
        let mut reserve = FrameReserve { frames: Vec::with_capacity(count) };
        while reserve.frames.len() < count {
            let outcome = match frames.alloc_frame() {
                None => Err(ReserveError::Exhausted),
                Some(pa) if !pa.is_multiple_of(PAGE_SIZE) || pa >= ADDRESS_LIMIT => {
                    frames.free_frame(pa);
                    Err(ReserveError::Unusable(pa))
                }
                Some(pa) => Ok(pa),
            };
            match outcome {
                Ok(pa) => reserve.frames.push(pa),
                Err(e) => {
                    reserve.release(frames);
                    return Err(e);
                }
            }
        }
        Ok(reserve)
    }

    /// One page, cleared to invalid descriptors.
    pub(super) fn take<P: PhysToVirt>(&mut self, phys: &P) -> Option<u64> {
        let pa = self.frames.pop()?;
        for index in 0..ENTRIES_PER_TABLE {
            write_entry(phys, pa, index, INVALID_DESCRIPTOR);
        }
        Some(pa)
    }

    /// Gives back the pages the edit did not use.
    pub(super) fn release<S: FrameSource + ?Sized>(self, frames: &mut S) {
        for pa in self.frames {
            frames.free_frame(pa);
        }
    }
}

/// Why a [`FrameReserve`] could not be filled.
pub(super) enum ReserveError {
    Exhausted,
    Unusable(u64),
}
