//! What the bitmap needs from its environment: pages for nodes, and a way to
//! reach a physical page. The hypervisor implements both on real memory; the
//! `testing` module implements them on a host arena.

/// Supplies and takes back the 4 KiB physical pages that hold nodes.
///
/// # Safety
///
/// Every address returned by [`alloc_frame`](Self::alloc_frame) must name a
/// 4 KiB page that nothing else reads or writes until the page is passed back
/// to [`free_frame`](Self::free_frame), and the [`PhysToVirt`] used with the
/// same bitmap must translate it. The bitmap checks that the address is
/// non-zero, page-aligned and below 2^52, but cannot check ownership.
pub unsafe trait FrameSource {
    /// Takes one 4 KiB page and returns its physical address, or `None` when
    /// no page is left. The content need not be zeroed.
    fn alloc_frame(&mut self) -> Option<u64>;

    /// Gives back a page obtained from [`alloc_frame`](Self::alloc_frame).
    fn free_frame(&mut self, pa: u64);
}

/// Translates a physical page address into a pointer the bitmap can use.
///
/// # Safety
///
/// For every page-aligned `pa` the bitmap passes in — a page handed out by the
/// [`FrameSource`] used with it and not yet freed, or a page inside the RAM
/// ranges given to `adopt` — `phys_to_virt` must return a pointer that is
/// aligned to 8 bytes, valid for reads and writes of 4096 bytes for as long
/// as the bitmap is in use, and not accessed by anything else while a bitmap
/// method runs.
pub unsafe trait PhysToVirt {
    /// Pointer to the first byte of the page at `pa`.
    fn phys_to_virt(&self, pa: u64) -> *mut u8;
}

// SAFETY: forwards to `T`, which upholds the contract.
unsafe impl<T: PhysToVirt + ?Sized> PhysToVirt for &T {
    fn phys_to_virt(&self, pa: u64) -> *mut u8 {
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
