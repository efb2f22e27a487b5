//! Round trips, and every validation rule of the writer and the reader.

use dtoolkit::fdt::Fdt;
use dtoolkit::memreserve::MemoryReservation;
use dtoolkit::model::{DeviceTree, DeviceTreeNode, DeviceTreeProperty};
use kho::{
    BitmapRoot, HandoverError, HandoverIdentity, HandoverReader, HandoverWriter, MemoryError, PhysRange, RecordError,
    ScratchError, ScratchKind, StateRecord, PAGE_SIZE,
};

use crate::fixtures::{self, range, v2, GIB, HANDOVER_BUFFER, HANDOVER_PHYS, MIB};

/// The version-2 handover, edited through dtoolkit's model.
fn edited(edit: impl FnOnce(&mut DeviceTree)) -> Vec<u8> {
    let blob = fixtures::write_v2();
    let mut tree = DeviceTree::from_fdt(&Fdt::new(&blob).unwrap());
    edit(&mut tree);
    tree.to_dtb()
}

fn node<'t>(tree: &'t mut DeviceTree, path: &str) -> &'t mut DeviceTreeNode {
    tree.find_node_mut(path).unwrap()
}

fn cells(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|value| value.to_be_bytes()).collect()
}

fn set(tree: &mut DeviceTree, path: &str, property: &str, value: Vec<u8>) {
    node(tree, path).add_property(DeviceTreeProperty::new(property, value).unwrap());
}

fn global_scratch() -> PhysRange {
    fixtures::scratch().region(ScratchKind::Global).unwrap().range
}

#[test]
fn round_trip_exposes_everything_written() {
    let blob = fixtures::write_v2();
    let reader = fixtures::read(&blob).unwrap();
    assert_eq!(reader.blob(), blob.as_slice());
    assert_eq!(reader.update_count(), 2);
    assert_eq!(reader.previous_version(), "0.2.0");
    assert_eq!(reader.previous_build_id(), "golden-build");
    assert_eq!(reader.scratch(), &fixtures::scratch());
    assert_eq!(reader.bitmap_roots().iter().map(|r| r.order).collect::<Vec<_>>(), [0, 9, 18]);
    assert_eq!(reader.bitmap_root(9), Some(fixtures::BITMAP_ROOT_BASE + 0x1000));
    assert_eq!(reader.bitmap_root(1), None);
    assert_eq!(reader.footprint().base(), HANDOVER_PHYS);
    assert!(reader.footprint().size() >= blob.len() as u64);

    let paths: Vec<_> = reader.subsystems().iter().map(kho::SubsystemNode::path).collect();
    assert_eq!(paths, ["cpus", "iommu", "partitions", "partitions/0", "partitions/1"]);
    let top: Vec<_> = reader.children("").map(kho::SubsystemNode::path).collect();
    assert_eq!(top, ["cpus", "iommu", "partitions"]);
    let partitions: Vec<_> = reader.children("partitions").map(kho::SubsystemNode::path).collect();
    assert_eq!(partitions, ["partitions/0", "partitions/1"]);

    let partition = reader.subsystem("partitions/1").unwrap();
    assert_eq!(partition.pages("stage2-root"), Some(&[range(fixtures::stage2_root(1), 0x1000)][..]));
    assert_eq!(partition.pages("missing"), None);
    assert_eq!(partition.record_named::<v2::PartitionRecord>("other"), Ok(None));
    assert_eq!(reader.subsystem("iommu").unwrap().all_pages().count(), 1);
    assert_eq!(reader.subsystem("iommu").unwrap().records().count(), 0);
    assert!(reader.subsystem("nope").is_none());
    // The blob, three bitmap roots, two stage-2 roots, two IOMMU ranges.
    assert_eq!(reader.preserved_ranges().count(), 8);
}

#[test]
fn blob_size_reads_the_header() {
    let blob = fixtures::write_v1();
    assert_eq!(HandoverReader::blob_size(&blob[..8]), Ok(blob.len()));
    assert_eq!(HandoverReader::blob_size(&blob[..7]), Err(HandoverError::BlobTooSmall { len: 7 }));
    assert_eq!(HandoverReader::blob_size(&[0; 8]), Err(HandoverError::BadMagic));
    let mut huge = blob.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(HandoverReader::blob_size(&huge), Err(HandoverError::TooLarge { .. })));
}

#[test]
fn writer_refuses_preserved_memory_in_scratch() {
    let mut writer = fixtures::writer(&fixtures::identity("0.2.0", 2));
    let in_scratch = range(global_scratch().base() + 0x10_0000, 0x1000);
    assert_eq!(
        writer.subsystem("iommu").unwrap().add_pages("tables", &[in_scratch]),
        Err(HandoverError::Scratch(ScratchError::PreservedOverlapsScratch {
            preserved: in_scratch,
            scratch: fixtures::scratch().region(ScratchKind::Global).unwrap(),
        }))
    );
    assert!(matches!(
        writer.add_bitmap_root(BitmapRoot { order: 1, root: global_scratch().base() }),
        Err(HandoverError::Scratch(ScratchError::PreservedOverlapsScratch { .. }))
    ));
    // The blob itself is preserved too.
    let mut buffer = vec![0; HANDOVER_BUFFER];
    assert!(matches!(
        writer.write_to(&mut buffer, global_scratch().base()),
        Err(HandoverError::Scratch(ScratchError::PreservedOverlapsScratch { .. }))
    ));
}

#[test]
fn writer_refuses_ranges_outside_ram_or_unaligned() {
    let mut writer = fixtures::writer(&fixtures::identity("0.2.0", 2));
    let hole = range(3 * GIB, 0x1000);
    let mut iommu = writer.subsystem("iommu").unwrap();
    assert_eq!(iommu.add_pages("tables", &[hole]), Err(HandoverError::OutsideRam { range: hole }));
    assert!(matches!(
        iommu.add_pages("tables", &[range(GIB + 0x800, 0x1000)]),
        Err(HandoverError::InvalidRange { error: MemoryError::Unaligned { .. }, .. })
    ));
    assert!(matches!(iommu.add_pages("tables", &[]), Err(HandoverError::BadLength { .. })));
    assert!(matches!(
        writer.add_bitmap_root(BitmapRoot { order: 2, root: GIB + 0x10 }),
        Err(HandoverError::InvalidRange { .. })
    ));
    assert_eq!(
        writer.add_bitmap_root(BitmapRoot { order: 9, root: GIB + 0x50_0000 }),
        Err(HandoverError::BitmapOrder { order: 9 })
    );
    assert_eq!(
        writer.add_bitmap_root(BitmapRoot { order: 31, root: GIB + 0x50_0000 }),
        Err(HandoverError::BitmapOrder { order: 31 })
    );
    let mut buffer = vec![0; HANDOVER_BUFFER];
    assert!(matches!(writer.write_to(&mut buffer, 3 * GIB), Err(HandoverError::OutsideRam { .. })));
    assert!(matches!(
        writer.write_to(&mut buffer, HANDOVER_PHYS + 8),
        Err(HandoverError::BlobPlacement(MemoryError::Unaligned { .. }))
    ));
}

#[test]
fn writer_refuses_overlapping_preserved_ranges() {
    let mut writer = fixtures::writer(&fixtures::identity("0.2.0", 2));
    fixtures::add_pages(&mut writer);
    let shared = range(fixtures::stage2_root(0), 0x1000);
    writer.subsystem("cpus").unwrap().add_pages("vcpu-pages", &[shared]).unwrap();
    let mut buffer = vec![0; HANDOVER_BUFFER];
    assert_eq!(
        writer.write_to(&mut buffer, HANDOVER_PHYS),
        Err(HandoverError::Overlap { first: shared, second: shared })
    );
}

#[test]
fn writer_refuses_bad_names_duplicates_and_small_buffers() {
    let mut writer = fixtures::writer(&fixtures::identity("0.2.0", 2));
    for path in ["", "Bad Name", "a//b", "a/b/c/d/e", "/iommu"] {
        assert!(matches!(writer.subsystem(path), Err(HandoverError::InvalidName { .. })), "{path:?}");
    }
    let record = v2::PartitionRecord {
        partition_id: 0,
        memory_bytes: MIB,
        stage2_root: fixtures::stage2_root(0),
        vcpu_count: 1,
    };
    let mut node = writer.subsystem("partitions/0").unwrap();
    assert_eq!(node.path(), "partitions/0");
    assert!(matches!(node.add_record_named("Upper", &record), Err(HandoverError::InvalidName { .. })));
    node.add_record(&record).unwrap();
    assert_eq!(
        node.add_record(&record),
        Err(HandoverError::DuplicateProperty { node: "partitions/0".into(), property: "record-partition".into() })
    );
    let mut buffer = vec![0; 64];
    assert!(matches!(writer.write_to(&mut buffer, HANDOVER_PHYS), Err(HandoverError::BufferTooSmall { have: 64, .. })));
}

#[test]
fn writer_refuses_invalid_identity() {
    let bad = [
        HandoverIdentity { version: "0.2 beta", ..fixtures::identity("0.2.0", 1) },
        HandoverIdentity { build_id: "", ..fixtures::identity("0.2.0", 1) },
    ];
    for identity in bad {
        assert!(matches!(
            HandoverWriter::new(&identity, fixtures::ram(), &fixtures::scratch()),
            Err(HandoverError::InvalidIdentity { .. })
        ));
    }
    assert!(matches!(
        HandoverWriter::new(&fixtures::identity("0.2.0", 0), fixtures::ram(), &fixtures::scratch()),
        Err(HandoverError::InvalidUpdateCount)
    ));
}

#[test]
fn reader_requires_the_exact_compatible() {
    for value in [&b"hvkho-v2\0"[..], b"hvkho-v1", b"hvkho-v1\0extra\0"] {
        let blob = edited(|tree| set(tree, "/", "compatible", value.to_vec()));
        assert!(matches!(fixtures::read(&blob), Err(HandoverError::WrongCompatible)));
    }
}

#[test]
fn reader_refuses_unknown_missing_and_malformed_root_properties() {
    let blob = edited(|tree| set(tree, "/", "extra", vec![]));
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::UnknownProperty { .. })));
    for property in
        ["compatible", "update-count", "previous-version", "previous-build-id", "scratch", "preserved-memory-map"]
    {
        let blob = edited(|tree| {
            tree.root.remove_property(property);
        });
        assert!(
            matches!(
                fixtures::read(&blob),
                Err(HandoverError::MissingProperty { property: p }) if p == property
            ),
            "{property}"
        );
    }
    let blob = edited(|tree| set(tree, "/", "update-count", cells(&[0])));
    assert_eq!(fixtures::read(&blob).unwrap_err(), HandoverError::InvalidUpdateCount);
    let blob = edited(|tree| set(tree, "/", "update-count", vec![0, 1]));
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::BadLength { .. })));
    let blob = edited(|tree| set(tree, "/", "previous-version", b"0.2.0".to_vec()));
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::InvalidIdentity { .. })));
}

#[test]
fn reader_validates_scratch() {
    let global = global_scratch();
    let blob = edited(|tree| set(tree, "/", "scratch", cells(&[global.base(), global.size(), 7])));
    assert_eq!(fixtures::read(&blob).unwrap_err(), HandoverError::UnknownScratchKind { code: 7 });
    let blob = edited(|tree| {
        set(tree, "/", "scratch", cells(&[global.base(), global.size(), 1, global.base(), MIB, 2]));
    });
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::Scratch(ScratchError::Dma32AboveFourGib(_)))));
    let blob = edited(|tree| set(tree, "/", "scratch", cells(&[3 * GIB, MIB, 1])));
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::Scratch(ScratchError::OutsideRam(_)))));
    let blob = edited(|tree| set(tree, "/", "scratch", cells(&[global.base(), global.size()])));
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::BadLength { .. })));
}

#[test]
fn reader_validates_the_memory_map() {
    let root = fixtures::BITMAP_ROOT_BASE;
    let blob = edited(|tree| {
        set(tree, "/", "preserved-memory-map", cells(&[9, root, 0, root + 0x1000]));
    });
    assert_eq!(fixtures::read(&blob).unwrap_err(), HandoverError::BitmapOrder { order: 0 });
    let blob = edited(|tree| {
        set(tree, "/", "preserved-memory-map", cells(&[0, root + 4]));
    });
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::InvalidRange { .. })));
    let blob = edited(|tree| {
        set(tree, "/", "preserved-memory-map", cells(&[0, HANDOVER_PHYS]));
    });
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::Overlap { .. })));
    let blob = edited(|tree| set(tree, "/", "preserved-memory-map", vec![]));
    assert_eq!(fixtures::read(&blob).unwrap().bitmap_roots(), &[]);
}

#[test]
fn reader_refuses_preserved_pages_in_scratch_outside_ram_or_overlapping() {
    let global = global_scratch();
    let cases = [
        (cells(&[global.base() - PAGE_SIZE, 2 * PAGE_SIZE]), "scratch"),
        (cells(&[2 * GIB, PAGE_SIZE]), "outside RAM"),
        (cells(&[fixtures::stage2_root(0), PAGE_SIZE]), "overlap"),
        (cells(&[GIB + 0x300_0000, 0x800]), "unaligned"),
        (cells(&[GIB + 0x300_0000]), "length"),
        (cells(&[GIB + 0x300_0000, 0]), "empty"),
    ];
    for (value, what) in cases {
        let blob = edited(|tree| set(tree, "/iommu", "pages-extra", value));
        let error = fixtures::read(&blob).unwrap_err();
        let expected = match what {
            "scratch" => matches!(error, HandoverError::Scratch(_)),
            "outside RAM" => matches!(error, HandoverError::OutsideRam { .. }),
            "overlap" => matches!(error, HandoverError::Overlap { .. }),
            "length" => matches!(error, HandoverError::BadLength { .. }),
            _ => matches!(error, HandoverError::InvalidRange { .. }),
        };
        assert!(expected, "{what}: {error:?}");
    }
}

#[test]
fn reader_refuses_unknown_node_properties_and_bad_records() {
    let blob = edited(|tree| set(tree, "/cpus", "status", b"okay\0".to_vec()));
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::UnknownProperty { .. })));
    let blob = edited(|tree| set(tree, "/cpus", "record-Bad", vec![]));
    assert!(matches!(fixtures::read(&blob), Err(HandoverError::UnknownProperty { .. })));
    let mut record = v2::VcpuRecord { index: 0, pc: 0x4008_0000, sp: 0x4010_0000, pending_interrupt: 27 }.encode();
    record[20] ^= 1;
    let blob = edited(|tree| set(tree, "/cpus", "record-vcpu0", record));
    assert!(matches!(
        fixtures::read(&blob),
        Err(HandoverError::Record { error: RecordError::ChecksumMismatch { .. }, .. })
    ));
}

#[test]
fn reader_refuses_duplicate_and_too_deep_nodes() {
    let mut blob = fixtures::write_v2();
    // FDT_BEGIN_NODE, "1\0" padded: rename partitions/1 to partitions/0.
    let needle = [0, 0, 0, 1, b'1', 0, 0, 0];
    let at = blob.windows(needle.len()).position(|window| window == needle).unwrap();
    blob[at + 4] = b'0';
    assert_eq!(fixtures::read(&blob).unwrap_err(), HandoverError::DuplicateNode { path: "partitions/0".into() });

    let blob = edited(|tree| node(tree, "/iommu").add_child(DeviceTreeNode::new("queue@0").unwrap()));
    assert_eq!(fixtures::read(&blob).unwrap_err(), HandoverError::InvalidName { name: "iommu/queue@0".into() });

    let blob = edited(|tree| {
        let mut deepest = DeviceTreeNode::new("e").unwrap();
        for name in ["d", "c", "b"] {
            let mut parent = DeviceTreeNode::new(name).unwrap();
            parent.add_child(deepest);
            deepest = parent;
        }
        node(tree, "/iommu").add_child(deepest);
    });
    assert_eq!(fixtures::read(&blob).unwrap_err(), HandoverError::TooDeep { path: "iommu/b/c/d/e".into() });
}

#[test]
fn reader_refuses_bad_blob_placement_and_framing() {
    let blob = fixtures::write_v2();
    let ram = fixtures::ram();
    assert!(matches!(HandoverReader::new(&blob, global_scratch().base(), &ram), Err(HandoverError::Scratch(_))));
    assert!(matches!(HandoverReader::new(&blob, 3 * GIB, &ram), Err(HandoverError::OutsideRam { .. })));
    assert!(matches!(
        HandoverReader::new(&blob, HANDOVER_PHYS + 0x10, &ram),
        Err(HandoverError::BlobPlacement(MemoryError::Unaligned { .. }))
    ));
    assert!(matches!(
        HandoverReader::new(&blob, u64::MAX - 0xfff, &ram),
        Err(HandoverError::BlobPlacement(MemoryError::AddressOverflow { .. }))
    ));
    assert_eq!(
        fixtures::read(&blob[..blob.len() - 1]).unwrap_err(),
        HandoverError::Truncated { totalsize: blob.len(), available: blob.len() - 1 }
    );
    // Trailing bytes past totalsize are not part of the handover.
    let mut padded = blob.clone();
    padded.extend_from_slice(&[0xff; 100]);
    assert_eq!(fixtures::read(&padded).unwrap().blob(), blob.as_slice());

    let blob = edited(|tree| tree.memory_reservations.push(MemoryReservation::new(GIB, MIB)));
    assert_eq!(fixtures::read(&blob).unwrap_err(), HandoverError::MemoryReservations);
    let mut broken = fixtures::write_v2();
    broken[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(fixtures::read(&broken), Err(HandoverError::MalformedFdt(_))));
}
