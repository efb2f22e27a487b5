//! The image's heap: a buddy allocator over a region in the image's bss.
//!
//! The heap belongs to the image memory class (`shared/DESIGN.md` §3): it
//! is discarded on a live update, so nothing preserved may live here.

use buddy_system_allocator::LockedHeap;

const HEAP_SIZE: usize = (4 << 20) + (TEST_PAD_MIB << 20);

/// Test builds only (`HV_TEST_BSS_PAD_MIB`): extra MiB of bss, to make an
/// image whose footprint is larger than its slot without changing its code.
const TEST_PAD_MIB: usize = match option_env!("HV_TEST_BSS_PAD_MIB") {
    Some(s) => parse_decimal(s),
    None => 0,
};

/// A decimal number at compile time (a build fails on anything else).
const fn parse_decimal(s: &str) -> usize {
    let b = s.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "HV_TEST_BSS_PAD_MIB must be a decimal number");
        n = n * 10 + (b[i] - b'0') as usize;
        i += 1;
    }
    n
}

#[repr(C, align(4096))]
struct HeapArea([u8; HEAP_SIZE]);

static mut HEAP_AREA: HeapArea = HeapArea([0; HEAP_SIZE]);

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

/// The heap area's physical extent (identity-mapped): (start, end). The
/// aarch64 entry leaves it out of the stale-line invalidation when the
/// image was prepared.
#[cfg(target_arch = "aarch64")]
pub fn area() -> (u64, u64) {
    let start = core::ptr::addr_of!(HEAP_AREA) as u64;
    (start, start + HEAP_SIZE as u64)
}

/// Whether the heap area was handed over (by `init`).
static READY: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Hands the heap area to the allocator, before anything allocates: on
/// the boot CPU at entry, or in the brownout when the previous image
/// prepares this one (then the entry finds it done and keeps what the
/// preparation allocated).
pub fn init() {
    if READY.swap(true, core::sync::atomic::Ordering::AcqRel) {
        return;
    }
    // SAFETY: the first call, before any allocation; HEAP_AREA is used only
    // through the allocator from here on, so no other reference exists.
    unsafe {
        let start = core::ptr::addr_of_mut!(HEAP_AREA) as usize;
        HEAP.lock().init(start, HEAP_SIZE);
    }
}
