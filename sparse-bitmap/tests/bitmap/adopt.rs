//! Adopting trees written by a previous image: round trips, corrupt trees,
//! and arbitrary bytes.

use std::collections::BTreeSet;

use crate::common::{map_op, IntervalModel, MapOp, ARENA_BASE};
use proptest::prelude::*;
use sparse_bitmap::testing::{adopt_arbitrary, Arena, FuzzOutcome, FUZZ_BASE};
use sparse_bitmap::{
    AdoptError, Error, FrameSource, MultiOrderBitmap, PageSize, SparseBitmap, PAGE_SIZE, PHYS_ADDR_LIMIT,
};

const GIB: u64 = 1 << 30;

/// Applies `op`, which must succeed.
fn apply(map: &mut MultiOrderBitmap<&Arena>, arena: &Arena, op: &MapOp) {
    let mut frames = arena;
    match op {
        MapOp::Insert(r, fit) => map.insert_range(&mut frames, r.clone(), *fit).unwrap(),
        MapOp::Remove(r) => map.remove_range(&mut frames, r.clone()).unwrap(),
    }
}

fn assert_same(a: &MultiOrderBitmap<&Arena>, b: &MultiOrderBitmap<&Arena>) {
    assert_eq!(a.runs().collect::<Vec<_>>(), b.runs().collect::<Vec<_>>());
    assert_eq!(a.frame_count(), b.frame_count());
    for size in PageSize::ALL {
        assert_eq!(a.tree(size).count(), b.tree(size).count());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Build, hand the raw pages over, adopt, compare; then keep updating
    /// both and compare again.
    #[test]
    fn adopt_round_trip(
        before in prop::collection::vec(map_op(), 1..20),
        after in prop::collection::vec(map_op(), 0..10),
    ) {
        let old_memory = Arena::new(ARENA_BASE, 4096);
        let mut old = MultiOrderBitmap::new(&old_memory);
        let mut model = IntervalModel::default();
        for op in &before {
            apply(&mut old, &old_memory, op);
            match op {
                MapOp::Insert(r, _) => model.insert(r.clone()),
                MapOp::Remove(r) => model.remove(r.clone()),
            }
        }
        let new_memory = old_memory.handover();
        let mut new = new_memory.adopt_map(old.roots(), &[new_memory.ram()])
        .unwrap();
        prop_assert_eq!(new.roots(), old.roots());
        assert_same(&old, &new);
        prop_assert_eq!(new.runs().collect::<Vec<_>>(), model.runs());
        let old_nodes: BTreeSet<u64> = old.node_pages().collect();
        let new_nodes: BTreeSet<u64> = new.node_pages().collect();
        prop_assert_eq!(&old_nodes, &new_nodes);
        prop_assert_eq!(new.node_count(), old.node_count());
        // Validation gave back every page it borrowed.
        prop_assert_eq!(new_memory.live_set(), old_nodes);

        for op in &after {
            apply(&mut old, &old_memory, op);
            apply(&mut new, &new_memory, op);
        }
        assert_same(&old, &new);
        new.clear_all(&mut &new_memory);
        prop_assert_eq!(new_memory.live_frames(), 0);
    }

    /// Pages holding well-formed trees, then a few corrupted words: adopt
    /// accepts the intact ones with the right counts, and otherwise either
    /// returns a typed error or a map that behaves (`adopt_arbitrary` panics
    /// if not). This is the fuzz target's body, run in `cargo test`.
    #[test]
    fn adopt_planted_trees(plan in tree_plan()) {
        let (data, expected) = plan.bytes();
        let outcome = adopt_arbitrary(&data);
        if plan.corruptions.is_empty() {
            let overlap = matches!(
                outcome,
                FuzzOutcome::Rejected(AdoptError::OverlappingOrders { .. })
            );
            prop_assert!(overlap || outcome == expected, "{:?} != {:?}", outcome, expected);
        }
    }

    #[test]
    fn adopt_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        adopt_arbitrary(&data);
    }
}

/// Encodes a page reference the way `adopt_arbitrary` decodes it.
fn link(page: u64) -> [u8; 8] {
    (1_u64 << 62 | page).to_le_bytes()
}

/// Trees to plant in the pages `adopt_arbitrary` reads, then corrupt.
#[derive(Clone, Debug)]
struct TreePlan {
    /// The eight RAM pages in the order trees take them.
    pages: Vec<u64>,
    /// Which of the 4 KiB, 2 MiB and 1 GiB trees to plant.
    present: [bool; 3],
    /// Entry index used at each node, in the order nodes are planted.
    indices: Vec<usize>,
    /// Bits of each leaf's one word.
    leaf_bits: [u16; 3],
    /// (page, word index, word) written over the planted trees.
    corruptions: Vec<(usize, usize, u64)>,
}

fn tree_plan() -> impl Strategy<Value = TreePlan> {
    let corruption = (
        0..8_usize,
        prop_oneof![0..4_usize, 0..512_usize],
        prop_oneof![any::<u64>(), (0..16_u64).prop_map(|page| 1 << 62 | page), Just(0)],
    );
    (
        Just((0..8).collect::<Vec<u64>>()).prop_shuffle(),
        prop::array::uniform3(any::<bool>()),
        prop::collection::vec(0..512_usize, 9),
        prop::array::uniform3(any::<u16>()),
        prop_oneof![
            2 => Just(Vec::new()),
            1 => prop::collection::vec(corruption, 1..4),
        ],
    )
        .prop_map(|(pages, present, indices, leaf_bits, corruptions)| TreePlan {
            pages,
            present,
            indices,
            leaf_bits,
            corruptions,
        })
}

impl TreePlan {
    /// The bytes to feed `adopt_arbitrary`, and its outcome if nothing is
    /// corrupted and no frame is covered twice.
    fn bytes(&self) -> (Vec<u8>, FuzzOutcome) {
        let mut data = vec![0_u8; 3 + 8 * 4096];
        let put = |data: &mut Vec<u8>, page: u64, index: usize, word: [u8; 8]| {
            let at = 3 + page as usize * 4096 + index * 8;
            data[at..at + 8].copy_from_slice(&word);
        };
        let mut pages = self.pages.iter().copied();
        let mut indices = self.indices.iter().copied();
        let (mut frames, mut nodes) = (0, 0);
        // Nodes per tree: 4 KiB has a root, two interior levels and a leaf.
        for (tree, depth) in [(0, 4), (1, 3), (2, 2)] {
            if !self.present[tree] || pages.len() < depth {
                continue;
            }
            let chain: Vec<u64> = pages.by_ref().take(depth).collect();
            data[tree] = 0x40 | chain[0] as u8;
            for level in 0..depth - 1 {
                // Root entries beyond 128 fall outside the key space.
                let index = indices.next().unwrap_or(0) % if level == 0 { 128 } else { 512 };
                put(&mut data, chain[level], index, link(chain[level + 1]));
            }
            let leaf_word = 2 << 62 | u64::from(self.leaf_bits[tree]);
            put(&mut data, chain[depth - 1], indices.next().unwrap_or(0), leaf_word.to_le_bytes());
            frames += u64::from(leaf_word.count_ones()) << (9 * tree);
            nodes += depth as u64;
        }
        for &(page, index, word) in &self.corruptions {
            put(&mut data, page as u64, index, word.to_le_bytes());
        }
        (data, FuzzOutcome::Adopted { frames, nodes })
    }
}

#[test]
fn arbitrary_bytes_can_form_a_deep_valid_tree() {
    // Root of the 4 KiB tree is page 0; pages 0 -> 1 -> 2 -> 3 (leaf).
    let mut data = vec![0_u8; 3 + 4 * 4096];
    data[0] = 0x40;
    for page in 0..3 {
        let at = 3 + page * 4096;
        data[at..at + 8].copy_from_slice(&link(page as u64 + 1));
    }
    // A raw leaf word (top bits 10) with four bits set.
    let leaf_word: u64 = 1 << 63 | 0b1011;
    data[3 + 3 * 4096..3 + 3 * 4096 + 8].copy_from_slice(&leaf_word.to_le_bytes());
    assert_eq!(adopt_arbitrary(&data), FuzzOutcome::Adopted { frames: 4, nodes: 4 });
}

/// A 4 KiB-order tree holding one frame: root, two interior nodes, a leaf.
struct Chain {
    arena: Arena,
    frame: u64,
    /// Root first, leaf last.
    nodes: [u64; 4],
}

fn chain(frame: u64) -> Chain {
    let arena = Arena::new(ARENA_BASE, 64);
    let nodes: Vec<u64> = {
        let mut tree = SparseBitmap::new(&arena, 0).unwrap();
        tree.set(&mut &arena, frame).unwrap();
        tree.node_pages().collect()
    };
    let nodes = nodes.try_into().unwrap();
    Chain { arena, frame, nodes }
}

impl Chain {
    /// Index of the entry leading towards the frame in the node at `level`.
    fn index(&self, level: u32) -> usize {
        ((self.frame >> 12 >> (15 + 9 * (2 - level))) & 511) as usize
    }

    fn adopt(&self) -> Result<SparseBitmap<&Arena>, AdoptError> {
        self.arena.adopt_tree(0, self.nodes[0], &[self.arena.ram()])
    }
}

#[test]
fn intact_chain_is_adopted() {
    let c = chain(0x1234_5678_9000);
    let tree = c.adopt().unwrap();
    assert_eq!(tree.count(), 1);
    assert_eq!(tree.test(c.frame), Ok(true));
    assert_eq!(tree.node_pages().collect::<Vec<_>>(), c.nodes);
}

#[test]
fn pointer_outside_ram_is_rejected() {
    let c = chain(0x1234_5678_9000);
    let bad = 0x1000_0000;
    c.arena.write_word(c.nodes[1], c.index(1), bad);
    assert_eq!(c.adopt().err(), Some(AdoptError::NodeOutsideRam { pa: bad }));
}

#[test]
fn pointer_just_past_ram_is_rejected() {
    let c = chain(0x1234_5678_9000);
    let bad = c.arena.ram().end;
    c.arena.write_word(c.nodes[2], c.index(2), bad);
    assert_eq!(c.adopt().err(), Some(AdoptError::NodeOutsideRam { pa: bad }));
}

#[test]
fn node_straddling_the_end_of_a_ram_range_is_rejected() {
    let c = chain(0x1234_5678_9000);
    // RAM ends 8 bytes into the leaf's page.
    let ram = c.arena.ram().start..c.nodes[3] + 8;
    let result = c.arena.adopt_tree(0, c.nodes[0], &[ram]);
    assert_eq!(result.err(), Some(AdoptError::NodeOutsideRam { pa: c.nodes[3] }));
}

#[test]
fn pointer_beyond_52_bits_is_rejected() {
    let c = chain(0x1234_5678_9000);
    let bad = !(PAGE_SIZE - 1);
    c.arena.write_word(c.nodes[0], c.index(0), bad);
    assert_eq!(c.adopt().err(), Some(AdoptError::NodeOutsideRam { pa: bad }));
}

#[test]
fn root_outside_ram_is_rejected() {
    let arena = Arena::new(ARENA_BASE, 8);
    let root = ARENA_BASE - PAGE_SIZE;
    let result = arena.adopt_tree(9, root, &[arena.ram()]);
    assert_eq!(result.err(), Some(AdoptError::NodeOutsideRam { pa: root }));
}

#[test]
fn misaligned_node_is_rejected() {
    let c = chain(0x1234_5678_9000);
    let bad = c.nodes[3] + 0x10;
    c.arena.write_word(c.nodes[2], c.index(2), bad);
    assert_eq!(c.adopt().err(), Some(AdoptError::MisalignedNode { pa: bad }));
}

#[test]
fn misaligned_root_is_rejected() {
    let c = chain(0x1234_5678_9000);
    let result = c.arena.adopt_tree(0, c.nodes[0] + 1, &[c.arena.ram()]);
    assert_eq!(result.err(), Some(AdoptError::MisalignedNode { pa: c.nodes[0] + 1 }));
}

#[test]
fn cycle_back_to_the_root_is_rejected() {
    let c = chain(0x1234_5678_9000);
    c.arena.write_word(c.nodes[2], c.index(2), c.nodes[0]);
    assert_eq!(c.adopt().err(), Some(AdoptError::NodeReachedTwice { pa: c.nodes[0] }));
}

#[test]
fn root_pointing_at_itself_is_rejected() {
    let c = chain(0x1234_5678_9000);
    c.arena.write_word(c.nodes[0], c.index(0), c.nodes[0]);
    assert_eq!(c.adopt().err(), Some(AdoptError::NodeReachedTwice { pa: c.nodes[0] }));
}

#[test]
fn child_shared_by_two_entries_is_rejected() {
    let c = chain(0x1234_5678_9000);
    let other = (c.index(2) + 1) % 512;
    c.arena.write_word(c.nodes[2], other, c.nodes[3]);
    assert_eq!(c.adopt().err(), Some(AdoptError::NodeReachedTwice { pa: c.nodes[3] }));
}

#[test]
fn node_shared_between_orders_is_rejected() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert(&mut &arena, 5 * GIB, PageSize::Size1GiB).unwrap();
    map.insert(&mut &arena, 7 * GIB, PageSize::Size2MiB).unwrap();
    let mib_leaf = map.tree(PageSize::Size2MiB).node_pages().last().unwrap();
    let gib_root = map.roots()[2];
    // The 1 GiB tree's root also links the 2 MiB tree's leaf.
    arena.write_word(gib_root, 1, mib_leaf);
    let result = arena.adopt_map(map.roots(), &[arena.ram()]);
    assert_eq!(result.err(), Some(AdoptError::NodeReachedTwice { pa: mib_leaf }));
}

#[test]
fn empty_leaf_is_rejected() {
    let c = chain(0x1234_5678_9000);
    for i in 0..512 {
        c.arena.write_word(c.nodes[3], i, 0);
    }
    assert_eq!(c.adopt().err(), Some(AdoptError::EmptyNode { pa: c.nodes[3] }));
}

#[test]
fn empty_interior_node_is_rejected() {
    let c = chain(0x1234_5678_9000);
    c.arena.write_word(c.nodes[2], c.index(2), 0);
    assert_eq!(c.adopt().err(), Some(AdoptError::EmptyNode { pa: c.nodes[2] }));
}

#[test]
fn root_entry_beyond_the_key_space_is_rejected() {
    let c = chain(0x1234_5678_9000);
    // Order 0 uses 128 root entries: 52 - 12 - 15 - 2 * 9 = 7 bits.
    c.arena.write_word(c.nodes[0], 200, c.nodes[3]);
    assert_eq!(c.adopt().err(), Some(AdoptError::EntryBeyondKeySpace { node: c.nodes[0], index: 200 }));
}

#[test]
fn frame_covered_at_two_orders_is_rejected() {
    let arena = Arena::new(ARENA_BASE, 64);
    let mut map = MultiOrderBitmap::new(&arena);
    map.insert(&mut &arena, 5 * GIB, PageSize::Size1GiB).unwrap();
    let mut stray = SparseBitmap::new(&arena, 0).unwrap();
    let inside = 5 * GIB + 0x1234_5000;
    stray.set(&mut &arena, inside).unwrap();
    let [_, _, gib_root] = map.roots();
    let result = arena.adopt_map([stray.root(), 0, gib_root], &[arena.ram()]);
    assert_eq!(result.err(), Some(AdoptError::OverlappingOrders { pa: inside }));
}

#[test]
fn unsupported_order_is_rejected() {
    let arena = Arena::new(ARENA_BASE, 8);
    let result = arena.adopt_tree(26, 0, &[arena.ram()]);
    assert_eq!(result.err(), Some(AdoptError::UnsupportedOrder(26)));
}

#[test]
fn no_frame_to_track_visited_nodes_is_reported() {
    let c = chain(0x1234_5678_9000);
    c.arena.set_frame_limit(c.arena.live_frames());
    assert_eq!(c.adopt().err(), Some(AdoptError::Tracking(Error::OutOfFrames)));
    // Nothing was kept from the failed attempt.
    assert_eq!(c.arena.live_frames(), 4);
}

#[test]
fn empty_roots_adopt_to_an_empty_map() {
    let arena = Arena::new(ARENA_BASE, 8);
    let map = arena.adopt_map([0; 3], &[]).unwrap();
    assert!(map.is_empty());
    assert_eq!(map.runs().next(), None);
}

#[test]
fn adopted_tree_at_the_top_of_the_address_space() {
    for order in [0, 9, 18] {
        let arena = Arena::new(FUZZ_BASE, 16);
        let mut tree = SparseBitmap::new(&arena, order).unwrap();
        let last = PHYS_ADDR_LIMIT - (PAGE_SIZE << order);
        tree.set(&mut &arena, last).unwrap();
        let memory = arena.handover();
        let adopted = memory.adopt_tree(order, tree.root(), &[memory.ram()]).unwrap();
        assert_eq!(adopted.runs().collect::<Vec<_>>(), vec![last..PHYS_ADDR_LIMIT]);
    }
}

/// A frame source that hands out unusable addresses.
struct Broken(u64);

// SAFETY: never hands out a usable page; the bitmap must refuse them all.
unsafe impl FrameSource for Broken {
    fn alloc_frame(&mut self) -> Option<u64> {
        Some(self.0)
    }

    fn free_frame(&mut self, _pa: u64) {}
}

#[test]
fn unusable_frames_from_the_source_are_refused() {
    let arena = Arena::new(ARENA_BASE, 8);
    for bad in [0, ARENA_BASE + 8, PHYS_ADDR_LIMIT] {
        let mut tree = SparseBitmap::new(&arena, 0).unwrap();
        assert_eq!(tree.set(&mut Broken(bad), 0), Err(Error::BadFrame { pa: bad }));
        assert_eq!(tree.root(), 0);
    }
}
