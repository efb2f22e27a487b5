//! Host-side simulated physical memory for tests, benches and fuzzing
//! (feature `arena`).
//!
//! An [`Arena`] is a run of 4 KiB pages placed at an arbitrary physical base
//! address, high ones included. `&Arena` is both the [`FrameSource`] and the
//! [`PhysToVirt`] of the bitmaps built on it.

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::cell::{RefCell, UnsafeCell};
use core::fmt;
use core::ops::Range;

use crate::{
    AdoptError, Error, FrameSource, MultiOrderBitmap, PageSize, PhysToVirt, SparseBitmap, ENTRIES_PER_NODE, PAGE_SIZE,
    PHYS_ADDR_LIMIT,
};

/// One simulated page, aligned like a real one.
#[repr(C, align(4096))]
struct Page(UnsafeCell<[u64; ENTRIES_PER_NODE]>);

/// Allocation state of an [`Arena`].
#[derive(Clone, Debug)]
struct Frames {
    /// Pages given back, reused first (last freed, first reused).
    free: Vec<u64>,
    /// Index of the first page never handed out.
    untouched: usize,
    /// Pages handed out and not given back.
    live: BTreeSet<u64>,
    /// At most this many pages may be live at once.
    limit: usize,
}

/// Simulated physical memory: `pages` pages starting at `base`.
///
/// Freed pages are filled with a poison pattern so that a use after free
/// shows up as corruption. Giving back a page that is not live panics: that
/// is a bug in the code under test.
pub struct Arena {
    base: u64,
    pages: Box<[Page]>,
    frames: RefCell<Frames>,
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("base", &self.base)
            .field("pages", &self.pages.len())
            .field("frames", &self.frames.borrow())
            .finish()
    }
}

/// Word written all over a freed page.
pub const POISON: u64 = 0xdead_beef_dead_beef;

impl Arena {
    /// An arena of `pages` zeroed pages at physical address `base`.
    ///
    /// # Panics
    ///
    /// If `base` is not page-aligned or the arena would reach past 2^52.
    pub fn new(base: u64, pages: usize) -> Self {
        assert!(base.is_multiple_of(PAGE_SIZE), "arena base must be page-aligned");
        assert!(base + pages as u64 * PAGE_SIZE <= PHYS_ADDR_LIMIT);
        Self {
            base,
            pages: (0..pages).map(|_| Page(UnsafeCell::new([0; ENTRIES_PER_NODE]))).collect(),
            frames: RefCell::new(Frames { free: Vec::new(), untouched: 0, live: BTreeSet::new(), limit: pages }),
        }
    }

    /// Every page zeroed and none handed out, as [`Arena::new`] leaves it.
    pub fn reset(&self) {
        for page in &self.pages {
            // SAFETY: as in `read_word`: no reference into page memory is
            // held while the page is written.
            unsafe { (*page.0.get()).fill(0) };
        }
        *self.frames.borrow_mut() =
            Frames { free: Vec::new(), untouched: 0, live: BTreeSet::new(), limit: self.pages.len() };
    }

    /// The physical addresses the arena simulates.
    pub fn ram(&self) -> Range<u64> {
        self.base..self.base + self.pages.len() as u64 * PAGE_SIZE
    }

    /// Number of pages handed out and not given back.
    pub fn live_frames(&self) -> usize {
        self.frames.borrow().live.len()
    }

    /// Addresses of the pages handed out and not given back.
    pub fn live_set(&self) -> BTreeSet<u64> {
        self.frames.borrow().live.clone()
    }

    /// Makes allocation fail once `limit` pages are live.
    pub fn set_frame_limit(&self, limit: usize) {
        self.frames.borrow_mut().limit = limit;
    }

    /// Reads word `index` of the page at `pa`.
    pub fn read_word(&self, pa: u64, index: usize) -> u64 {
        assert!(index < ENTRIES_PER_NODE);
        // SAFETY: `page_ptr` points at a whole page of this arena, `index`
        // is inside it, and no reference into page memory is ever held, so
        // this read cannot overlap a write.
        unsafe { self.page_ptr(pa).add(index).read() }
    }

    /// Writes word `index` of the page at `pa`, as a corrupting writer would.
    pub fn write_word(&self, pa: u64, index: usize, value: u64) {
        assert!(index < ENTRIES_PER_NODE);
        // SAFETY: as in `read_word`; `UnsafeCell` allows writing through a
        // shared reference.
        unsafe { self.page_ptr(pa).add(index).write(value) }
    }

    /// Every word of the pages in `range`, in address order.
    pub fn words(&self, range: &Range<u64>) -> Vec<u64> {
        let mut words = Vec::with_capacity(((range.end - range.start) / PAGE_SIZE) as usize * ENTRIES_PER_NODE);
        for pa in range.clone().step_by(PAGE_SIZE as usize) {
            // SAFETY: as in `read_word`: a whole page of this arena, copied
            // while no reference into page memory is held.
            words.extend_from_slice(unsafe { &*self.page_ptr(pa).cast::<[u64; ENTRIES_PER_NODE]>() });
        }
        words
    }

    /// A copy of the memory and the allocation state at the same physical
    /// addresses: what the next image finds after a handover.
    #[must_use]
    pub fn handover(&self) -> Self {
        let copy = Self::new(self.base, self.pages.len());
        for i in 0..self.pages.len() {
            let pa = self.base + i as u64 * PAGE_SIZE;
            for word in 0..ENTRIES_PER_NODE {
                copy.write_word(pa, word, self.read_word(pa, word));
            }
        }
        *copy.frames.borrow_mut() = self.frames.borrow().clone();
        copy
    }

    /// [`SparseBitmap::adopt`] on this arena's memory, with the arena as
    /// frame source.
    pub fn adopt_tree(&self, order: u32, root: u64, ram: &[Range<u64>]) -> Result<SparseBitmap<&Self>, AdoptError> {
        // SAFETY: `PhysToVirt for Arena` translates every page of the arena
        // and panics for any other address, and arena memory is only reached
        // through raw pointers one word at a time on one thread (`Arena` is
        // not `Sync`), so no range or sharing can make these accesses unsound.
        unsafe { SparseBitmap::adopt(self, &mut &*self, order, root, ram) }
    }

    /// [`MultiOrderBitmap::adopt`] on this arena's memory, with the arena as
    /// frame source.
    pub fn adopt_map(&self, roots: [u64; 3], ram: &[Range<u64>]) -> Result<MultiOrderBitmap<&Self>, AdoptError> {
        // SAFETY: as in `adopt_tree`.
        unsafe { MultiOrderBitmap::adopt(self, &mut &*self, roots, ram) }
    }

    fn page_ptr(&self, pa: u64) -> *mut u64 {
        assert!(pa.is_multiple_of(PAGE_SIZE) && self.ram().contains(&pa), "page {pa:#x} is not in the arena");
        let index = ((pa - self.base) / PAGE_SIZE) as usize;
        self.pages[index].0.get().cast::<u64>()
    }
}

// SAFETY: every page of the arena is 4096-byte aligned memory owned by the
// arena for its whole life, written only through raw pointers (never through
// references that could alias), and `Arena` is not `Sync`, so no other thread
// touches it. Addresses outside the arena panic instead of returning a
// pointer.
unsafe impl PhysToVirt for Arena {
    fn phys_to_virt(&self, pa: u64) -> *mut u8 {
        self.page_ptr(pa).cast::<u8>()
    }
}

// SAFETY: a page is handed out only while it is not live (never handed out,
// or given back since), so no two users hold it at once; every page is
// inside the arena, which `PhysToVirt for Arena` translates.
unsafe impl FrameSource for &Arena {
    fn alloc_frame(&mut self) -> Option<u64> {
        let mut frames = self.frames.borrow_mut();
        if frames.live.len() >= frames.limit {
            return None;
        }
        let pa = match frames.free.pop() {
            Some(pa) => pa,
            None if frames.untouched < self.pages.len() => {
                let pa = self.base + frames.untouched as u64 * PAGE_SIZE;
                frames.untouched += 1;
                pa
            }
            None => return None,
        };
        frames.live.insert(pa);
        Some(pa)
    }

    fn free_frame(&mut self, pa: u64) {
        let mut frames = self.frames.borrow_mut();
        assert!(frames.live.remove(&pa), "freeing page {pa:#x}, which is not live");
        frames.free.push(pa);
        drop(frames);
        for word in 0..ENTRIES_PER_NODE {
            self.write_word(pa, word, POISON);
        }
    }
}

/// Physical base of the memory [`adopt_arbitrary`] simulates (above 256 GiB).
pub const FUZZ_BASE: u64 = 0x40_0000_0000;
/// Pages of that memory the previous image's "nodes" may occupy.
pub const FUZZ_RAM_PAGES: usize = 8;
/// Pages addressable by the words [`adopt_arbitrary`] decodes: the RAM
/// pages, then pages just outside RAM.
const FUZZ_TARGET_PAGES: u64 = 16;

/// What [`adopt_arbitrary`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzOutcome {
    /// The pages formed valid trees holding this many frames in this many
    /// nodes, and the adopted map behaved.
    Adopted { frames: u64, nodes: u64 },
    /// Adopt rejected the pages.
    Rejected(AdoptError),
}

/// Feeds arbitrary bytes to [`MultiOrderBitmap::adopt`] as a previous
/// image's memory, and checks that a successful adopt yields a map that
/// behaves. Shared by the fuzz target and the property tests.
///
/// The first three bytes choose the roots; the rest fill
/// [`FUZZ_RAM_PAGES`] pages at [`FUZZ_BASE`]. Each 8-byte word is decoded by
/// its top two bits so that random input can form trees: `00` is
/// zero, `01` a page address in or just beyond RAM, `10` the raw word, `11`
/// such an address with low bits left in (misaligned).
///
/// # Panics
///
/// When adopt accepts the pages but the map breaks an invariant (node pages
/// outside RAM or shared, counts that disagree with the runs, frames lost by
/// an update, pages leaked): the bugs the fuzz target looks for.
pub fn adopt_arbitrary(data: &[u8]) -> FuzzOutcome {
    adopt_arbitrary_in(&fuzz_arena(), data)
}

/// An arena for [`adopt_arbitrary_in`]: the RAM pages first, then spare
/// pages for the adopting image's allocations.
pub fn fuzz_arena() -> Arena {
    Arena::new(FUZZ_BASE, FUZZ_RAM_PAGES + 56)
}

/// [`adopt_arbitrary`] in `arena` (from [`fuzz_arena`]), which is reset
/// first: a fuzzer keeps one arena instead of allocating one per input.
pub fn adopt_arbitrary_in(arena: &Arena, data: &[u8]) -> FuzzOutcome {
    assert!(arena.base == FUZZ_BASE && arena.pages.len() == FUZZ_RAM_PAGES + 56, "not a fuzz_arena");
    arena.reset();
    let ram = FUZZ_BASE..FUZZ_BASE + FUZZ_RAM_PAGES as u64 * PAGE_SIZE;
    let mut frames = arena;
    for _ in 0..FUZZ_RAM_PAGES {
        frames.alloc_frame();
    }
    let (head, body) = data.split_at(data.len().min(3));
    let roots: [u64; 3] = core::array::from_fn(|i| head.get(i).map_or(0, |&b| fuzz_root(b)));
    // Words past the input stay as the arena starts them: zero.
    let words = body.chunks(8).map(|chunk| {
        let mut bytes = [0_u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        decode_fuzz_word(u64::from_le_bytes(bytes))
    });
    for (k, word) in words.take(FUZZ_RAM_PAGES * ENTRIES_PER_NODE).enumerate() {
        let (page, index) = ((k / ENTRIES_PER_NODE) as u64, k % ENTRIES_PER_NODE);
        arena.write_word(FUZZ_BASE + page * PAGE_SIZE, index, word);
    }
    let live_before = arena.live_set();
    let memory_before = arena.words(&ram);
    let result = arena.adopt_map(roots, core::slice::from_ref(&ram));
    assert_eq!(arena.live_set(), live_before, "adopt leaked or freed pages");
    assert!(arena.words(&ram) == memory_before, "adopt wrote to the pages");
    match result {
        Err(err) => FuzzOutcome::Rejected(err),
        Ok(mut map) => {
            let nodes = check_adopted(&map, &ram);
            let outcome = FuzzOutcome::Adopted { frames: map.frame_count(), nodes: nodes.len() as u64 };
            exercise(&mut map, arena);
            map.clear_all(&mut frames);
            assert!(map.is_empty());
            // Every page that was a node is free again; the other RAM pages
            // stay reserved and no spare page leaked.
            let expected: BTreeSet<u64> =
                ram.clone().step_by(PAGE_SIZE as usize).filter(|pa| !nodes.contains(pa)).collect();
            assert_eq!(arena.live_set(), expected, "node pages leaked");
            outcome
        }
    }
}

fn fuzz_root(byte: u8) -> u64 {
    match byte >> 6 {
        0 => 0,
        1 | 2 => FUZZ_BASE + u64::from(byte) % FUZZ_TARGET_PAGES * PAGE_SIZE,
        _ => u64::from(byte) << 3,
    }
}

fn decode_fuzz_word(word: u64) -> u64 {
    let page = FUZZ_BASE + (word & 0xff) % FUZZ_TARGET_PAGES * PAGE_SIZE;
    match word >> 62 {
        0 => 0,
        1 => page,
        2 => word,
        _ => page | ((word >> 8) & (PAGE_SIZE - 1)),
    }
}

/// Checks what an accepted map claims against its own pages; returns its
/// node pages.
fn check_adopted(map: &MultiOrderBitmap<&Arena>, ram: &Range<u64>) -> BTreeSet<u64> {
    let nodes: Vec<u64> = map.node_pages().collect();
    let distinct: BTreeSet<u64> = nodes.iter().copied().collect();
    assert_eq!(distinct.len(), nodes.len(), "a node page is shared");
    assert_eq!(nodes.len() as u64, map.node_count());
    assert!(nodes.iter().all(|pa| ram.contains(pa)), "node outside RAM");
    let mut covered = 0;
    let mut last_end = None;
    for run in map.runs() {
        assert!(run.start < run.end);
        assert!(last_end.is_none_or(|end| end < run.start), "runs not merged or out of order");
        covered += (run.end - run.start) / PAGE_SIZE;
        last_end = Some(run.end);
    }
    assert_eq!(covered, map.frame_count(), "runs disagree with the count");
    distinct
}

/// Updates an adopted map and checks that each update changes exactly the
/// frames it names.
fn exercise(map: &mut MultiOrderBitmap<&Arena>, arena: &Arena) {
    let mut frames = arena;
    let first = map.runs().next();
    let probe = first.as_ref().map_or(FUZZ_BASE, |run| run.start);
    let before = map.frame_count();
    if map.insert(&mut frames, probe, PageSize::Size4KiB).is_ok() {
        assert!(map.contains(probe));
        assert_eq!(map.frame_count(), before + u64::from(first.is_none()));
    }
    if let Some(run) = first {
        let middle = run.start + (run.end - run.start) / PAGE_SIZE / 2 * PAGE_SIZE;
        let before = map.frame_count();
        match map.remove(&mut frames, middle, PageSize::Size4KiB) {
            Ok(()) => {
                assert!(!map.contains(middle));
                assert_eq!(map.frame_count(), before - 1);
            }
            Err(err) => assert_eq!(err, Error::OutOfFrames),
        }
        assert!(map.contains(run.start) || run.start == middle);
        assert!(map.contains(run.end - PAGE_SIZE) || run.end - PAGE_SIZE == middle);
    }
}
