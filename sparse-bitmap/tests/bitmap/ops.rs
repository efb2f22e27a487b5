//! Behaviour of single operations: block placement, splitting, argument
//! errors, node accounting.

use sparse_bitmap::testing::Arena;
use sparse_bitmap::{Error, Fit, MultiOrderBitmap, PageSize, SparseBitmap, MAX_ORDER, PAGE_SIZE, PHYS_ADDR_LIMIT};

use crate::common::ARENA_BASE;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn counts(map: &MultiOrderBitmap<&Arena>) -> [u64; 3] {
    PageSize::ALL.map(|s| map.tree(s).count())
}

#[test]
fn largest_fit_uses_one_bit_per_gib() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    // 4 KiB below a GiB boundary, then 2 GiB, then 2 MiB + 4 KiB.
    let range = 7 * GIB - PAGE_SIZE..9 * GIB + 2 * MIB + PAGE_SIZE;
    map.insert_range(&mut &arena, range.clone(), Fit::Largest).unwrap();
    assert_eq!(counts(&map), [2, 1, 2]);
    assert_eq!(map.runs().collect::<Vec<_>>(), vec![range]);
    // 4 KiB: root, two interior levels, two leaves; 2 MiB: root, one
    // interior level, leaf; 1 GiB: root, leaf.
    assert_eq!(map.node_count(), 5 + 3 + 2);
}

#[test]
fn exact_fit_records_every_block_at_that_size() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert_range(&mut &arena, 0..GIB, Fit::Exact(PageSize::Size2MiB)).unwrap();
    assert_eq!(counts(&map), [0, 512, 0]);
    assert_eq!(map.frame_count(), GIB / PAGE_SIZE);
}

#[test]
fn removing_a_frame_splits_its_gib_block() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert(&mut &arena, 3 * GIB, PageSize::Size1GiB).unwrap();
    map.remove(&mut &arena, 3 * GIB, PageSize::Size4KiB).unwrap();
    // The rest of the block: 511 frames up to the first 2 MiB boundary, then
    // 511 blocks of 2 MiB.
    assert_eq!(counts(&map), [511, 511, 0]);
    assert_eq!(map.runs().collect::<Vec<_>>(), vec![3 * GIB + PAGE_SIZE..4 * GIB]);
    assert!(!map.contains(3 * GIB));
    assert!(map.contains(3 * GIB + PAGE_SIZE));
}

#[test]
fn removing_the_middle_keeps_both_sides() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert_range(&mut &arena, 0..4 * GIB, Fit::Largest).unwrap();
    map.remove_range(&mut &arena, GIB + 3 * MIB..2 * GIB + 5 * PAGE_SIZE).unwrap();
    assert_eq!(map.runs().collect::<Vec<_>>(), vec![0..GIB + 3 * MIB, 2 * GIB + 5 * PAGE_SIZE..4 * GIB]);
    assert_eq!(map.frame_count(), (4 * GIB - (GIB - 3 * MIB + 5 * PAGE_SIZE)) / PAGE_SIZE);
}

#[test]
fn inserting_inside_a_larger_block_changes_nothing() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert(&mut &arena, GIB, PageSize::Size1GiB).unwrap();
    let nodes = map.node_count();
    map.insert(&mut &arena, GIB + 6 * MIB, PageSize::Size2MiB).unwrap();
    map.insert(&mut &arena, GIB + 12 * PAGE_SIZE, PageSize::Size4KiB).unwrap();
    assert_eq!(counts(&map), [0, 0, 1]);
    assert_eq!(map.node_count(), nodes);
}

#[test]
fn inserting_a_larger_block_absorbs_smaller_bits() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert(&mut &arena, GIB + 6 * MIB, PageSize::Size2MiB).unwrap();
    map.insert(&mut &arena, GIB + 12 * PAGE_SIZE, PageSize::Size4KiB).unwrap();
    map.insert(&mut &arena, GIB, PageSize::Size1GiB).unwrap();
    assert_eq!(counts(&map), [0, 0, 1]);
    // Only the 1 GiB tree's root and leaf remain.
    assert_eq!(map.node_count(), 2);
    assert_eq!(arena.live_frames(), 2);
}

#[test]
fn contains_range_sees_across_orders() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert_range(&mut &arena, GIB - 2 * MIB - PAGE_SIZE..2 * GIB + PAGE_SIZE, Fit::Largest).unwrap();
    assert!(map.contains_range(GIB - 2 * MIB - PAGE_SIZE..2 * GIB + PAGE_SIZE));
    assert!(map.contains_range(GIB - 5..GIB + 5));
    assert!(!map.contains_range(GIB - 2 * MIB - 2 * PAGE_SIZE..GIB));
    assert!(map.contains_range(5..5));
}

#[test]
fn the_top_of_the_address_space_is_usable() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert_range(&mut &arena, PHYS_ADDR_LIMIT - GIB - PAGE_SIZE..PHYS_ADDR_LIMIT, Fit::Largest).unwrap();
    assert_eq!(counts(&map), [1, 0, 1]);
    assert_eq!(map.runs().collect::<Vec<_>>(), vec![PHYS_ADDR_LIMIT - GIB - PAGE_SIZE..PHYS_ADDR_LIMIT]);
    map.remove_range(&mut &arena, PHYS_ADDR_LIMIT - PAGE_SIZE..PHYS_ADDR_LIMIT).unwrap();
    assert!(!map.contains(PHYS_ADDR_LIMIT - PAGE_SIZE));
    assert!(map.contains(PHYS_ADDR_LIMIT - 2 * PAGE_SIZE));
}

#[test]
fn bad_arguments_are_typed_errors() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut frames = &arena;
    assert_eq!(SparseBitmap::new(&arena, MAX_ORDER + 1).err(), Some(Error::UnsupportedOrder(MAX_ORDER + 1)));
    let mut tree = SparseBitmap::new(&arena, 9).unwrap();
    assert_eq!(tree.set(&mut frames, PAGE_SIZE), Err(Error::Misaligned { pa: PAGE_SIZE }));
    assert_eq!(tree.test(PHYS_ADDR_LIMIT), Err(Error::OutOfRange { pa: PHYS_ADDR_LIMIT }));
    assert_eq!(tree.clear_range(&mut frames, 0..3 * PAGE_SIZE), Err(Error::Misaligned { pa: 3 * PAGE_SIZE }));
    let mut map = MultiOrderBitmap::new(&arena);
    assert_eq!(map.insert(&mut frames, MIB, PageSize::Size1GiB), Err(Error::Misaligned { pa: MIB }));
    assert_eq!(map.insert_range(&mut frames, 0..5, Fit::Largest), Err(Error::Misaligned { pa: 5 }));
    assert_eq!(
        map.remove_range(&mut frames, 0..PHYS_ADDR_LIMIT + PAGE_SIZE),
        Err(Error::OutOfRange { pa: PHYS_ADDR_LIMIT + PAGE_SIZE })
    );
    let top = !(GIB - 1);
    assert_eq!(map.insert(&mut frames, top, PageSize::Size1GiB), Err(Error::OutOfRange { pa: top }));
    assert_eq!(arena.live_frames(), 0);
}

#[test]
fn node_pages_are_what_the_tree_allocated() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut tree = SparseBitmap::new(&arena, 0).unwrap();
    for pa in [0, 5 * GIB, 5 * GIB + 200 * MIB, 1 << 45] {
        tree.set(&mut &arena, pa).unwrap();
    }
    let pages: Vec<u64> = tree.node_pages().collect();
    assert_eq!(pages[0], tree.root());
    assert_eq!(pages.iter().copied().collect::<std::collections::BTreeSet<_>>(), arena.live_set());
    assert_eq!(pages.len() as u64, tree.node_count());
}
