//! The image's heap: a buddy allocator over a region in the image's bss.
//!
//! The heap belongs to the image memory class (`shared/DESIGN.md` §3): it
//! is discarded on a live update, so nothing preserved may live here.

use buddy_system_allocator::LockedHeap;

const HEAP_SIZE: usize = 4 << 20;

#[repr(C, align(4096))]
struct HeapArea([u8; HEAP_SIZE]);

static mut HEAP_AREA: HeapArea = HeapArea([0; HEAP_SIZE]);

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

/// Hands the heap area to the allocator. Call once, on the boot CPU,
/// before anything allocates.
pub fn init() {
    // SAFETY: called once before any allocation; HEAP_AREA is used only
    // through the allocator from here on, so no other reference exists.
    unsafe {
        let start = core::ptr::addr_of_mut!(HEAP_AREA) as usize;
        HEAP.lock().init(start, HEAP_SIZE);
    }
}
