//! Side-by-side comparison of the sparse radix bitmap with a flat `bitvec`
//! bitmap and a `BTreeMap` of ranges, in one process. Prints one line per
//! figure: `BENCH name=<case>.<structure> value=<n> unit=<unit>`.
//!
//! Run with `cargo bench -p sparse-bitmap`. The flat bitmap only spans the
//! memory each case touches (a flat bitmap of the whole 52-bit space would
//! be 128 GiB), which flatters it on sparse layouts.
#![expect(clippy::cast_precision_loss, reason = "figures are printed as approximate decimals")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bitvec::prelude::{BitVec, Lsb0};
use sparse_bitmap::testing::Arena;
use sparse_bitmap::{Fit, MultiOrderBitmap, SparseBitmap, PAGE_SIZE};

/// Counts live heap bytes, to measure the host structures' metadata.
struct CountingAlloc;

static HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the caller's arguments, so
// `System`'s guarantees carry over; the counter has no effect on memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

const GIB: u64 = 1 << 30;
/// Where tracked memory starts: 256 GiB, so the trees are not at address 0.
const BASE: u64 = 0x40_0000_0000;
/// Arena for the trees' nodes, at its own high address.
const NODE_BASE: u64 = 0x80_0000_0000;
const ARENA_PAGES: usize = 2048;

fn report(name: &str, value: f64, unit: &str) {
    println!("BENCH name={name} value={value:.1} unit={unit}");
}

/// Best of three runs of `f`, which builds its state afresh each time.
fn best_of_3<T>(mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best = f();
    for _ in 0..2 {
        let next = f();
        if next.0 < best.0 {
            best = next;
        }
    }
    best
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let value = f();
    (start.elapsed(), value)
}

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// Disjoint, non-adjacent ranges of frame numbers: start -> end.
#[derive(Default)]
struct RangeSet {
    runs: BTreeMap<u64, u64>,
}

impl RangeSet {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.runs.range(..=start).next_back() {
            if e >= end {
                return;
            }
            if e >= start {
                start = s;
                self.runs.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.runs.range(start..=end).next() {
            end = end.max(e);
            self.runs.remove(&s);
        }
        self.runs.insert(start, end);
    }
}

/// Deterministic xorshift64* generator, to avoid a `rand` dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Runs of consecutive set bits of a flat bitmap.
fn bitvec_runs(bits: &BitVec<u64, Lsb0>) -> usize {
    let mut runs = 0;
    let mut previous = None;
    for i in bits.iter_ones() {
        if previous.is_none_or(|p| p + 1 != i) {
            runs += 1;
        }
        previous = Some(i);
    }
    runs
}

fn heap_bytes_of<T>(build: impl FnOnce() -> T) -> (usize, T) {
    let before = HEAP_BYTES.load(Ordering::Relaxed);
    let value = build();
    (HEAP_BYTES.load(Ordering::Relaxed) - before, value)
}

/// (a) 1 GiB contiguous at 4 KiB order, as one range and frame by frame.
fn set_one_gib() {
    let frames = GIB / PAGE_SIZE;
    let per_frame = |d: Duration| nanos(d) / frames as f64;

    let (d, ()) = best_of_3(|| {
        let arena = Arena::new(NODE_BASE, ARENA_PAGES);
        let mut tree = SparseBitmap::new(&arena, 0).unwrap();
        let d = timed(|| tree.set_range(&mut &arena, BASE..BASE + GIB).unwrap()).0;
        (d, ())
    });
    report("a_set_1gib_4k_range.sparse", nanos(d), "ns");
    let (d, ()) = best_of_3(|| {
        let arena = Arena::new(NODE_BASE, ARENA_PAGES);
        let mut tree = SparseBitmap::new(&arena, 0).unwrap();
        let d = timed(|| {
            for i in 0..frames {
                tree.set(&mut &arena, BASE + i * PAGE_SIZE).unwrap();
            }
        })
        .0;
        (d, ())
    });
    report("a_set_1gib_4k_per_frame.sparse", per_frame(d), "ns/frame");

    let (d, ()) = best_of_3(|| {
        let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, frames as usize);
        let d = timed(|| bits[..].fill(true)).0;
        black_box(&bits);
        (d, ())
    });
    report("a_set_1gib_4k_range.bitvec", nanos(d), "ns");
    let (d, ()) = best_of_3(|| {
        let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, frames as usize);
        let d = timed(|| {
            for i in 0..frames as usize {
                bits.set(i, true);
            }
        })
        .0;
        black_box(&bits);
        (d, ())
    });
    report("a_set_1gib_4k_per_frame.bitvec", per_frame(d), "ns/frame");

    let first = BASE / PAGE_SIZE;
    let (d, ()) = best_of_3(|| {
        let mut set = RangeSet::default();
        let d = timed(|| set.insert(first, first + frames)).0;
        black_box(&set.runs);
        (d, ())
    });
    report("a_set_1gib_4k_range.btree_ranges", nanos(d), "ns");
    let (d, ()) = best_of_3(|| {
        let mut set = RangeSet::default();
        let d = timed(|| {
            for f in first..first + frames {
                set.insert(f, f + 1);
            }
        })
        .0;
        black_box(&set.runs);
        (d, ())
    });
    report("a_set_1gib_4k_per_frame.btree_ranges", per_frame(d), "ns/frame");
}

const RANDOM_FRAMES: usize = 1 << 20;
const RANDOM_SPAN: u64 = 64 * GIB;

fn random_frames() -> Vec<u64> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    (0..RANDOM_FRAMES).map(|_| rng.next() % (RANDOM_SPAN / PAGE_SIZE)).collect()
}

/// (b) 1M random 4 KiB frames over 64 GiB, then (c) iterating their runs,
/// and (d) what each structure spends on them.
fn random_over_64_gib() {
    let picks = random_frames();
    let per_op = |d: Duration| nanos(d) / RANDOM_FRAMES as f64;
    let tracked_gib = {
        let mut distinct = picks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        (distinct.len() as u64 * PAGE_SIZE) as f64 / GIB as f64
    };

    let arena = Arena::new(NODE_BASE, ARENA_PAGES);
    let (d, ()) = best_of_3(|| {
        let mut tree = SparseBitmap::new(&arena, 0).unwrap();
        let d = timed(|| {
            for &f in &picks {
                tree.set(&mut &arena, BASE + f * PAGE_SIZE).unwrap();
            }
        })
        .0;
        tree.clear_all(&mut &arena);
        (d, ())
    });
    report("b_random_1m_over_64gib.sparse", per_op(d), "ns/frame");
    let mut tree = SparseBitmap::new(&arena, 0).unwrap();
    for &f in &picks {
        tree.set(&mut &arena, BASE + f * PAGE_SIZE).unwrap();
    }

    let (d, bits) = best_of_3(|| {
        let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, (RANDOM_SPAN / PAGE_SIZE) as usize);
        let d = timed(|| {
            for &f in &picks {
                bits.set(f as usize, true);
            }
        })
        .0;
        (d, bits)
    });
    report("b_random_1m_over_64gib.bitvec", per_op(d), "ns/frame");

    let (d, set) = best_of_3(|| {
        let mut set = RangeSet::default();
        let d = timed(|| {
            for &f in &picks {
                set.insert(f, f + 1);
            }
        })
        .0;
        (d, set)
    });
    report("b_random_1m_over_64gib.btree_ranges", per_op(d), "ns/frame");

    let (d, runs) = best_of_3(|| timed(|| tree.runs().count()));
    report("c_iterate_runs.sparse", nanos(d) / 1e6, "ms");
    report("c_iterate_runs.count", runs as f64, "runs");
    let (d, bit_runs) = best_of_3(|| timed(|| bitvec_runs(&bits)));
    assert_eq!(bit_runs, runs);
    report("c_iterate_runs.bitvec", nanos(d) / 1e6, "ms");
    let (d, set_runs) = best_of_3(|| timed(|| black_box(&set.runs).iter().count()));
    assert_eq!(set_runs, runs);
    report("c_iterate_runs.btree_ranges", nanos(d) / 1e6, "ms");

    let tree_bytes = tree.node_count() * PAGE_SIZE;
    report("d_meta_sparse_random_per_tracked_gib.sparse", tree_bytes as f64 / tracked_gib, "bytes/GiB");
    report("d_meta_sparse_random_per_span_gib.sparse", tree_bytes as f64 / 64.0, "bytes/GiB");
    let bitvec_bytes = bits.capacity() / 8;
    report("d_meta_sparse_random_per_tracked_gib.bitvec", bitvec_bytes as f64 / tracked_gib, "bytes/GiB");
    drop(bits);
    drop(set);
    let (set_bytes, set) = heap_bytes_of(|| {
        let mut set = RangeSet::default();
        for &f in &picks {
            set.insert(f, f + 1);
        }
        set
    });
    black_box(&set.runs);
    report("d_meta_sparse_random_per_tracked_gib.btree_ranges", set_bytes as f64 / tracked_gib, "bytes/GiB");
    tree.clear_all(&mut &arena);
}

/// (d) Metadata per GiB of densely tracked memory: 64 GiB at 4 KiB order,
/// and the same memory and 1 TiB recorded in 1 GiB blocks.
fn dense_metadata() {
    let arena = Arena::new(NODE_BASE, ARENA_PAGES);
    let mut tree = SparseBitmap::new(&arena, 0).unwrap();
    tree.set_range(&mut &arena, BASE..BASE + 64 * GIB).unwrap();
    report("d_meta_dense_64gib_4k.sparse", (tree.node_count() * PAGE_SIZE) as f64 / 64.0, "bytes/GiB");
    tree.clear_all(&mut &arena);
    let (bytes, bits) = heap_bytes_of(|| BitVec::<u64, Lsb0>::repeat(true, (64 * GIB / PAGE_SIZE) as usize));
    black_box(&bits);
    report("d_meta_dense_64gib_4k.bitvec", bytes as f64 / 64.0, "bytes/GiB");
    let (bytes, set) = heap_bytes_of(|| {
        let mut set = RangeSet::default();
        set.insert(BASE / PAGE_SIZE, (BASE + 64 * GIB) / PAGE_SIZE);
        set
    });
    black_box(&set.runs);
    report("d_meta_dense_64gib_4k.btree_ranges", bytes as f64 / 64.0, "bytes/GiB");

    for gib in [64_u64, 1024] {
        let mut map = MultiOrderBitmap::new(&arena);
        let (d, ()) = timed(|| {
            map.insert_range(&mut &arena, BASE..BASE + gib * GIB, Fit::Largest).unwrap();
        });
        report(
            &format!("d_meta_dense_{gib}gib_1g_blocks.sparse"),
            (map.node_count() * PAGE_SIZE) as f64 / gib as f64,
            "bytes/GiB",
        );
        report(&format!("d_insert_{gib}gib_largest.sparse"), nanos(d), "ns");
        map.clear_all(&mut &arena);
    }
}

/// (d) Metadata for a few frames scattered over a large span: 1000 random
/// 4 KiB frames over 4 TiB, in bytes. A flat bitmap needs one bit per frame
/// of the span; its size is computed rather than allocated.
fn scattered_metadata() {
    const FRAMES: usize = 1000;
    const SPAN: u64 = 4096 * GIB;
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let picks: Vec<u64> = (0..FRAMES).map(|_| rng.next() % (SPAN / PAGE_SIZE)).collect();
    let arena = Arena::new(NODE_BASE, ARENA_PAGES);
    let mut tree = SparseBitmap::new(&arena, 0).unwrap();
    for &f in &picks {
        tree.set(&mut &arena, BASE + f * PAGE_SIZE).unwrap();
    }
    report("d_meta_scattered_1000_over_4tib.sparse", (tree.node_count() * PAGE_SIZE) as f64, "bytes");
    tree.clear_all(&mut &arena);
    report("d_meta_scattered_1000_over_4tib.bitvec", (SPAN / PAGE_SIZE / 8) as f64, "bytes");
    let (bytes, set) = heap_bytes_of(|| {
        let mut set = RangeSet::default();
        for &f in &picks {
            set.insert(f, f + 1);
        }
        set
    });
    black_box(&set.runs);
    report("d_meta_scattered_1000_over_4tib.btree_ranges", bytes as f64, "bytes");
}

fn main() {
    set_one_gib();
    random_over_64_gib();
    dense_metadata();
    scattered_metadata();
}
