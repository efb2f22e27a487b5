//! The machine's state table (`kho/ABI.md` §4.7): every partition's and
//! every vCPU's state in one block of preserved memory, fixed-size
//! little-endian entries behind one CRC-32, instead of a handover node
//! and a checksummed record per partition and per vCPU.
//!
//! The records' way costs each partition tens of microseconds of
//! blackout on both sides: a node built, named and serialised, four or
//! five records encoded field by field and checksummed each, and in the
//! new image the whole tree walked and each record checked and decoded
//! again. Here the outgoing image writes each entry in place, in the block
//! it set aside in the brownout, and checksums the block once; the new
//! image checks the checksum once and reads the entries where they are.
//! The fields are the records' own (`records::PartitionRecord`,
//! `ConsoleRecord`, `VcpuRecord`), and the arch's own state of a partition
//! (its virtual GIC or local APICs) is what its record holds, as bytes in
//! a layout the entry names.
//!
//! Entries are `zerocopy` types of little-endian integers and byte arrays:
//! alignment 1, no padding, every bit pattern valid, so any bytes can be
//! read as an entry without `unsafe`, and the layout is the same on both
//! architectures.

use core::fmt;
use core::ops::Range;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::records::{PartitionRecord, StateTableRecord, CMDLINE_BYTES, CONSOLE_LINE_BYTES};

/// The layout this code writes and reads (`StateTableRecord::layout`).
pub const LAYOUT: u32 = 1;
/// Most partitions and vCPUs a table may describe (the handover's node
/// limit was the bound before it: 1024).
pub const MAX_ENTRIES: u32 = 1024;
/// Largest entry stride a reader accepts.
pub const MAX_STRIDE: u32 = 64 * 1024;

/// One partition: the fields of the `partition` and `console` records.
/// Its arch state (the state of its `vgic` or `lapic` record, as bytes)
/// follows it, in the rest of the partition stride.
#[repr(C)]
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct PartitionEntry {
    pub id: U32,
    /// 1 if privileged, else 0.
    pub privileged: U32,
    /// `hvcall::PartitionState` as its wire value.
    pub state: U32,
    pub vmid: U32,
    pub vcpus: U32,
    pub image_format: U32,
    pub cmdline_len: U32,
    /// Bytes of `console` in use: the unfinished console line.
    pub console_len: U32,
    pub ram_host_base: U64,
    pub ram_size: U64,
    pub stage2_root: U64,
    pub image_base: U64,
    pub image_size: U64,
    pub initrd_base: U64,
    pub initrd_size: U64,
    /// Bytes of the arch's state after the entry (0: none).
    pub arch_len: U32,
    /// Their layout (the arch's `TABLE_STATE_LAYOUT`).
    pub arch_layout: U32,
    pub name: [u8; 32],
    pub cmdline: [u8; CMDLINE_BYTES],
    pub console: [u8; CONSOLE_LINE_BYTES],
}

impl PartitionEntry {
    /// Fills the entry from the partition's `partition` record, its
    /// unfinished console line (at most [`CONSOLE_LINE_BYTES`]) and the
    /// layout of the arch state that follows; `arch_len` is set by the
    /// writer of that state.
    pub fn set(&mut self, rec: &PartitionRecord, console: &[u8], arch_layout: u32) {
        self.id = U32::new(rec.id);
        self.privileged = U32::new(u32::from(rec.privileged));
        self.state = U32::new(rec.state);
        self.vmid = U32::new(rec.vmid);
        self.vcpus = U32::new(rec.vcpus);
        self.image_format = U32::new(rec.image_format);
        self.cmdline_len = U32::new(rec.cmdline_len);
        self.ram_host_base = U64::new(rec.ram_host_base);
        self.ram_size = U64::new(rec.ram_size);
        self.stage2_root = U64::new(rec.stage2_root);
        self.image_base = U64::new(rec.image_base);
        self.image_size = U64::new(rec.image_size);
        self.initrd_base = U64::new(rec.initrd_base);
        self.initrd_size = U64::new(rec.initrd_size);
        self.arch_layout = U32::new(arch_layout);
        self.name = rec.name;
        self.cmdline = rec.cmdline;
        let len = console.len().min(CONSOLE_LINE_BYTES);
        self.console_len = U32::new(len as u32);
        self.console = [0; CONSOLE_LINE_BYTES];
        self.console[..len].copy_from_slice(&console[..len]);
    }

    /// The `partition` record the entry holds; `None` if `privileged` is
    /// neither 0 nor 1.
    pub fn record(&self) -> Option<PartitionRecord> {
        let privileged = match self.privileged.get() {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some(PartitionRecord {
            id: self.id.get(),
            name: self.name,
            privileged,
            state: self.state.get(),
            ram_host_base: self.ram_host_base.get(),
            ram_size: self.ram_size.get(),
            stage2_root: self.stage2_root.get(),
            vmid: self.vmid.get(),
            vcpus: self.vcpus.get(),
            image_format: self.image_format.get(),
            image_base: self.image_base.get(),
            image_size: self.image_size.get(),
            initrd_base: self.initrd_base.get(),
            initrd_size: self.initrd_size.get(),
            cmdline_len: self.cmdline_len.get(),
            cmdline: self.cmdline,
        })
    }
}

/// One vCPU: the fields of the `vcpu` record. Its register context (the
/// arch's layout `context_format`) follows it, in the rest of the vCPU
/// stride.
#[repr(C)]
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct VcpuEntry {
    /// The id of its partition.
    pub partition: U32,
    pub index: U32,
    /// The physical CPU it is pinned to.
    pub pcpu: U32,
    /// `sched::VcpuState` as in the `vcpu` record.
    pub state: U32,
    /// Virtual interrupts not yet injected, in the machine's terms (the
    /// `vcpu` record's `pending_private`).
    pub pending: U32,
    pub context_format: U32,
    pub context_len: U32,
    pub reserved: U32,
}

pub const PARTITION_HEAD: usize = core::mem::size_of::<PartitionEntry>();
pub const VCPU_HEAD: usize = core::mem::size_of::<VcpuEntry>();

// The offsets `kho/ABI.md` §4.7 gives.
const _: () = {
    assert!(PARTITION_HEAD == 640 && VCPU_HEAD == 32);
    assert!(core::mem::offset_of!(PartitionEntry, ram_host_base) == 32);
    assert!(core::mem::offset_of!(PartitionEntry, arch_len) == 88);
    assert!(core::mem::offset_of!(PartitionEntry, name) == 96);
    assert!(core::mem::offset_of!(PartitionEntry, console) == 384);
};

/// How many entries a table holds and how far apart they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub partitions: u32,
    pub vcpus: u32,
    pub partition_stride: u32,
    pub vcpu_stride: u32,
}

impl Geometry {
    /// The geometry this image writes: room for `arch_bytes` of arch
    /// record per partition and `context_bytes` of context per vCPU,
    /// strides rounded up to 8 bytes.
    pub fn new(partitions: usize, vcpus: usize, arch_bytes: usize, context_bytes: usize) -> Option<Self> {
        let stride = |head: usize, rest: usize| u32::try_from((head + rest).next_multiple_of(8)).ok();
        Some(Self {
            partitions: u32::try_from(partitions).ok()?,
            vcpus: u32::try_from(vcpus).ok()?,
            partition_stride: stride(PARTITION_HEAD, arch_bytes)?,
            vcpu_stride: stride(VCPU_HEAD, context_bytes)?,
        })
    }

    /// Bytes of the table, if every count and stride is one a reader
    /// accepts.
    pub fn bytes(&self) -> Option<usize> {
        let strides_ok = (PARTITION_HEAD as u32..=MAX_STRIDE).contains(&self.partition_stride)
            && (VCPU_HEAD as u32..=MAX_STRIDE).contains(&self.vcpu_stride);
        if !strides_ok || self.partitions > MAX_ENTRIES || self.vcpus > MAX_ENTRIES {
            return None;
        }
        let p = self.partitions as usize * self.partition_stride as usize;
        Some(p + self.vcpus as usize * self.vcpu_stride as usize)
    }

    /// Whether a table of this geometry fits in `capacity` bytes.
    pub fn fits(&self, capacity: usize) -> bool {
        self.bytes().is_some_and(|b| b <= capacity)
    }

    /// The geometry `rec` describes.
    fn of(rec: &StateTableRecord) -> Self {
        Self {
            partitions: rec.partitions,
            vcpus: rec.vcpus,
            partition_stride: rec.partition_stride,
            vcpu_stride: rec.vcpu_stride,
        }
    }

    /// Where partition `i`'s entry is in the table.
    fn partition_slot(&self, i: usize) -> Range<usize> {
        let stride = self.partition_stride as usize;
        i * stride..(i + 1) * stride
    }

    /// Where vCPU `i`'s entry is: after the last partition's.
    fn vcpu_slot(&self, i: usize) -> Range<usize> {
        let (base, stride) = (self.partitions as usize * self.partition_stride as usize, self.vcpu_stride as usize);
        base + i * stride..base + (i + 1) * stride
    }
}

/// Why a state table was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// A layout this image does not read.
    Layout(u32),
    /// Counts or strides out of range.
    Geometry,
    /// The record's length disagrees with its geometry, or the table is
    /// longer than the pages that hold it.
    Length { bytes: u64, pages: u64 },
    /// The CRC-32 over the table does not match the record's.
    Checksum { expected: u32, actual: u32 },
    /// An entry's own length field runs past its stride.
    EntryLength { what: &'static str, index: u32 },
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layout(_) => f.write_str("state-table-layout"),
            Self::Geometry => f.write_str("state-table-geometry"),
            Self::Length { .. } => f.write_str("state-table-length"),
            Self::Checksum { .. } => f.write_str("state-table-checksum"),
            Self::EntryLength { what, .. } => write!(f, "state-table-{what}-length"),
        }
    }
}

/// A table being written into the block set aside for it.
#[derive(Debug)]
pub struct TableWriter<'a> {
    bytes: &'a mut [u8],
    geometry: Geometry,
}

impl<'a> TableWriter<'a> {
    /// A writer for `geometry` over `block`; `None` if it does not fit.
    pub fn new(block: &'a mut [u8], geometry: Geometry) -> Option<Self> {
        let len = geometry.bytes()?;
        let bytes = block.get_mut(..len)?;
        Some(Self { bytes, geometry })
    }

    /// The entry head in `slot` and the room after it. In range: `new`
    /// checked the geometry's length against the block, every caller's
    /// index is below its count, and a stride is at least its head.
    fn entry<H: FromBytes + IntoBytes + KnownLayout>(&mut self, slot: Range<usize>) -> (&mut H, &mut [u8]) {
        H::mut_from_prefix(&mut self.bytes[slot]).unwrap_or_else(|_| unreachable!())
    }

    /// Partition `i`'s entry and the room for its arch state.
    pub fn partition(&mut self, i: usize) -> (&mut PartitionEntry, &mut [u8]) {
        self.entry(self.geometry.partition_slot(i))
    }

    /// vCPU `i`'s entry and the room for its context.
    pub fn vcpu(&mut self, i: usize) -> (&mut VcpuEntry, &mut [u8]) {
        self.entry(self.geometry.vcpu_slot(i))
    }

    /// The record describing the finished table at `base`.
    pub fn finish(self, base: u64) -> StateTableRecord {
        let g = self.geometry;
        StateTableRecord {
            layout: LAYOUT,
            partitions: g.partitions,
            vcpus: g.vcpus,
            partition_stride: g.partition_stride,
            vcpu_stride: g.vcpu_stride,
            base,
            bytes: self.bytes.len() as u64,
            crc32: kho::crc32(self.bytes),
        }
    }
}

/// A table read back and checked: its checksum, geometry and length.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    bytes: &'a [u8],
    geometry: Geometry,
}

impl<'a> Table<'a> {
    /// Checks the table `rec` describes against `pages`, the bytes of the
    /// preserved range that holds it.
    pub fn parse(rec: &StateTableRecord, pages: &'a [u8]) -> Result<Self, TableError> {
        if rec.layout != LAYOUT {
            return Err(TableError::Layout(rec.layout));
        }
        let geometry = Geometry::of(rec);
        let len = geometry.bytes().ok_or(TableError::Geometry)?;
        let length = TableError::Length { bytes: rec.bytes, pages: pages.len() as u64 };
        if rec.bytes != len as u64 {
            return Err(length);
        }
        let bytes = pages.get(..len).ok_or(length)?;
        let actual = kho::crc32(bytes);
        if actual != rec.crc32 {
            return Err(TableError::Checksum { expected: rec.crc32, actual });
        }
        Ok(Self { bytes, geometry })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The entry head in `slot` and its first `len` bytes after it, `len`
    /// read from the head; `what` names that length in the error.
    fn entry<H: FromBytes + KnownLayout + Immutable>(
        &self,
        slot: Range<usize>,
        len: impl Fn(&H) -> u32,
        (what, index): (&'static str, u32),
    ) -> Result<(&'a H, &'a [u8]), TableError> {
        // In range: `parse` checked the geometry's length, and each caller
        // its index against its count.
        let (head, rest) = H::ref_from_prefix(&self.bytes[slot]).map_err(|_| TableError::Geometry)?;
        let body = rest.get(..len(head) as usize).ok_or(TableError::EntryLength { what, index })?;
        Ok((head, body))
    }

    /// Partition `i`'s entry and its arch state's bytes.
    pub fn partition(&self, i: u32) -> Result<(&'a PartitionEntry, &'a [u8]), TableError> {
        if i >= self.geometry.partitions {
            return Err(TableError::Geometry);
        }
        let slot = self.geometry.partition_slot(i as usize);
        self.entry(slot, |e: &PartitionEntry| e.arch_len.get(), ("partition-arch", i))
    }

    /// vCPU `i`'s entry and its context's bytes.
    pub fn vcpu(&self, i: u32) -> Result<(&'a VcpuEntry, &'a [u8]), TableError> {
        if i >= self.geometry.vcpus {
            return Err(TableError::Geometry);
        }
        let slot = self.geometry.vcpu_slot(i as usize);
        self.entry(slot, |e: &VcpuEntry| e.context_len.get(), ("vcpu-context", i))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use zerocopy::FromZeros;

    fn written(g: Geometry) -> (std::vec::Vec<u8>, StateTableRecord) {
        let mut block = vec![0u8; g.bytes().unwrap() + 100];
        let mut w = TableWriter::new(&mut block, g).unwrap();
        for i in 0..g.partitions as usize {
            let (e, arch) = w.partition(i);
            e.id = U32::new(10 + i as u32);
            e.arch_len = U32::new(3);
            arch[..3].copy_from_slice(b"abc");
        }
        for i in 0..g.vcpus as usize {
            let (e, ctx) = w.vcpu(i);
            e.index = U32::new(i as u32);
            e.context_len = U32::new(8);
            ctx[..8].copy_from_slice(&(0x1000 + i as u64).to_le_bytes());
        }
        let rec = w.finish(0x8000);
        (block, rec)
    }

    #[test]
    fn entries_round_trip_behind_one_checksum() {
        let g = Geometry::new(3, 5, 64, 128).unwrap();
        assert_eq!(g.partition_stride as usize % 8, 0);
        let (block, rec) = written(g);
        assert_eq!(rec.bytes as usize, g.bytes().unwrap());
        let t = Table::parse(&rec, &block).unwrap();
        let (p, arch) = t.partition(2).unwrap();
        assert_eq!((p.id.get(), arch), (12, &b"abc"[..]));
        let (v, ctx) = t.vcpu(4).unwrap();
        assert_eq!(v.index.get(), 4);
        assert_eq!(ctx, 0x1004u64.to_le_bytes());
        assert_eq!(t.vcpu(5).unwrap_err(), TableError::Geometry);
        assert_eq!(t.partition(3).unwrap_err(), TableError::Geometry);
    }

    #[test]
    fn a_partition_record_round_trips_through_its_entry() {
        let rec = PartitionRecord {
            id: 7,
            name: crate::records::text_field("guest7"),
            privileged: true,
            state: 1,
            ram_host_base: 0x4400_0000,
            ram_size: 64 << 20,
            stage2_root: 0x5fc0_4000,
            vmid: 3,
            vcpus: 2,
            image_format: 2,
            image_base: 0x4800_0000,
            image_size: 0x2000,
            initrd_base: 0,
            initrd_size: 0,
            cmdline_len: 4,
            cmdline: crate::records::text_field("a=b1"),
        };
        let mut entry = PartitionEntry::new_zeroed();
        entry.set(&rec, b"half a li", 1);
        assert_eq!(entry.record(), Some(rec));
        assert_eq!((entry.console_len.get(), &entry.console[..9]), (9, &b"half a li"[..]));
        entry.privileged = U32::new(2);
        assert_eq!(entry.record(), None, "privileged is 0 or 1");
    }

    #[test]
    fn a_changed_byte_fails_the_checksum() {
        let g = Geometry::new(2, 2, 16, 16).unwrap();
        let (mut block, rec) = written(g);
        block[PARTITION_HEAD + 1] ^= 1;
        assert!(matches!(Table::parse(&rec, &block), Err(TableError::Checksum { .. })));
    }

    #[test]
    fn geometry_and_length_are_checked_before_anything_is_read() {
        let g = Geometry::new(2, 2, 16, 16).unwrap();
        let (block, rec) = written(g);
        let bad = |f: &dyn Fn(&mut StateTableRecord)| {
            let mut r = rec.clone();
            f(&mut r);
            Table::parse(&r, &block).unwrap_err()
        };
        assert_eq!(bad(&|r| r.layout = 2), TableError::Layout(2));
        assert_eq!(bad(&|r| r.partitions = MAX_ENTRIES + 1), TableError::Geometry);
        assert_eq!(bad(&|r| r.vcpu_stride = 4), TableError::Geometry);
        assert_eq!(bad(&|r| r.partition_stride = MAX_STRIDE + 8), TableError::Geometry);
        assert!(matches!(bad(&|r| r.bytes += 8), TableError::Length { .. }));
        assert!(matches!(bad(&|r| r.vcpus = 3), TableError::Length { .. }));
        // Pages shorter than the table.
        assert!(matches!(Table::parse(&rec, &block[..rec.bytes as usize - 1]), Err(TableError::Length { .. })));
        // Huge counts and strides do not overflow.
        let huge = StateTableRecord { partitions: u32::MAX, partition_stride: u32::MAX, ..rec.clone() };
        assert_eq!(Table::parse(&huge, &block).unwrap_err(), TableError::Geometry);
    }

    #[test]
    fn an_entry_length_past_its_stride_is_refused() {
        let g = Geometry::new(1, 1, 16, 16).unwrap();
        let mut block = vec![0u8; g.bytes().unwrap()];
        let mut w = TableWriter::new(&mut block, g).unwrap();
        w.partition(0).0.arch_len = U32::new(17);
        w.vcpu(0).0.context_len = U32::new(u32::MAX);
        let rec = w.finish(0);
        let t = Table::parse(&rec, &block).unwrap();
        assert_eq!(t.partition(0).unwrap_err(), TableError::EntryLength { what: "partition-arch", index: 0 });
        assert_eq!(t.vcpu(0).unwrap_err(), TableError::EntryLength { what: "vcpu-context", index: 0 });
    }

    #[test]
    fn a_block_too_small_for_the_geometry_is_refused() {
        let g = Geometry::new(2, 2, 16, 16).unwrap();
        let mut block = vec![0u8; g.bytes().unwrap() - 1];
        assert!(TableWriter::new(&mut block, g).is_none());
        assert!(!g.fits(block.len()));
        assert!(g.fits(block.len() + 1));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_reader() {
        // Entries are read from any bytes that pass the checksum: lengths
        // are checked against the stride, nothing else is trusted.
        let g = Geometry::new(2, 3, 24, 40).unwrap();
        for seed in 0u32..200 {
            let mut block = vec![0u8; g.bytes().unwrap()];
            let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
            for b in &mut block {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            let rec = StateTableRecord {
                layout: LAYOUT,
                partitions: 2,
                vcpus: 3,
                partition_stride: g.partition_stride,
                vcpu_stride: g.vcpu_stride,
                base: 0,
                bytes: block.len() as u64,
                crc32: kho::crc32(&block),
            };
            let t = Table::parse(&rec, &block).unwrap();
            for i in 0..3 {
                let _ = t.partition(i);
                let _ = t.vcpu(i);
            }
        }
    }
}
