//! A fixed machine and a fixed handover, shared by the integration tests and
//! the golden blobs in `testdata/`.

use kho::{
    BitmapRoot, HandoverError, HandoverIdentity, HandoverReader, HandoverWriter, PhysRange, RamMap, ScratchNeeds,
    ScratchPlan, ScratchPolicy,
};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Where the handover blob lives: the first page of RAM.
pub const HANDOVER_PHYS: u64 = GIB;

/// Size of the preserved buffer the handover is written into.
pub const HANDOVER_BUFFER: usize = 64 * 1024;

/// Page of the bitmap root for order 0; orders 9 and 18 follow it.
pub const BITMAP_ROOT_BASE: u64 = GIB + 0x10_0000;

/// 1 GiB below 4 GiB (like QEMU `virt`) and 1 GiB above.
pub fn ram() -> RamMap {
    RamMap::new(&[range(GIB, GIB), range(4 * GIB, GIB)]).unwrap()
}

pub fn range(base: u64, size: u64) -> PhysRange {
    PhysRange::new(base, size).unwrap()
}

pub fn needs() -> ScratchNeeds {
    ScratchNeeds { image_bytes: 4 * MIB, heap_bytes: 12 * MIB, dma32_bytes: 8 * MIB }
}

/// The first-boot plan: 32 MiB global at the top of high RAM, 16 MiB DMA32
/// at the top of low RAM.
pub fn scratch() -> ScratchPlan {
    ScratchPlan::plan(&ram(), &needs(), &ScratchPolicy::default(), &[range(GIB, 0x20_0000)]).unwrap()
}

pub fn identity(version: &'static str, update_count: u64) -> HandoverIdentity<'static> {
    HandoverIdentity { version, build_id: "golden-build", update_count }
}

/// A writer with the bitmap roots of orders 0, 9 and 18.
pub fn writer(identity: &HandoverIdentity<'_>) -> HandoverWriter {
    let mut writer = HandoverWriter::new(identity, ram(), &scratch()).unwrap();
    for (index, order) in [0, 9, 18].into_iter().enumerate() {
        writer.add_bitmap_root(BitmapRoot { order, root: BITMAP_ROOT_BASE + 0x1000 * index as u64 }).unwrap();
    }
    writer
}

/// Writes the handover and returns exactly its bytes.
pub fn finish(writer: &HandoverWriter) -> Vec<u8> {
    let mut buffer = vec![0; HANDOVER_BUFFER];
    let len = writer.write_to(&mut buffer, HANDOVER_PHYS).unwrap();
    buffer.truncate(len);
    buffer
}

pub fn read(blob: &[u8]) -> Result<HandoverReader<'_>, HandoverError> {
    HandoverReader::new(blob, HANDOVER_PHYS, &ram())
}

/// Version 1 of the test record types.
pub mod v1 {
    kho::state_record! {
        /// A partition as version 1 knew it.
        pub struct PartitionRecord {
            const ID = 0x0000_0100;
            const NAME = "partition";
            const VERSION = 1;
            const MIN_READER_VERSION = 1;
            pub partition_id: u32 [since 1],
            pub memory_bytes: u64 [since 1],
            pub stage2_root: u64 [since 1],
        }
    }

    kho::state_record! {
        /// A vCPU as version 1 knew it.
        pub struct VcpuRecord {
            const ID = 0x0000_0200;
            const NAME = "vcpu";
            const VERSION = 1;
            const MIN_READER_VERSION = 1;
            pub index: u32 [since 1],
            pub pc: u64 [since 1],
            pub sp: u64 [since 1],
        }
    }
}

/// Version 2: the partition record gains a field old readers may ignore,
/// the vCPU record one they must not (a pending interrupt would be lost), so
/// it needs a version-2 reader.
pub mod v2 {
    kho::state_record! {
        /// A partition as version 2 knows it.
        pub struct PartitionRecord {
            const ID = 0x0000_0100;
            const NAME = "partition";
            const VERSION = 2;
            const MIN_READER_VERSION = 1;
            pub partition_id: u32 [since 1],
            pub memory_bytes: u64 [since 1],
            pub stage2_root: u64 [since 1],
            pub vcpu_count: u32 [since 2, default 1],
        }
    }

    kho::state_record! {
        /// A vCPU as version 2 knows it.
        pub struct VcpuRecord {
            const ID = 0x0000_0200;
            const NAME = "vcpu";
            const VERSION = 2;
            const MIN_READER_VERSION = 2;
            pub index: u32 [since 1],
            pub pc: u64 [since 1],
            pub sp: u64 [since 1],
            pub pending_interrupt: u32 [since 2],
        }
    }
}

/// Stage-2 root table page of partition `id`.
pub fn stage2_root(id: u32) -> u64 {
    GIB + 0x100_0000 + u64::from(id) * 0x1_0000
}

/// Adds what every handover in these tests has apart from records: the
/// partitions' stage-2 roots and the IOMMU's tables.
pub fn add_pages(writer: &mut HandoverWriter) {
    for id in 0..2 {
        writer
            .subsystem(&format!("partitions/{id}"))
            .unwrap()
            .add_pages("stage2-root", &[range(stage2_root(id), 0x1000)])
            .unwrap();
    }
    writer
        .subsystem("iommu")
        .unwrap()
        .add_pages("tables", &[range(GIB + 0x200_0000, 0x2000), range(4 * GIB, 0x4000)])
        .unwrap();
}

/// The version-1 handover: two partitions and two vCPUs.
pub fn write_v1() -> Vec<u8> {
    let mut writer = writer(&identity("0.1.0", 1));
    add_pages(&mut writer);
    for id in 0..2 {
        writer
            .subsystem(&format!("partitions/{id}"))
            .unwrap()
            .add_record(&v1::PartitionRecord {
                partition_id: id,
                memory_bytes: 256 * MIB,
                stage2_root: stage2_root(id),
            })
            .unwrap();
    }
    let mut cpus = writer.subsystem("cpus").unwrap();
    for index in 0..2 {
        cpus.add_record_named(
            &format!("vcpu{index}"),
            &v1::VcpuRecord { index, pc: 0x4008_0000 + u64::from(index), sp: 0x4010_0000 },
        )
        .unwrap();
    }
    finish(&writer)
}

/// The same handover written by version 2.
pub fn write_v2() -> Vec<u8> {
    let mut writer = writer(&identity("0.2.0", 2));
    add_pages(&mut writer);
    for id in 0..2 {
        writer
            .subsystem(&format!("partitions/{id}"))
            .unwrap()
            .add_record(&v2::PartitionRecord {
                partition_id: id,
                memory_bytes: 256 * MIB,
                stage2_root: stage2_root(id),
                vcpu_count: 1,
            })
            .unwrap();
    }
    let mut cpus = writer.subsystem("cpus").unwrap();
    for index in 0..2 {
        cpus.add_record_named(
            &format!("vcpu{index}"),
            &v2::VcpuRecord { index, pc: 0x4008_0000 + u64::from(index), sp: 0x4010_0000, pending_interrupt: 27 },
        )
        .unwrap();
    }
    finish(&writer)
}
