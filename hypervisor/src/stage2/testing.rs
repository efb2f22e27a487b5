//! A simulated physical memory for host tests: pages at any address below
//! 2^48 (high ones included), created zeroed on first touch, handed out by
//! a frame source that can be told to run dry. Contract violations by the
//! engine (touching a page outside RAM, freeing a page twice) panic here,
//! so tests catch them.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;

use super::{FrameSource, PhysToVirt, ENTRIES_PER_TABLE, PAGE_SIZE};

type Page = [u64; ENTRIES_PER_TABLE];

pub(super) struct TestMemory {
    base: u64,
    end: u64,
    /// Pages touched so far, leaked boxes reclaimed in `Drop`.
    pages: RefCell<BTreeMap<u64, NonNull<Page>>>,
    /// Next never-allocated frame.
    next: Cell<u64>,
    free: RefCell<alloc::vec::Vec<u64>>,
    allocated: RefCell<BTreeSet<u64>>,
    /// Allocations still allowed, if limited.
    budget: Cell<Option<usize>>,
}

impl TestMemory {
    /// RAM `[base, base + size)`; frames are handed out from its start.
    pub(super) fn new(base: u64, size: u64) -> TestMemory {
        assert!(base.is_multiple_of(PAGE_SIZE) && size.is_multiple_of(PAGE_SIZE));
        TestMemory {
            base,
            end: base + size,
            pages: RefCell::new(BTreeMap::new()),
            next: Cell::new(base),
            free: RefCell::new(alloc::vec::Vec::new()),
            allocated: RefCell::new(BTreeSet::new()),
            budget: Cell::new(None),
        }
    }

    /// The RAM range, for `adopt`.
    pub(super) fn ram(&self) -> [(u64, u64); 1] {
        [(self.base, self.end - self.base)]
    }

    /// Lets only `frames` more allocations succeed.
    pub(super) fn set_budget(&self, frames: Option<usize>) {
        self.budget.set(frames);
    }

    /// Frames handed out and not given back.
    pub(super) fn in_use(&self) -> usize {
        self.allocated.borrow().len()
    }

    pub(super) fn read(&self, pa: u64, index: usize) -> u64 {
        // SAFETY: `page` returns a live, exclusively owned page of this
        // memory; `index` is bounds-checked by the array indexing.
        unsafe { (*self.page(pa).as_ptr())[index] }
    }

    pub(super) fn write(&self, pa: u64, index: usize, value: u64) {
        // SAFETY: as in `read`.
        unsafe { (*self.page(pa).as_ptr())[index] = value }
    }

    fn page(&self, pa: u64) -> NonNull<Page> {
        assert!(pa.is_multiple_of(PAGE_SIZE), "engine touched misaligned page {pa:#x}");
        assert!(pa >= self.base && pa < self.end, "engine touched {pa:#x} outside RAM");
        *self.pages.borrow_mut().entry(pa).or_insert_with(|| NonNull::from(Box::leak(Box::new([0; ENTRIES_PER_TABLE]))))
    }
}

impl Drop for TestMemory {
    fn drop(&mut self) {
        for (_, page) in core::mem::take(self.pages.get_mut()) {
            // SAFETY: every page pointer came from `Box::leak` in `page` and
            // is dropped once, here; nothing uses the pages any more.
            drop(unsafe { Box::from_raw(page.as_ptr()) });
        }
    }
}

// SAFETY: frames are distinct pages of this memory, page aligned, reachable
// through the `PhysToVirt` below, and not handed out again until freed.
unsafe impl FrameSource for &TestMemory {
    fn alloc_frame(&mut self) -> Option<u64> {
        if let Some(budget) = self.budget.get() {
            self.budget.set(Some(budget.checked_sub(1)?));
        }
        let recycled = self.free.borrow_mut().pop();
        let pa = if let Some(pa) = recycled {
            pa
        } else {
            let pa = self.next.get();
            if pa >= self.end {
                return None;
            }
            self.next.set(pa + PAGE_SIZE);
            pa
        };
        assert!(self.allocated.borrow_mut().insert(pa));
        // Dirty the page so the engine's clearing is tested.
        for index in 0..ENTRIES_PER_TABLE {
            self.write(pa, index, u64::MAX);
        }
        Some(pa)
    }

    fn free_frame(&mut self, pa: u64) {
        assert!(self.allocated.borrow_mut().remove(&pa), "freed {pa:#x}, which is not allocated");
        self.free.borrow_mut().push(pa);
    }
}

// SAFETY: pages are heap boxes that live until the memory is dropped, so
// the pointer is aligned and valid for 4096 bytes; tests do not touch a page
// through `read`/`write` while an engine call runs.
unsafe impl PhysToVirt for &TestMemory {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        self.page(pa).as_ptr().cast()
    }
}
