//! Host tests of the engine, run for both formats on a simulated memory
//! placed at the top of the 48-bit physical address space.

extern crate std;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::testing::TestMemory;
use super::*;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const KIB4: u64 = PAGE_SIZE;

/// 64 GiB of simulated RAM ending at 2^48. Table frames come from its start;
/// guest RAM in the tests is mapped from `GUEST_RAM` upwards.
const RAM_BASE: u64 = ADDRESS_LIMIT - 64 * GIB;
const RAM_SIZE: u64 = 64 * GIB;
const GUEST_RAM: u64 = RAM_BASE + 16 * GIB;
/// A device window outside RAM.
const DEVICE_BASE: u64 = 0x0900_0000;
const DEVICE_SIZE: u64 = 16 * MIB2;

type Table<'m, F> = Stage2Table<F, &'m TestMemory>;

fn memory() -> TestMemory {
    TestMemory::new(RAM_BASE, RAM_SIZE)
}

fn table<F: Stage2Format>(mem: &TestMemory) -> Table<'_, F> {
    Stage2Table::new(&mut { mem }, mem).unwrap()
}

fn map<F: Stage2Format>(t: &mut Table<'_, F>, mem: &TestMemory, ipa: u64, pa: u64, size: u64, attrs: Attrs) {
    t.map(ipa, pa, size, attrs, &mut { mem }).unwrap();
}

fn counts<F: Stage2Format>(t: &Table<'_, F>) -> [u64; 3] {
    BlockSize::ALL.map(|size| t.leaf_count(size))
}

fn leaves<F: Stage2Format>(t: &Table<'_, F>) -> Vec<Mapping> {
    let mut out = Vec::new();
    t.for_each_leaf(|m| out.push(m));
    out
}

/// Maximal runs of contiguous IPA → contiguous PA with equal attributes:
/// a representation that does not depend on the leaf sizes chosen.
fn runs(mappings: impl IntoIterator<Item = (u64, u64, u64, Attrs)>) -> Vec<(u64, u64, u64, Attrs)> {
    let mut out: Vec<(u64, u64, u64, Attrs)> = Vec::new();
    for (ipa, pa, len, attrs) in mappings {
        match out.last_mut() {
            Some(last) if last.0 + last.2 == ipa && last.1 + last.2 == pa && last.3 == attrs => last.2 += len,
            _ => out.push((ipa, pa, len, attrs)),
        }
    }
    out
}

fn table_runs<F: Stage2Format>(t: &Table<'_, F>) -> Vec<(u64, u64, u64, Attrs)> {
    runs(leaves(t).into_iter().map(|m| (m.ipa, m.pa, m.size.bytes(), m.attrs)))
}

/// Generates one `#[test]` per format for each generic test function.
macro_rules! for_every_format {
    ($($name:ident),* $(,)?) => {
        mod arm {
            $(#[test] fn $name() { super::$name::<super::ArmStage2>() })*
        }
        mod ept {
            $(#[test] fn $name() { super::$name::<super::Ept>() })*
        }
        mod npt {
            $(#[test] fn $name() { super::$name::<super::Npt>() })*
        }
    };
}

for_every_format!(
    descriptor_round_trip,
    map_translate_round_trip,
    aligned_gib_uses_one_block,
    unaligned_range_uses_a_mix,
    misaligned_pa_limits_block_size,
    max_block_size_caps_leaves,
    overlap_is_refused_and_changes_nothing,
    bad_arguments_are_refused,
    out_of_frames_changes_nothing,
    unmap_splits_blocks,
    unmap_split_without_frames_changes_nothing,
    free_returns_every_frame,
    adopt_round_trip,
    adopt_rejects_table_outside_ram,
    adopt_rejects_root_outside_ram,
    adopt_rejects_misaligned_root,
    adopt_rejects_cycle,
    adopt_rejects_shared_table,
    adopt_rejects_reserved_bits,
    adopt_checks_every_leaf_of_a_run,
    adopt_rejects_block_at_level0,
    adopt_rejects_leaf_outside_memory,
    adopt_accepts_allowed_device,
    adopt_rejects_leaf_over_table,
    adopt_rejects_garbage_in_invalid_entry,
    adopt_rejects_wrapping_range,
);

fn all_attrs() -> impl Iterator<Item = Attrs> {
    let perms = [Perms::ReadOnly, Perms::ReadWrite, Perms::ReadExec, Perms::ReadWriteExec];
    perms.into_iter().flat_map(|p| [Attrs::ram(p), Attrs { perms: p, mem: MemType::Device }])
}

fn descriptor_round_trip<F: Stage2Format>() {
    for attrs in all_attrs() {
        for size in BlockSize::ALL {
            let pa = RAM_BASE + 3 * size.bytes();
            let raw = F::leaf_descriptor(pa, size, attrs);
            assert_eq!(F::decode(raw, size.level()), Ok(Descriptor::Leaf { pa, attrs }), "{raw:#x}");
        }
    }
    for level in ROOT_LEVEL..LEAF_LEVEL {
        let raw = F::table_descriptor(RAM_BASE + KIB4);
        assert_eq!(F::decode(raw, level), Ok(Descriptor::Table(RAM_BASE + KIB4)));
    }
    for level in ROOT_LEVEL..=LEAF_LEVEL {
        assert_eq!(F::decode(0, level), Ok(Descriptor::Invalid));
    }
}

fn map_translate_round_trip<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    assert_eq!(t.root(), RAM_BASE);
    let rw = Attrs::ram(Perms::ReadWrite);
    let rx = Attrs::ram(Perms::ReadExec);
    map(&mut t, &mem, 0, GUEST_RAM, 8 * MIB2, rw);
    map(&mut t, &mem, 0x4000_0000, GUEST_RAM + GIB, 3 * KIB4, rx);
    map(&mut t, &mem, DEVICE_BASE, DEVICE_BASE, 4 * KIB4, Attrs::device());
    let hit = |ipa| t.translate(ipa).map(|tr| (tr.pa, tr.attrs));
    assert_eq!(hit(0), Some((GUEST_RAM, rw)));
    assert_eq!(hit(0x12_3456), Some((GUEST_RAM + 0x12_3456, rw)));
    assert_eq!(hit(8 * MIB2 - 1), Some((GUEST_RAM + 8 * MIB2 - 1, rw)));
    assert_eq!(hit(8 * MIB2), None);
    assert_eq!(hit(0x4000_2fff), Some((GUEST_RAM + GIB + 0x2fff, rx)));
    assert_eq!(hit(0x4000_3000), None);
    assert_eq!(hit(DEVICE_BASE + 0x10), Some((DEVICE_BASE + 0x10, Attrs::device())));
    assert_eq!(hit(ADDRESS_LIMIT), None);
    assert_eq!(hit(u64::MAX), None);
    assert_eq!(t.translate(0).map(|tr| tr.size), Some(BlockSize::Size2M));
    assert_eq!(t.translate(0x4000_0000).map(|tr| tr.size), Some(BlockSize::Size4K));
    assert_eq!(mem.in_use(), t.table_pages().len());
}

fn aligned_gib_uses_one_block<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    map(&mut t, &mem, GIB, GUEST_RAM, GIB, Attrs::ram(Perms::ReadWriteExec));
    assert_eq!(counts(&t), [0, 0, 1]);
    // The root and one level-1 table: nothing below a 1 GiB leaf.
    assert_eq!(t.table_pages().len(), 2);
    assert_eq!(t.translate(GIB + 0x1234).map(|tr| (tr.pa, tr.size)), Some((GUEST_RAM + 0x1234, BlockSize::Size1G)));
}

fn unaligned_range_uses_a_mix<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    // 4 KiB + 2 MiB below a 1 GiB boundary, 1 GiB, then 2 MiB + 4 KiB.
    let ipa = GIB - MIB2 - KIB4;
    let size = KIB4 + MIB2 + GIB + MIB2 + KIB4;
    map(&mut t, &mem, ipa, GUEST_RAM + ipa, size, Attrs::ram(Perms::ReadWrite));
    assert_eq!(counts(&t), [2, 2, 1]);
    let sizes: Vec<_> = leaves(&t).iter().map(|m| m.size).collect();
    let (small, mid, big) = (BlockSize::Size4K, BlockSize::Size2M, BlockSize::Size1G);
    assert_eq!(sizes, [small, mid, big, mid, small]);
    assert_eq!(table_runs(&t), [(ipa, GUEST_RAM + ipa, size, Attrs::ram(Perms::ReadWrite))]);
}

fn misaligned_pa_limits_block_size<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    // IPA 1 GiB aligned but PA only 2 MiB aligned: 2 MiB leaves.
    map(&mut t, &mem, GIB, GUEST_RAM + MIB2, GIB, Attrs::ram(Perms::ReadWrite));
    assert_eq!(counts(&t), [0, 512, 0]);
    // PA only 4 KiB aligned: 4 KiB leaves.
    map(&mut t, &mem, 4 * GIB, GUEST_RAM + 4 * GIB + KIB4, MIB2, Attrs::ram(Perms::ReadWrite));
    assert_eq!(counts(&t), [512, 512, 0]);
}

fn max_block_size_caps_leaves<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    assert_eq!(t.max_block_size(), BlockSize::Size1G);
    t.set_max_block_size(BlockSize::Size2M);
    map(&mut t, &mem, GIB, GUEST_RAM, GIB, Attrs::ram(Perms::ReadWrite));
    assert_eq!(counts(&t), [0, 512, 0]);
}

fn overlap_is_refused_and_changes_nothing<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    let rw = Attrs::ram(Perms::ReadWrite);
    map(&mut t, &mem, GIB, GUEST_RAM, GIB, rw);
    map(&mut t, &mem, 3 * GIB, GUEST_RAM + GIB, KIB4, rw);
    let before = (leaves(&t), t.table_pages().collect::<Vec<_>>(), mem.in_use());
    for (ipa, size, at) in [
        (GIB - KIB4, 2 * KIB4, GIB),
        (2 * GIB - KIB4, 2 * KIB4, 2 * GIB - KIB4),
        (GIB + MIB2, MIB2, GIB + MIB2),
        (0, 4 * GIB, GIB),
        // Unmapped 2 MiB first, then the 4 KiB page: nothing may stay mapped.
        (3 * GIB - MIB2, MIB2 + KIB4, 3 * GIB),
    ] {
        assert_eq!(t.map(ipa, GUEST_RAM + 8 * GIB, size, rw, &mut { &mem }), Err(MapError::Overlap { ipa: at }));
    }
    assert_eq!((leaves(&t), t.table_pages().collect::<Vec<_>>(), mem.in_use()), before);
    // Neighbours on both sides are fine.
    map(&mut t, &mem, GIB - KIB4, GUEST_RAM + 8 * GIB, KIB4, rw);
    map(&mut t, &mem, 2 * GIB, GUEST_RAM + 9 * GIB, KIB4, rw);
}

fn bad_arguments_are_refused<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    let rw = Attrs::ram(Perms::ReadWrite);
    let mut frames = &mem;
    assert_eq!(t.map(0, 0, 0, rw, &mut frames), Err(MapError::ZeroSize));
    assert_eq!(t.map(0x800, 0, KIB4, rw, &mut frames), Err(MapError::Misaligned { value: 0x800 }));
    assert_eq!(t.map(0, 0x10, KIB4, rw, &mut frames), Err(MapError::Misaligned { value: 0x10 }));
    assert_eq!(t.map(0, 0, 100, rw, &mut frames), Err(MapError::Misaligned { value: 100 }));
    let last = ADDRESS_LIMIT - KIB4;
    assert_eq!(t.map(last, 0, 2 * KIB4, rw, &mut frames), Err(MapError::OutOfRange { addr: last, size: 2 * KIB4 }));
    assert_eq!(t.map(0, last, 2 * KIB4, rw, &mut frames), Err(MapError::OutOfRange { addr: last, size: 2 * KIB4 }));
    let huge = !(KIB4 - 1);
    assert_eq!(t.map(KIB4, 0, huge, rw, &mut frames), Err(MapError::OutOfRange { addr: KIB4, size: huge }));
    assert_eq!(t.unmap(0, 0, &mut frames), Err(MapError::ZeroSize));
    assert_eq!(t.unmap(0x10, KIB4, &mut frames), Err(MapError::Misaligned { value: 0x10 }));
    // The highest page is mappable.
    t.map(last, GUEST_RAM, KIB4, rw, &mut frames).unwrap();
    assert_eq!(t.translate(ADDRESS_LIMIT - 1).map(|tr| tr.pa), Some(GUEST_RAM + KIB4 - 1));
    assert_eq!(t.table_pages().len(), 4);
    for e in [MapError::ZeroSize, MapError::Overlap { ipa: 1 }, MapError::OutOfFrames] {
        assert!(!e.to_string().is_empty());
    }
}

fn out_of_frames_changes_nothing<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    let before = mem.in_use();
    // Four 4 KiB pages at the top of the IPA space need three new tables.
    mem.set_budget(Some(2));
    let ipa = ADDRESS_LIMIT - 4 * KIB4;
    assert_eq!(t.map(ipa, GUEST_RAM, 4 * KIB4, Attrs::ram(Perms::ReadOnly), &mut { &mem }), Err(MapError::OutOfFrames));
    assert_eq!(mem.in_use(), before);
    assert_eq!(t.translate(ipa), None);
    assert_eq!(counts(&t), [0, 0, 0]);
    mem.set_budget(Some(3));
    map(&mut t, &mem, ipa, GUEST_RAM, 4 * KIB4, Attrs::ram(Perms::ReadOnly));
    assert_eq!(counts(&t), [4, 0, 0]);
    mem.set_budget(Some(0));
    assert_eq!(Stage2Table::<F, _>::new(&mut { &mem }, &mem).map(|t| t.root()), Err(MapError::OutOfFrames));
}

fn unmap_splits_blocks<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    let rw = Attrs::ram(Perms::ReadWriteExec);
    map(&mut t, &mem, GIB, GUEST_RAM, GIB, rw);
    let hole = GIB + 5 * MIB2 + 7 * KIB4;
    t.unmap(hole, KIB4, &mut { &mem }).unwrap();
    // 1 GiB -> 512 x 2 MiB, one of which -> 512 x 4 KiB, one of which gone.
    assert_eq!(counts(&t), [511, 511, 0]);
    assert_eq!(t.table_pages().len(), 4);
    assert_eq!(t.translate(hole), None);
    assert_eq!(t.translate(hole - 1).map(|tr| (tr.pa, tr.size)), Some((GUEST_RAM + hole - GIB - 1, BlockSize::Size4K)));
    assert_eq!(t.translate(hole + KIB4).map(|tr| tr.pa), Some(GUEST_RAM + hole + KIB4 - GIB));
    assert_eq!(t.translate(GIB).map(|tr| (tr.pa, tr.size)), Some((GUEST_RAM, BlockSize::Size2M)));
    assert_eq!(
        table_runs(&t),
        [(GIB, GUEST_RAM, hole - GIB, rw), (hole + KIB4, GUEST_RAM + hole + KIB4 - GIB, 2 * GIB - hole - KIB4, rw)]
    );
    // Unmapping across holes and the rest empties the tree; tables stay.
    t.unmap(0, 4 * GIB, &mut { &mem }).unwrap();
    assert_eq!(counts(&t), [0, 0, 0]);
    assert!(leaves(&t).is_empty());
    assert_eq!(mem.in_use(), t.table_pages().len());
    // An emptied table is reused: a new 1 GiB range maps again.
    map(&mut t, &mem, GIB, GUEST_RAM, GIB, rw);
    assert_eq!(t.translate(GIB + 3).map(|tr| tr.pa), Some(GUEST_RAM + 3));
}

fn unmap_split_without_frames_changes_nothing<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    let rw = Attrs::ram(Perms::ReadWrite);
    map(&mut t, &mem, GIB, GUEST_RAM, GIB, rw);
    let before = leaves(&t);
    // Cutting at both ends of a 1 GiB block, at 4 KiB granularity, needs
    // one 2 MiB-level table and two 4 KiB-level ones.
    mem.set_budget(Some(2));
    assert_eq!(t.unmap(GIB + KIB4, 4 * MIB2, &mut { &mem }), Err(MapError::OutOfFrames));
    assert_eq!(leaves(&t), before);
    mem.set_budget(Some(3));
    t.unmap(GIB + KIB4, 4 * MIB2, &mut { &mem }).unwrap();
    // Five 2 MiB entries touched: two split (keeping 1 + 511 pages), three gone.
    assert_eq!(counts(&t), [512, 507, 0]);
}

fn free_returns_every_frame<F: Stage2Format>() {
    let mem = memory();
    let mut t = table::<F>(&mem);
    map(&mut t, &mem, KIB4, GUEST_RAM + KIB4, 3 * GIB, Attrs::ram(Perms::ReadWrite));
    t.unmap(GIB + KIB4, KIB4, &mut { &mem }).unwrap();
    assert!(mem.in_use() > 4);
    t.free(&mut { &mem });
    assert_eq!(mem.in_use(), 0);
}

/// A tree with every leaf size, both memory types and a split block.
fn sample_tree<F: Stage2Format>(mem: &TestMemory) -> Table<'_, F> {
    let mut t = table::<F>(mem);
    // IPA 0 goes through a level-2 table (see `path_to_zero`).
    map(&mut t, mem, 0, GUEST_RAM + MIB2, 2 * MIB2 + 5 * KIB4, Attrs::ram(Perms::ReadWriteExec));
    map(&mut t, mem, 2 * GIB, GUEST_RAM + 2 * GIB, 2 * GIB, Attrs::ram(Perms::ReadWriteExec));
    map(&mut t, mem, 8 * GIB - MIB2, GUEST_RAM + 5 * GIB - MIB2, 2 * MIB2, Attrs::ram(Perms::ReadOnly));
    map(&mut t, mem, DEVICE_BASE + 4 * GIB, DEVICE_BASE, DEVICE_SIZE, Attrs::device());
    t.unmap(2 * GIB + 3 * KIB4, KIB4, &mut { mem }).unwrap();
    t
}

/// The RAM and device ranges the tests adopt with.
const RAM: [(u64, u64); 1] = [(RAM_BASE, RAM_SIZE)];
const DEVICES: [(u64, u64); 1] = [(DEVICE_BASE, DEVICE_SIZE)];

fn adopt<F: Stage2Format>(mem: &TestMemory, root: u64) -> Result<Table<'_, F>, AdoptError> {
    Stage2Table::adopt(root, &RAM, &DEVICES, mem)
}

fn adopt_round_trip<F: Stage2Format>() {
    let mem = memory();
    let built = sample_tree::<F>(&mem);
    assert!(counts(&built).iter().all(|&n| n > 0));
    let in_use = mem.in_use();
    let mut adopted = adopt::<F>(&mem, built.root()).unwrap();
    assert_eq!(adopted.root(), built.root());
    assert!(adopted.table_pages().eq(built.table_pages()));
    assert_eq!(counts(&adopted), counts(&built));
    assert_eq!(leaves(&adopted), leaves(&built));
    for m in leaves(&built) {
        let last = m.ipa + m.size.bytes() - 1;
        assert_eq!(adopted.translate(m.ipa), built.translate(m.ipa));
        assert_eq!(adopted.translate(last), built.translate(last));
    }
    // Nothing was copied or allocated, and the adopted tree keeps working.
    assert_eq!(mem.in_use(), in_use);
    map(&mut adopted, &mem, 16 * GIB, GUEST_RAM + 8 * GIB, GIB, Attrs::ram(Perms::ReadWrite));
    assert_eq!(adopted.translate(16 * GIB).map(|tr| tr.size), Some(BlockSize::Size1G));
    // The empty tree adopts too.
    let empty = table::<F>(&mem);
    assert_eq!(adopt::<F>(&mem, empty.root()).map(|t| t.table_pages().len()), Ok(1));
}

/// The level-0, level-1 and level-2 tables on the way to IPA 0 of a
/// sample tree.
fn path_to_zero<F: Stage2Format>(mem: &TestMemory, root: u64) -> [u64; 3] {
    let mut tables = [root; 3];
    for level in 1..3 {
        match F::decode(mem.read(tables[level - 1], 0), level as u8 - 1) {
            Ok(Descriptor::Table(next)) => tables[level] = next,
            other => panic!("no table at level {level}: {other:?}"),
        }
    }
    tables
}

fn adopt_rejects_table_outside_ram<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let [root, l1, _] = path_to_zero::<F>(&mem, t.root());
    let outside = RAM_BASE - KIB4;
    mem.write(l1, 0, F::table_descriptor(outside));
    assert_eq!(adopt::<F>(&mem, root).err(), Some(AdoptError::TableOutsideRam { level: 2, pa: outside }));
}

fn adopt_rejects_root_outside_ram<F: Stage2Format>() {
    let mem = memory();
    assert_eq!(adopt::<F>(&mem, KIB4).err(), Some(AdoptError::TableOutsideRam { level: 0, pa: KIB4 }));
    let top = !(KIB4 - 1);
    assert_eq!(adopt::<F>(&mem, top).err(), Some(AdoptError::TableOutsideRam { level: 0, pa: top }));
}

fn adopt_rejects_misaligned_root<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let root = t.root() + 8;
    assert_eq!(adopt::<F>(&mem, root).err(), Some(AdoptError::TableMisaligned { level: 0, pa: root }));
}

fn adopt_rejects_cycle<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let [root, l1, l2] = path_to_zero::<F>(&mem, t.root());
    // A level-2 table pointing back at the level-1 table above it.
    mem.write(l2, 511, F::table_descriptor(l1));
    assert_eq!(adopt::<F>(&mem, root).err(), Some(AdoptError::TableRevisited { level: 3, pa: l1 }));
    // A table pointing at itself.
    mem.write(l2, 511, F::table_descriptor(l2));
    assert_eq!(adopt::<F>(&mem, root).err(), Some(AdoptError::TableRevisited { level: 3, pa: l2 }));
}

fn adopt_rejects_shared_table<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let [root, l1, _] = path_to_zero::<F>(&mem, t.root());
    mem.write(root, 7, F::table_descriptor(l1));
    assert_eq!(adopt::<F>(&mem, root).err(), Some(AdoptError::TableRevisited { level: 1, pa: l1 }));
}

fn adopt_rejects_reserved_bits<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let [root, l1, l2] = path_to_zero::<F>(&mem, t.root());
    // Bit 50 is reserved in leaves and tables of both formats.
    let bit50 = 1 << 50;
    let leaf = mem.read(l2, 0);
    mem.write(l2, 0, leaf | bit50);
    let expect = |level, ipa, entry| AdoptError::BadEntry { level, ipa, entry, reason: DescriptorError::ReservedBits };
    assert_eq!(adopt::<F>(&mem, root).err(), Some(expect(2, 0, leaf | bit50)));
    mem.write(l2, 0, leaf);
    let table = mem.read(l1, 0);
    mem.write(l1, 0, table | bit50);
    assert_eq!(adopt::<F>(&mem, root).err(), Some(expect(1, 0, table | bit50)));
    // A leaf whose address has bits below its block size.
    mem.write(l1, 0, table);
    let misaligned = leaf + KIB4;
    mem.write(l2, 0, misaligned);
    assert_eq!(adopt::<F>(&mem, root).err(), Some(expect(2, 0, misaligned)));
}

/// Leaves that continue the one before them (the same descriptor, the
/// next block) are not decoded again, but each is still checked against
/// the memory range: a run that walks off the end of RAM is refused at the
/// first block outside it, and a break in the run is decoded afresh.
fn adopt_checks_every_leaf_of_a_run<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let [root, _, l2] = path_to_zero::<F>(&mem, t.root());
    let leaf = mem.read(l2, 0);
    let p0 = t.translate(0).expect("IPA 0 is mapped").pa;
    let at = |pa: u64| leaf - p0 + pa;
    // RAM with a hole (nothing of the sample tree in it): the run ends
    // where the first range does.
    let end = RAM_BASE + 12 * GIB;
    let ram = [(RAM_BASE, 12 * GIB), (end + 2 * MIB2, RAM_SIZE - 12 * GIB - 2 * MIB2)];
    let adopt = |mem| Stage2Table::<F, _>::adopt(root, &ram, &DEVICES, mem);
    assert!(adopt(&mem).is_ok());
    assert!((100..104).all(|k| mem.read(l2, k) == 0), "free slots in the sample tree");
    mem.write(l2, 100, at(end - 2 * MIB2));
    mem.write(l2, 101, at(end - MIB2));
    let adopted = adopt(&mem).expect("a run inside RAM");
    assert_eq!(adopted.translate(101 * MIB2).map(|tr| tr.pa), Some(end - MIB2));
    mem.write(l2, 102, at(end));
    assert_eq!(adopt(&mem).err(), Some(AdoptError::LeafOutsideMemory { ipa: 102 * MIB2, pa: end, size: MIB2 }));
    // Not the next block: decoded, and its reserved bit found.
    let bit50 = 1 << 50;
    mem.write(l2, 102, at(end - 3 * MIB2) | bit50);
    assert_eq!(
        adopt(&mem).err(),
        Some(AdoptError::BadEntry {
            level: 2,
            ipa: 102 * MIB2,
            entry: at(end - 3 * MIB2) | bit50,
            reason: DescriptorError::ReservedBits
        })
    );
}

fn adopt_rejects_block_at_level0<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let block = F::leaf_descriptor(GUEST_RAM, BlockSize::Size1G, Attrs::ram(Perms::ReadWrite));
    mem.write(t.root(), 3, block);
    let ipa = 3 << 39;
    assert_eq!(
        adopt::<F>(&mem, t.root()).err(),
        Some(AdoptError::BadEntry { level: 0, ipa, entry: block, reason: DescriptorError::ForbiddenLeaf })
    );
}

fn adopt_rejects_leaf_outside_memory<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let [root, _, l2] = path_to_zero::<F>(&mem, t.root());
    let pa = DEVICE_BASE + DEVICE_SIZE;
    mem.write(l2, 1, F::leaf_descriptor(pa, BlockSize::Size2M, Attrs::device()));
    assert_eq!(adopt::<F>(&mem, root).err(), Some(AdoptError::LeafOutsideMemory { ipa: MIB2, pa, size: MIB2 }));
}

fn adopt_accepts_allowed_device<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    // Without the device window the device mapping is refused.
    assert!(matches!(
        Stage2Table::<F, _>::adopt(t.root(), &RAM, &[], &mem),
        Err(AdoptError::LeafOutsideMemory { pa: DEVICE_BASE, .. })
    ));
    // Ranges may come unsorted and split; adjacent ones merge.
    let devices = [(DEVICE_BASE + MIB2, DEVICE_SIZE - MIB2), (0, KIB4), (DEVICE_BASE, MIB2)];
    assert!(Stage2Table::<F, _>::adopt(t.root(), &RAM, &devices, &mem).is_ok());
}

fn adopt_rejects_leaf_over_table<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    let [root, _, l2] = path_to_zero::<F>(&mem, t.root());
    // Map the 2 MiB of RAM holding the tables themselves.
    mem.write(l2, 1, F::leaf_descriptor(RAM_BASE, BlockSize::Size2M, Attrs::ram(Perms::ReadWrite)));
    assert_eq!(adopt::<F>(&mem, root).err(), Some(AdoptError::LeafCoversTable { ipa: MIB2, table: RAM_BASE }));
}

fn adopt_rejects_garbage_in_invalid_entry<F: Stage2Format>() {
    let mem = memory();
    let t = sample_tree::<F>(&mem);
    // Bit 3 set alone: not a valid descriptor in either format.
    mem.write(t.root(), 5, 1 << 3);
    assert!(matches!(
        adopt::<F>(&mem, t.root()),
        Err(AdoptError::BadEntry { level: 0, entry: 8, reason: DescriptorError::ReservedBits, .. })
    ));
}

fn adopt_rejects_wrapping_range<F: Stage2Format>() {
    let mem = memory();
    let t = table::<F>(&mem);
    let bad = [(u64::MAX, 2)];
    let err = Stage2Table::<F, _>::adopt(t.root(), &bad, &[], &mem).err();
    assert_eq!(err, Some(AdoptError::InvalidRange { base: u64::MAX, size: 2 }));
    assert!(err.is_some_and(|e| !e.to_string().is_empty()));
}

#[test]
fn arm_golden_descriptors() {
    let normal = Attrs::ram(Perms::ReadWriteExec);
    // Block, MemAttr 0b1111, S2AP 0b11, SH 0b11, AF.
    assert_eq!(ArmStage2::leaf_descriptor(0x4020_0000, BlockSize::Size2M, normal), 0x4020_07fd);
    // Page, Device-nGnRE, S2AP 0b11, AF, XN 0b10.
    assert_eq!(ArmStage2::leaf_descriptor(0x0900_0000, BlockSize::Size4K, Attrs::device()), 0x0040_0000_0900_04c7);
    // Read-only: S2AP 0b01.
    assert_eq!(
        ArmStage2::leaf_descriptor(0x4000_0000, BlockSize::Size1G, Attrs::ram(Perms::ReadOnly)),
        0x0040_0000_4000_077d
    );
    assert_eq!(ArmStage2::table_descriptor(0x8000_1000), 0x8000_1003);
    assert_eq!(ArmStage2::vttbr(0x8000_1000, 5), 0x0005_0000_8000_1000);
    // T0SZ 16, SL0 0b10, IRGN0/ORGN0 0b01, SH0 0b11, TG0 0b00.
    assert_eq!(ArmStage2::VTCR_GEOMETRY, 0x3590);
}

#[test]
fn arm_rejects_what_it_never_writes() {
    let leaf = ArmStage2::leaf_descriptor(0x4020_0000, BlockSize::Size2M, Attrs::ram(Perms::ReadWrite));
    let page = ArmStage2::leaf_descriptor(0x4020_0000, BlockSize::Size4K, Attrs::ram(Perms::ReadWrite));
    let decode = ArmStage2::decode;
    // A "block" at level 3 is a reserved encoding.
    assert_eq!(decode(page & !0b10, 3), Err(DescriptorError::ForbiddenLeaf));
    // MemAttr 0b0100: normal non-cacheable outer; not ours.
    assert_eq!(decode((leaf & !(0b1111 << 2)) | (0b0100 << 2), 2), Err(DescriptorError::UnsupportedAttributes));
    // Access flag clear, no read permission, XN 0b01, SH 0b10.
    assert_eq!(decode(leaf & !(1 << 10), 2), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(decode(leaf & !(1 << 6), 2), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(decode(leaf | (0b01 << 53), 2), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(decode(leaf & !(0b01 << 8), 2), Err(DescriptorError::UnsupportedAttributes));
    // Software bits and contiguous hint are never written.
    assert_eq!(decode(leaf | (1 << 55), 2), Err(DescriptorError::ReservedBits));
    assert_eq!(decode(leaf | (1 << 52), 2), Err(DescriptorError::ReservedBits));
    // Table descriptors carry no attributes at stage 2.
    assert_eq!(decode(ArmStage2::table_descriptor(0x1000) | (1 << 63), 1), Err(DescriptorError::ReservedBits));
}

#[test]
fn ept_golden_descriptors() {
    // R W X, memory type 6 (WB), ignore PAT, large page.
    assert_eq!(Ept::leaf_descriptor(0x4000_0000, BlockSize::Size1G, Attrs::ram(Perms::ReadWriteExec)), 0x4000_00f7);
    // R W, memory type 0 (UC), ignore PAT.
    assert_eq!(Ept::leaf_descriptor(0x0900_0000, BlockSize::Size4K, Attrs::device()), 0x0900_0043);
    assert_eq!(Ept::leaf_descriptor(0x4020_0000, BlockSize::Size2M, Attrs::ram(Perms::ReadExec)), 0x4020_00f5);
    assert_eq!(Ept::table_descriptor(0x8000_1000), 0x8000_1007);
    // WB paging structures, walk length 4.
    assert_eq!(Ept::eptp(0x8000_1000), 0x8000_101e);
}

#[test]
fn ept_tolerates_accessed_dirty_and_rejects_the_rest() {
    let leaf = Ept::leaf_descriptor(0x4020_0000, BlockSize::Size2M, Attrs::ram(Perms::ReadWrite));
    let page = Ept::leaf_descriptor(0x4020_0000, BlockSize::Size4K, Attrs::ram(Perms::ReadWrite));
    let table = Ept::table_descriptor(0x1000);
    let accessed = 1 << 8;
    let dirty = 1 << 9;
    let ok = Ok(Descriptor::Leaf { pa: 0x4020_0000, attrs: Attrs::ram(Perms::ReadWrite) });
    assert_eq!(Ept::decode(leaf | accessed | dirty, 2), ok);
    assert_eq!(Ept::decode(table | accessed, 1), Ok(Descriptor::Table(0x1000)));
    // Dirty is not a non-leaf bit.
    assert_eq!(Ept::decode(table | dirty, 1), Err(DescriptorError::ReservedBits));
    // Bit 7 in a PTE is ignored by hardware and never written here.
    assert_eq!(Ept::decode(page | (1 << 7), 3), Err(DescriptorError::ReservedBits));
    // Memory type 1 (WC), write without read, execute-only, PAT honoured.
    assert_eq!(Ept::decode(leaf | (1 << 3), 2), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(Ept::decode(leaf & !1, 2), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(Ept::decode((leaf & !0b111) | 0b100, 2), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(Ept::decode(leaf & !(1 << 6), 2), Err(DescriptorError::UnsupportedAttributes));
    // A non-leaf with fewer than all rights is not ours; nor are bits 6:3.
    assert_eq!(Ept::decode(table & !0b100, 1), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(Ept::decode(table | (1 << 4), 0), Err(DescriptorError::ReservedBits));
}

#[test]
fn ept_adopts_tree_with_hardware_set_flags() {
    let mem = memory();
    let t = sample_tree::<Ept>(&mem);
    let [root, l1, l2] = path_to_zero::<Ept>(&mem, t.root());
    for (table, index, bits) in [(root, 0, 1 << 8), (l1, 0, 1 << 8), (l2, 0, 3 << 8)] {
        mem.write(table, index, mem.read(table, index) | bits);
    }
    let adopted = adopt::<Ept>(&mem, root).unwrap();
    assert_eq!(leaves(&adopted), leaves(&t));
}

#[test]
fn npt_golden_descriptors() {
    // P RW U/S, PS, WB (PWT = PCD = 0), executable (NX clear).
    assert_eq!(Npt::leaf_descriptor(0x4000_0000, BlockSize::Size1G, Attrs::ram(Perms::ReadWriteExec)), 0x4000_0087);
    // P RW U/S, PWT PCD (PAT entry 3: UC), NX.
    assert_eq!(Npt::leaf_descriptor(0x0900_0000, BlockSize::Size4K, Attrs::device()), 0x8000_0000_0900_001f);
    // P U/S, PS, read-only and executable.
    assert_eq!(Npt::leaf_descriptor(0x4020_0000, BlockSize::Size2M, Attrs::ram(Perms::ReadExec)), 0x4020_0085);
    // Every level of a nested table grants user access (APM Vol. 2 §15.25.5).
    assert_eq!(Npt::table_descriptor(0x8000_1000), 0x8000_1007);
}

#[test]
fn npt_tolerates_accessed_dirty_and_rejects_the_rest() {
    let leaf = Npt::leaf_descriptor(0x4020_0000, BlockSize::Size2M, Attrs::ram(Perms::ReadWrite));
    let page = Npt::leaf_descriptor(0x4020_0000, BlockSize::Size4K, Attrs::ram(Perms::ReadWrite));
    let table = Npt::table_descriptor(0x1000);
    let accessed = 1 << 5;
    let dirty = 1 << 6;
    let ok = Ok(Descriptor::Leaf { pa: 0x4020_0000, attrs: Attrs::ram(Perms::ReadWrite) });
    assert_eq!(Npt::decode(leaf | accessed | dirty, 2), ok);
    assert_eq!(Npt::decode(table | accessed, 1), Ok(Descriptor::Table(0x1000)));
    // Dirty is never written in a non-leaf entry, nor is PS in a PML4E.
    assert_eq!(Npt::decode(table | dirty, 1), Err(DescriptorError::ReservedBits));
    assert_eq!(Npt::decode(leaf, 0), Err(DescriptorError::ForbiddenLeaf));
    // A PTE's bit 7 is its PAT bit; a large page's is bit 12: never set.
    assert_eq!(Npt::decode(page | (1 << 7), 3), Err(DescriptorError::ReservedBits));
    assert_eq!(Npt::decode(leaf | (1 << 12), 2), Err(DescriptorError::ReservedBits));
    // Global and available bits are never written.
    assert_eq!(Npt::decode(leaf | (1 << 8), 2), Err(DescriptorError::ReservedBits));
    assert_eq!(Npt::decode(leaf | (1 << 52), 2), Err(DescriptorError::ReservedBits));
    // Write-through alone (PAT entry 1: WT) is not a type this engine uses.
    assert_eq!(Npt::decode(leaf | (1 << 3), 2), Err(DescriptorError::UnsupportedAttributes));
    // Without U/S the guest's own walks would fault; not ours either way.
    assert_eq!(Npt::decode(leaf & !(1 << 2), 2), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(Npt::decode(table & !(1 << 2), 1), Err(DescriptorError::UnsupportedAttributes));
    assert_eq!(Npt::decode(table & !(1 << 1), 1), Err(DescriptorError::UnsupportedAttributes));
    // Not present with other bits set.
    assert_eq!(Npt::decode(leaf & !1, 2), Err(DescriptorError::ReservedBits));
}

#[test]
fn npt_adopts_tree_with_hardware_set_flags() {
    let mem = memory();
    let t = sample_tree::<Npt>(&mem);
    let [root, l1, l2] = path_to_zero::<Npt>(&mem, t.root());
    for (table, index, bits) in [(root, 0, 1 << 5), (l1, 0, 1 << 5), (l2, 0, 3 << 5)] {
        mem.write(table, index, mem.read(table, index) | bits);
    }
    let adopted = adopt::<Npt>(&mem, root).unwrap();
    assert_eq!(leaves(&adopted), leaves(&t));
}

#[test]
fn block_size_geometry() {
    for size in BlockSize::ALL {
        assert_eq!(BlockSize::at_level(size.level()), Some(size));
        assert!(!size.to_string().is_empty());
    }
    assert_eq!(BlockSize::at_level(0), None);
    assert_eq!(BlockSize::Size1G.bytes(), GIB);
    assert_eq!(BlockSize::Size1G.smaller(), Some(BlockSize::Size2M));
    assert_eq!(BlockSize::Size4K.smaller(), None);
    assert!(Perms::ReadWriteExec.writable() && Perms::ReadWriteExec.executable());
    assert!(!Perms::ReadOnly.writable() && !Perms::ReadOnly.executable());
    let mem = memory();
    let t = table::<ArmStage2>(&mem);
    assert!(format!("{t:?}").contains("arm-stage2"));
}

// ---- Model test: random maps and unmaps against a BTreeMap of ranges. ----

#[derive(Clone, Debug)]
enum Op {
    Map { ipa: u64, pa: u64, size: u64, attrs: Attrs },
    Unmap { ipa: u64, size: u64 },
}

/// Addresses and sizes built from a unit (4 KiB, 2 MiB or 1 GiB) and
/// sub-unit offsets, so that every leaf size and the splits between them
/// occur, while a 1 GiB-unit range never degrades to 4 KiB pages.
fn op() -> impl Strategy<Value = Op> {
    let unit = prop_oneof![Just(KIB4), Just(MIB2), Just(GIB)];
    let perms = prop_oneof![Just(Perms::ReadOnly), Just(Perms::ReadWrite), Just(Perms::ReadExec)];
    let mem = prop_oneof![3 => Just(MemType::Normal), 1 => Just(MemType::Device)];
    (unit, 0..8u64, 0..3u64, 0..3u64, 0..3u64, 0..3u64, 0..16u64, perms, mem, any::<bool>()).prop_map(
        |(unit, ipa_units, ipa_sub, n_units, n_sub, pa_sub, pa_units, perms, mem, is_map)| {
            let sub = if unit == KIB4 { KIB4 } else { unit / 512 };
            let ipa = ipa_units * unit + ipa_sub * sub;
            let size = (n_units * unit + n_sub * sub).max(sub);
            if is_map {
                let pa = GUEST_RAM + pa_units * unit + pa_sub * sub;
                Op::Map { ipa, pa, size, attrs: Attrs { perms, mem } }
            } else {
                Op::Unmap { ipa, size }
            }
        },
    )
}

/// The reference: IPA start -> (end, PA, attributes), non-overlapping.
type Model = BTreeMap<u64, (u64, u64, Attrs)>;

fn model_overlaps(model: &Model, start: u64, end: u64) -> bool {
    model.range(..end).next_back().is_some_and(|(_, &(e, _, _))| e > start)
}

fn model_unmap(model: &mut Model, start: u64, end: u64) {
    let hit: Vec<_> = model.range(..end).filter(|(_, &(e, _, _))| e > start).map(|(&s, &v)| (s, v)).collect();
    for (s, (e, pa, attrs)) in hit {
        model.remove(&s);
        if s < start {
            model.insert(s, (start, pa, attrs));
        }
        if e > end {
            model.insert(end, (e, pa + (end - s), attrs));
        }
    }
}

fn model_translate(model: &Model, ipa: u64) -> Option<(u64, Attrs)> {
    let (&s, &(e, pa, attrs)) = model.range(..=ipa).next_back()?;
    (ipa < e).then_some((pa + (ipa - s), attrs))
}

fn run_model<F: Stage2Format>(ops: &[Op]) -> Result<(), TestCaseError> {
    let mem = memory();
    let mut t = table::<F>(&mem);
    let mut model = Model::new();
    for op in ops {
        let (start, size) = match *op {
            Op::Map { ipa, pa, size, attrs } => {
                let result = t.map(ipa, pa, size, attrs, &mut { &mem });
                if model_overlaps(&model, ipa, ipa + size) {
                    prop_assert!(matches!(result, Err(MapError::Overlap { .. })), "{op:?}: {result:?}");
                } else {
                    prop_assert_eq!(result, Ok(()), "{:?}", op);
                    model.insert(ipa, (ipa + size, pa, attrs));
                }
                (ipa, size)
            }
            Op::Unmap { ipa, size } => {
                prop_assert_eq!(t.unmap(ipa, size, &mut { &mem }), Ok(()), "{:?}", op);
                model_unmap(&mut model, ipa, ipa + size);
                (ipa, size)
            }
        };
        for probe in [start, start + size / 2, start + size - 1, start + size] {
            let got = t.translate(probe).map(|tr| (tr.pa, tr.attrs));
            prop_assert_eq!(got, model_translate(&model, probe), "probe {:#x} after {:?}", probe, op);
        }
        prop_assert_eq!(mem.in_use(), t.table_pages().len());
    }
    let expected = runs(model.iter().map(|(&s, &(e, pa, attrs))| (s, pa, e - s, attrs)));
    prop_assert_eq!(table_runs(&t), expected);
    let mapped: u64 = BlockSize::ALL.iter().map(|&s| t.leaf_count(s) * s.bytes()).sum();
    prop_assert_eq!(mapped, model.values().map(|&(e, _, _)| e).sum::<u64>() - model.keys().sum::<u64>());
    // Whatever the edits left, it adopts back to the same tree.
    let adopted = Stage2Table::<F, _>::adopt(t.root(), &mem.ram(), &[], &mem);
    prop_assert_eq!(adopted.map(|a| leaves(&a)), Ok(leaves(&t)));
    Ok(())
}

// ---- Random bytes: adopt never panics and accepts only sound trees. ----

/// Words that are mostly zero, often valid-looking tables or leaves pointing
/// into a few RAM pages (so cycles, sharing and leaves over tables happen),
/// sometimes with one bit flipped. Fully random pages have their own test.
fn word<F: Stage2Format + 'static>() -> impl Strategy<Value = u64> {
    let attrs = (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(w, x, device)| Attrs {
        perms: Perms::new(w, x),
        mem: if device { MemType::Device } else { MemType::Normal },
    });
    let size = prop_oneof![Just(BlockSize::Size4K), Just(BlockSize::Size2M), Just(BlockSize::Size1G)];
    let leaf = (size, 0..4u64, attrs)
        .prop_map(|(size, n, attrs)| F::leaf_descriptor(RAM_BASE + n * size.bytes(), size, attrs));
    let table = (0..8u64).prop_map(|page| F::table_descriptor(RAM_BASE + page * KIB4));
    prop_oneof![
        4 => Just(0u64),
        3 => table.clone(),
        3 => leaf.clone(),
        1 => (table, 0..64u32).prop_map(|(word, bit)| word ^ (1 << bit)),
        1 => (leaf, 0..64u32).prop_map(|(word, bit)| word ^ (1 << bit)),
    ]
}

fn adopt_random<F: Stage2Format + 'static>(writes: &[(u64, usize, u64)], root_page: u64) -> Result<(), TestCaseError> {
    let mem = TestMemory::new(RAM_BASE, 4 * GIB);
    for &(page, index, value) in writes {
        mem.write(RAM_BASE + page * KIB4, index, value);
    }
    let root = RAM_BASE + root_page * KIB4;
    if let Ok(t) = Stage2Table::<F, _>::adopt(root, &mem.ram(), &[], &mem) {
        prop_assert_eq!(t.root(), root);
        for pa in t.table_pages() {
            prop_assert!((RAM_BASE..RAM_BASE + 4 * GIB).contains(&pa));
        }
        let mut count = [0u64; 3];
        for m in leaves(&t) {
            count[m.size.index()] += 1;
            prop_assert_eq!(t.translate(m.ipa).map(|tr| tr.pa), Some(m.pa));
        }
        prop_assert_eq!(count, counts(&t));
    }
    Ok(())
}

fn random_writes<F: Stage2Format + 'static>() -> impl Strategy<Value = Vec<(u64, usize, u64)>> {
    // Entry indices cluster at the start so walks reach deep.
    let index = prop_oneof![0..4usize, 0..ENTRIES_PER_TABLE];
    proptest::collection::vec((0..8u64, index, word::<F>()), 0..48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arm_matches_model(ops in proptest::collection::vec(op(), 1..24)) {
        run_model::<ArmStage2>(&ops)?;
    }

    #[test]
    fn ept_matches_model(ops in proptest::collection::vec(op(), 1..24)) {
        run_model::<Ept>(&ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arm_adopt_random_never_panics(writes in random_writes::<ArmStage2>(), root in 0..8u64) {
        adopt_random::<ArmStage2>(&writes, root)?;
    }

    #[test]
    fn ept_adopt_random_never_panics(writes in random_writes::<Ept>(), root in 0..8u64) {
        adopt_random::<Ept>(&writes, root)?;
    }

    #[test]
    fn fully_random_pages_never_panic(words in proptest::collection::vec(any::<u64>(), ENTRIES_PER_TABLE)) {
        let writes: Vec<_> = words.iter().enumerate().map(|(i, &w)| (0, i, w)).collect();
        adopt_random::<ArmStage2>(&writes, 0)?;
        adopt_random::<Ept>(&writes, 0)?;
    }
}
