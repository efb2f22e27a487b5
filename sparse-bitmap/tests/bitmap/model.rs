//! Property tests: random operation sequences against reference models.

use std::collections::BTreeSet;
use std::ops::Range;

use crate::common::{key_runs, map_op, IntervalModel, MapOp, ARENA_BASE};
use proptest::prelude::*;
use sparse_bitmap::testing::Arena;
use sparse_bitmap::{Error, MultiOrderBitmap, SparseBitmap, BITS_PER_LEAF, MAX_ORDER, PHYS_ADDR_LIMIT};

/// An operation on one tree, in block numbers.
#[derive(Clone, Debug)]
enum TreeOp {
    Set(u64),
    Clear(u64),
    SetRange(Range<u64>),
    ClearRange(Range<u64>),
}

/// Block numbers near leaf and interior-node boundaries and the ends of the
/// key space of an order.
fn key(limit: u64) -> impl Strategy<Value = u64> {
    let anchors: Vec<u64> = [0, BITS_PER_LEAF, 3 * BITS_PER_LEAF, 1 << 24, 1 << 33, limit / 2, limit - 1]
        .into_iter()
        .filter(|&a| a < limit)
        .collect();
    (prop::sample::select(anchors), -3000_i64..3000)
        .prop_map(move |(anchor, delta)| anchor.saturating_add_signed(delta).min(limit - 1))
}

fn key_range(limit: u64) -> impl Strategy<Value = Range<u64>> {
    let len = prop_oneof![4 => 0..200_u64, 2 => 0..5000_u64, 1 => 30_000..70_000_u64];
    (key(limit), len).prop_map(move |(start, len)| start..(start + len).min(limit))
}

fn tree_op(limit: u64) -> impl Strategy<Value = TreeOp> {
    prop_oneof![
        3 => key(limit).prop_map(TreeOp::Set),
        2 => key(limit).prop_map(TreeOp::Clear),
        2 => key_range(limit).prop_map(TreeOp::SetRange),
        2 => key_range(limit).prop_map(TreeOp::ClearRange),
    ]
}

fn order_and_ops() -> impl Strategy<Value = (u32, Vec<TreeOp>)> {
    prop::sample::select(vec![0, 9, 18, MAX_ORDER]).prop_flat_map(|order| {
        let limit = PHYS_ADDR_LIMIT >> (12 + order);
        (Just(order), prop::collection::vec(tree_op(limit), 1..40))
    })
}

/// Checks everything a tree reports against the model.
fn check_tree(tree: &SparseBitmap<&Arena>, arena: &Arena, model: &BTreeSet<u64>) {
    let shift = 12 + tree.order();
    assert_eq!(tree.count(), model.len() as u64);
    let runs: Vec<Range<u64>> = tree.runs().collect();
    let expected: Vec<Range<u64>> = key_runs(model).into_iter().map(|r| r.start << shift..r.end << shift).collect();
    assert_eq!(runs, expected);
    let nodes: BTreeSet<u64> = tree.node_pages().collect();
    assert_eq!(nodes.len() as u64, tree.node_count());
    assert_eq!(nodes, arena.live_set(), "node pages and live frames differ");
}

/// Applies `op` to the tree and the model, checking each result. With
/// `may_fail`, an allocation failure is accepted if the tree changed only
/// as documented (nothing for a single set, a prefix for a range).
fn apply_tree_op(
    tree: &mut SparseBitmap<&Arena>,
    arena: &Arena,
    model: &mut BTreeSet<u64>,
    op: &TreeOp,
    may_fail: bool,
) {
    let shift = 12 + tree.order();
    let mut frames = arena;
    match op {
        TreeOp::Set(k) => match tree.set(&mut frames, k << shift) {
            Ok(changed) => assert_eq!(changed, model.insert(*k)),
            Err(Error::OutOfFrames) if may_fail => assert!(!model.contains(k)),
            Err(err) => panic!("set failed: {err}"),
        },
        TreeOp::Clear(k) => {
            let changed = tree.clear(&mut frames, k << shift).unwrap();
            assert_eq!(changed, model.remove(k));
        }
        TreeOp::SetRange(r) => match tree.set_range(&mut frames, r.start << shift..r.end << shift) {
            Ok(added) => {
                let before = model.len();
                model.extend(r.clone());
                assert_eq!(added, (model.len() - before) as u64);
            }
            Err(Error::OutOfFrames) if may_fail => {
                // Set up to some leaf boundary, untouched after it.
                let done = r.clone().find(|&k| !tree.test(k << shift).unwrap()).unwrap_or(r.end);
                assert!(done == r.start || done.is_multiple_of(BITS_PER_LEAF) || done == r.end);
                model.extend(r.start..done);
                for k in done..r.end {
                    assert_eq!(tree.test(k << shift).unwrap(), model.contains(&k));
                }
            }
            Err(err) => panic!("set_range failed: {err}"),
        },
        TreeOp::ClearRange(r) => {
            let removed = tree.clear_range(&mut frames, r.start << shift..r.end << shift).unwrap();
            let before = model.len();
            for k in r.clone() {
                model.remove(&k);
            }
            assert_eq!(removed, (before - model.len()) as u64);
        }
    }
}

fn check_map(map: &MultiOrderBitmap<&Arena>, arena: &Arena, model: &IntervalModel) {
    assert_eq!(map.frame_count(), model.frames());
    assert_eq!(map.runs().collect::<Vec<_>>(), model.runs());
    let nodes: BTreeSet<u64> = map.node_pages().collect();
    assert_eq!(nodes.len() as u64, map.node_count());
    assert_eq!(nodes, arena.live_set(), "node pages and live frames differ");
}

fn probes(op: &MapOp) -> Vec<u64> {
    let r = match op {
        MapOp::Insert(r, _) | MapOp::Remove(r) => r,
    };
    [r.start, r.end, r.start.wrapping_sub(4096), r.end.wrapping_sub(4096)]
        .into_iter()
        .filter(|&pa| pa < PHYS_ADDR_LIMIT)
        .collect()
}

/// Applies `op` to the map and the model. With `may_fail`, an allocation
/// failure is accepted if only frames inside the range changed, in the
/// direction of the operation; the model then takes the map's state.
fn apply_map_op(
    map: &mut MultiOrderBitmap<&Arena>,
    arena: &Arena,
    model: &mut IntervalModel,
    op: &MapOp,
    may_fail: bool,
) {
    let mut frames = arena;
    let (result, range) = match op {
        MapOp::Insert(r, fit) => (map.insert_range(&mut frames, r.clone(), *fit), r),
        MapOp::Remove(r) => (map.remove_range(&mut frames, r.clone()), r),
    };
    match result {
        Ok(()) => match op {
            MapOp::Insert(..) => model.insert(range.clone()),
            MapOp::Remove(..) => model.remove(range.clone()),
        },
        Err(Error::OutOfFrames) if may_fail => {
            let mut now = IntervalModel::default();
            for run in map.runs() {
                now.insert(run);
            }
            let (mut lower, mut upper) = (model.clone(), model.clone());
            match op {
                MapOp::Insert(..) => upper.insert(range.clone()),
                MapOp::Remove(..) => lower.remove(range.clone()),
            }
            assert!(lower.is_subset(&now), "frames lost beyond the operation");
            assert!(now.is_subset(&upper), "frames added beyond the operation");
            *model = now;
        }
        Err(err) => panic!("{op:?} failed: {err}"),
    }
    for pa in probes(op) {
        assert_eq!(map.contains(pa), model.contains(pa), "contains({pa:#x})");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn tree_matches_btreeset((order, ops) in order_and_ops()) {
        let arena = Arena::new(ARENA_BASE, 2048);
        let mut tree = SparseBitmap::new(&arena, order).unwrap();
        let mut model = BTreeSet::new();
        for op in &ops {
            apply_tree_op(&mut tree, &arena, &mut model, op, false);
            check_tree(&tree, &arena, &model);
        }
        // Adopting checks that no node is left empty.
        let adopted = arena.adopt_tree(order, tree.root(), &[arena.ram()]);
        prop_assert_eq!(adopted.map(|t| t.count()), Ok(model.len() as u64));
        tree.clear_all(&mut &arena);
        prop_assert_eq!(arena.live_frames(), 0);
    }

    #[test]
    fn tree_survives_running_out_of_frames(
        (order, ops) in order_and_ops(),
        limit in 0_usize..10,
    ) {
        let arena = Arena::new(ARENA_BASE, 64);
        arena.set_frame_limit(limit);
        let mut tree = SparseBitmap::new(&arena, order).unwrap();
        let mut model = BTreeSet::new();
        for op in &ops {
            apply_tree_op(&mut tree, &arena, &mut model, op, true);
            check_tree(&tree, &arena, &model);
        }
    }

    #[test]
    fn tree_clear_frees_every_node((order, ops) in order_and_ops()) {
        let arena = Arena::new(ARENA_BASE, 2048);
        let mut tree = SparseBitmap::new(&arena, order).unwrap();
        let mut model = BTreeSet::new();
        for op in &ops {
            apply_tree_op(&mut tree, &arena, &mut model, op, false);
        }
        let keys: Vec<u64> = model.iter().copied().collect();
        for k in keys {
            prop_assert!(tree.clear(&mut &arena, k << (12 + order)).unwrap());
        }
        prop_assert_eq!(tree.root(), 0);
        prop_assert_eq!(tree.node_count(), 0);
        prop_assert_eq!(arena.live_frames(), 0);
    }

    #[test]
    fn runs_in_cuts_runs_to_the_range(
        (order, ops) in order_and_ops(),
        window in key_range(1 << 22),
    ) {
        let arena = Arena::new(ARENA_BASE, 2048);
        let mut tree = SparseBitmap::new(&arena, order).unwrap();
        let mut model = BTreeSet::new();
        for op in &ops {
            apply_tree_op(&mut tree, &arena, &mut model, op, false);
        }
        let shift = 12 + order;
        let limit = PHYS_ADDR_LIMIT >> shift;
        let window = window.start.min(limit)..window.end.min(limit);
        let expected: BTreeSet<u64> = model.range(window.clone()).copied().collect();
        let expected: Vec<Range<u64>> = key_runs(&expected)
            .into_iter()
            .map(|r| r.start << shift..r.end << shift)
            .collect();
        let got: Vec<Range<u64>> = tree.runs_in(window.start << shift..window.end << shift).collect();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn multi_order_map_matches_model(ops in prop::collection::vec(map_op(), 1..30)) {
        let arena = Arena::new(ARENA_BASE, 4096);
        let mut map = MultiOrderBitmap::new(&arena);
        let mut model = IntervalModel::default();
        for op in &ops {
            apply_map_op(&mut map, &arena, &mut model, op, false);
            check_map(&map, &arena, &model);
        }
        // Adopting checks that no frame is covered at two orders.
        let adopted = arena.adopt_map(map.roots(), &[arena.ram()]);
        prop_assert!(adopted.is_ok(), "{:?}", adopted.err());
        map.clear_all(&mut &arena);
        prop_assert_eq!(arena.live_frames(), 0);
    }

    #[test]
    fn multi_order_map_survives_running_out_of_frames(
        ops in prop::collection::vec(map_op(), 1..30),
        limit in 0_usize..16,
    ) {
        let arena = Arena::new(ARENA_BASE, 64);
        arena.set_frame_limit(limit);
        let mut map = MultiOrderBitmap::new(&arena);
        let mut model = IntervalModel::default();
        for op in &ops {
            apply_map_op(&mut map, &arena, &mut model, op, true);
            check_map(&map, &arena, &model);
        }
        arena.set_frame_limit(64);
        let adopted = arena.adopt_map(map.roots(), &[arena.ram()]);
        prop_assert!(adopted.is_ok(), "{:?}", adopted.err());
    }

    #[test]
    fn contains_range_matches_model(
        ops in prop::collection::vec(map_op(), 1..20),
        probe in crate::common::frame_range(),
    ) {
        let arena = Arena::new(ARENA_BASE, 4096);
        let mut map = MultiOrderBitmap::new(&arena);
        let mut model = IntervalModel::default();
        for op in &ops {
            apply_map_op(&mut map, &arena, &mut model, op, false);
        }
        let mut missing = IntervalModel::default();
        missing.insert(probe.clone());
        for run in model.runs() {
            missing.remove(run);
        }
        prop_assert_eq!(map.contains_range(probe), missing.frames() == 0);
    }
}
