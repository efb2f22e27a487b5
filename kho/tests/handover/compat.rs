//! Compatibility across record versions, against golden blobs checked into
//! `testdata/`: what a released writer wrote must stay readable.

use kho::{RecordError, StateRecord};

use crate::fixtures::{self, v1, v2, MIB};

/// Written by the version-1 writer (`fixtures::write_v1`).
const GOLDEN_V1: &[u8] = include_bytes!("../../testdata/handover-v1.dtb");
/// Written by the version-2 writer (`fixtures::write_v2`).
const GOLDEN_V2: &[u8] = include_bytes!("../../testdata/handover-v2.dtb");

/// Rewrites the goldens. Only after a deliberate format change, which also
/// bumps `compatible` or a record version: `cargo test -p kho --test handover
/// -- --ignored regenerate_goldens`.
#[test]
#[ignore = "rewrites testdata/; run only after a deliberate format change"]
fn regenerate_goldens() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata");
    std::fs::write(format!("{dir}/handover-v1.dtb"), fixtures::write_v1()).unwrap();
    std::fs::write(format!("{dir}/handover-v2.dtb"), fixtures::write_v2()).unwrap();
}

#[test]
fn writers_still_produce_the_golden_bytes() {
    assert!(fixtures::write_v1() == GOLDEN_V1, "v1 writer output changed");
    assert!(fixtures::write_v2() == GOLDEN_V2, "v2 writer output changed");
}

#[test]
fn v2_reader_reads_v1_blob_with_defaults() {
    let reader = fixtures::read(GOLDEN_V1).unwrap();
    assert_eq!(reader.previous_version(), "0.1.0");
    assert_eq!(reader.update_count(), 1);
    for id in 0..2 {
        let node = reader.subsystem(&format!("partitions/{id}")).unwrap();
        let partition = node.record::<v2::PartitionRecord>().unwrap().unwrap();
        assert_eq!(
            partition,
            v2::PartitionRecord {
                partition_id: id,
                memory_bytes: 256 * MIB,
                stage2_root: fixtures::stage2_root(id),
                vcpu_count: 1,
            }
        );
    }
    let cpus = reader.subsystem("cpus").unwrap();
    let vcpu = cpus.record_named::<v2::VcpuRecord>("vcpu1").unwrap().unwrap();
    assert_eq!(vcpu.pc, 0x4008_0001);
    assert_eq!(vcpu.pending_interrupt, 0, "absent in v1: nothing pending");
}

#[test]
fn v1_reader_reads_v2_records_whose_minimum_it_meets() {
    let reader = fixtures::read(GOLDEN_V2).unwrap();
    assert_eq!(reader.previous_version(), "0.2.0");
    let node = reader.subsystem("partitions/1").unwrap();
    let (name, header) = node.records().next().unwrap();
    assert_eq!((name, header.version, header.min_reader_version), ("partition", 2, 1));
    assert_eq!(
        node.record::<v1::PartitionRecord>().unwrap(),
        Some(v1::PartitionRecord { partition_id: 1, memory_bytes: 256 * MIB, stage2_root: fixtures::stage2_root(1) })
    );
}

#[test]
fn v1_reader_refuses_v2_records_that_need_v2() {
    let reader = fixtures::read(GOLDEN_V2).unwrap();
    let cpus = reader.subsystem("cpus").unwrap();
    assert_eq!(
        cpus.record_named::<v1::VcpuRecord>("vcpu0"),
        Err(RecordError::TooNew { id: v1::VcpuRecord::ID, version: 2, min_reader_version: 2, reader_version: 1 })
    );
}

#[test]
fn v2_reader_reads_v2_blob() {
    let reader = fixtures::read(GOLDEN_V2).unwrap();
    let cpus = reader.subsystem("cpus").unwrap();
    let vcpu = cpus.record_named::<v2::VcpuRecord>("vcpu0").unwrap().unwrap();
    assert_eq!(vcpu.pending_interrupt, 27);
    assert_eq!(
        reader
            .subsystem("partitions/0")
            .unwrap()
            .record::<v2::PartitionRecord>()
            .unwrap()
            .map(|partition| partition.vcpu_count),
        Some(1)
    );
}
