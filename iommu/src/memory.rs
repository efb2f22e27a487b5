//! How the driver gets and reaches memory: a caller's frame source for the
//! stream table and queues, and a caller's phys-to-virt translation for
//! every access (the same split as the hypervisor's stage-2 engine).

use crate::error::Error;

/// Size of a page, the unit of every allocation.
pub const PAGE_SIZE: u64 = 1 << 12;
/// Bytes in the 64-bit words every SMMU structure is made of.
pub(crate) const WORD_BYTES: u64 = 8;

/// Hands out and takes back runs of physically contiguous 4 KiB pages.
///
/// # Safety
///
/// A run returned by [`alloc_pages`](Self::alloc_pages) must be `count`
/// contiguous pages whose first page is aligned to `align`, reachable
/// through the [`PhysToVirt`] used with the same [`Smmu`](crate::Smmu), and
/// owned by nobody else until it is given back with
/// [`free_pages`](Self::free_pages): the driver and the SMMU overwrite it.
pub unsafe trait FrameSource {
    /// Takes `count` (at least 1) contiguous pages, the first aligned to
    /// `align` bytes (a power of two, at least [`PAGE_SIZE`]), and returns
    /// the physical address of the first, or `None` when no such run is
    /// left. The content need not be zeroed: the driver writes every entry
    /// the SMMU may read.
    fn alloc_pages(&mut self, count: usize, align: u64) -> Option<u64>;

    /// Gives back a run obtained from [`alloc_pages`](Self::alloc_pages).
    fn free_pages(&mut self, pa: u64, count: usize);
}

/// Translates a physical page address into a pointer the driver reads and
/// writes through.
///
/// # Safety
///
/// For every 4 KiB aligned `pa` the driver passes in — a page of a run
/// handed out by the [`FrameSource`] used with the same
/// [`Smmu`](crate::Smmu) and not yet given back, or a page inside the RAM
/// ranges given to [`Smmu::adopt`](crate::Smmu::adopt) — `phys_to_virt`
/// must return a pointer aligned to 8 bytes and valid for volatile reads and
/// writes of 4096 bytes for as long as the `Smmu` is in use. Apart from the
/// SMMU itself, nothing else may write that page meanwhile.
pub unsafe trait PhysToVirt {
    /// Pointer to the first of the 512 words of the page at `pa`.
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
    fn alloc_pages(&mut self, count: usize, align: u64) -> Option<u64> {
        (**self).alloc_pages(count, align)
    }

    fn free_pages(&mut self, pa: u64, count: usize) {
        (**self).free_pages(pa, count);
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
    /// `offset` must be a multiple of 4096, and every page the driver may
    /// touch (see [`PhysToVirt`]) must be mapped read/write at `pa + offset`
    /// for as long as the driver is in use, with nothing but the SMMU
    /// writing it meanwhile.
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

/// A run of physically contiguous pages the driver owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRun {
    /// Physical address of the first page.
    pub base: u64,
    /// Number of pages.
    pub count: usize,
}

impl PageRun {
    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.count as u64 * PAGE_SIZE
    }

    /// First address past the run.
    pub fn end(&self) -> u64 {
        self.base + self.bytes()
    }

    /// Whether the runs share a page.
    pub fn overlaps(&self, other: &PageRun) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// Pages needed for `bytes` (at least one).
pub(crate) fn pages_for(bytes: u64) -> usize {
    bytes.div_ceil(PAGE_SIZE).max(1) as usize
}

/// Alignment the SMMU needs for a structure of `bytes`: its size rounded up
/// to a power of two, and at least a page (§6.3, SMMU_STRTAB_BASE and the queue bases, align tables and
/// queues to their size).
pub(crate) fn alignment_for(bytes: u64) -> u64 {
    bytes.next_power_of_two().max(PAGE_SIZE)
}

/// Takes a run for a structure of `bytes` that the SMMU must reach below
/// `limit`, giving it back if the source hands out something unusable.
pub(crate) fn alloc_run<F: FrameSource + ?Sized>(frames: &mut F, bytes: u64, limit: u64) -> Result<PageRun, Error> {
    let count = pages_for(bytes);
    let align = alignment_for(bytes);
    let base = frames.alloc_pages(count, align).ok_or(Error::OutOfMemory { pages: count })?;
    let run = PageRun { base, count };
    let fits = base.checked_add(run.bytes()).is_some_and(|end| end <= limit);
    if !base.is_multiple_of(align) || !fits {
        frames.free_pages(base, count);
        return Err(Error::UnusableFrames { pa: base });
    }
    Ok(run)
}

/// Reads the 64-bit word at `pa`, inside a page the driver owns.
pub(crate) fn read_word<P: PhysToVirt + ?Sized>(phys: &P, pa: u64) -> u64 {
    debug_assert!(pa.is_multiple_of(WORD_BYTES));
    let page = phys.phys_to_virt(pa & !(PAGE_SIZE - 1));
    let index = ((pa % PAGE_SIZE) / WORD_BYTES) as usize;
    // SAFETY: `pa` lies in a page the driver allocated from the frame
    // source or validated inside RAM at adopt, so `PhysToVirt` promises 4096
    // aligned, readable bytes at `page`; `index` < 512 stays inside them.
    unsafe { page.add(index).read_volatile() }
}

/// Writes the 64-bit word at `pa` with one store, so the SMMU observes the
/// old or the new value and never a mix.
pub(crate) fn write_word<P: PhysToVirt + ?Sized>(phys: &P, pa: u64, value: u64) {
    debug_assert!(pa.is_multiple_of(WORD_BYTES));
    let page = phys.phys_to_virt(pa & !(PAGE_SIZE - 1));
    let index = ((pa % PAGE_SIZE) / WORD_BYTES) as usize;
    // SAFETY: as in `read_word`, and the page is writable.
    unsafe { page.add(index).write_volatile(value) }
}
