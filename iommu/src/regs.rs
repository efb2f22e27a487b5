//! The SMMUv3 register file as typed offsets and fields (IHI 0070 §6.2
//! "Register overview" for the memory map, §6.3 "Register formats" for each
//! register), and the [`SmmuRegs`] trait the driver reaches it through.
//!
//! The non-secure programming interface is two 64 KiB pages: page 0 holds
//! the identification, control, stream-table and command-queue registers;
//! page 1, at +0x10000, holds the event-queue producer and consumer
//! indexes (§6.2).

use core::ptr::NonNull;

use crate::bits::Field;

/// Offset of register page 1 from page 0 (§6.2).
pub const PAGE1_OFFSET: usize = 0x1_0000;
/// Bytes of register space the driver touches: pages 0 and 1.
pub const REGISTER_SPAN: usize = 2 * PAGE1_OFFSET;

/// A 32-bit register, by offset from page 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reg32(usize);

/// A 64-bit register, by offset from page 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reg64(usize);

impl Reg32 {
    /// Byte offset from the base of page 0: 4-byte aligned, below
    /// [`REGISTER_SPAN`].
    pub const fn offset(self) -> usize {
        self.0
    }
}

impl Reg64 {
    /// Byte offset from the base of page 0: 8-byte aligned, below
    /// [`REGISTER_SPAN`].
    pub const fn offset(self) -> usize {
        self.0
    }
}

/// SMMU_IDR0: features.
pub const IDR0: Reg32 = Reg32(0x00);
/// SMMU_IDR1: table and queue sizes.
pub const IDR1: Reg32 = Reg32(0x04);
/// SMMU_IDR5: output address size and granules.
pub const IDR5: Reg32 = Reg32(0x14);
/// SMMU_CR0: enables.
pub const CR0: Reg32 = Reg32(0x20);
/// SMMU_CR0ACK: the enables in effect.
pub const CR0ACK: Reg32 = Reg32(0x24);
/// SMMU_CR1: memory attributes of table and queue accesses.
pub const CR1: Reg32 = Reg32(0x28);
/// SMMU_CR2: miscellaneous controls.
pub const CR2: Reg32 = Reg32(0x2c);
/// SMMU_GBPA: what happens to traffic while SMMUEN = 0.
pub const GBPA: Reg32 = Reg32(0x44);
/// SMMU_GERROR: global errors, active while different from GERRORN.
pub const GERROR: Reg32 = Reg32(0x60);
/// SMMU_GERRORN: acknowledges GERROR bits by toggling them.
pub const GERRORN: Reg32 = Reg32(0x64);
/// SMMU_STRTAB_BASE.
pub const STRTAB_BASE: Reg64 = Reg64(0x80);
/// SMMU_STRTAB_BASE_CFG.
pub const STRTAB_BASE_CFG: Reg32 = Reg32(0x88);
/// SMMU_CMDQ_BASE.
pub const CMDQ_BASE: Reg64 = Reg64(0x90);
/// SMMU_CMDQ_PROD (page 0).
pub const CMDQ_PROD: Reg32 = Reg32(0x98);
/// SMMU_CMDQ_CONS (page 0).
pub const CMDQ_CONS: Reg32 = Reg32(0x9c);
/// SMMU_EVENTQ_BASE.
pub const EVENTQ_BASE: Reg64 = Reg64(0xa0);
/// SMMU_EVENTQ_PROD, in page 1.
pub const EVENTQ_PROD: Reg32 = Reg32(PAGE1_OFFSET + 0xa8);
/// SMMU_EVENTQ_CONS, in page 1.
pub const EVENTQ_CONS: Reg32 = Reg32(PAGE1_OFFSET + 0xac);

/// IDR0.S2P: stage-2 translation is implemented.
pub const IDR0_S2P: u32 = 1 << 0;
/// IDR0.TTF, bits [3:2]: translation table formats.
pub(crate) const IDR0_TTF: Field = Field::new(2, 2);
/// IDR0.TTF bit for AArch32 (LPAE) tables; it widens IAS to 40 bits (§3.4).
pub(crate) const IDR0_TTF_AARCH32: u64 = 0b01;
/// IDR0.TTF bit for AArch64 tables, the format the shared table is in.
pub(crate) const IDR0_TTF_AARCH64: u64 = 0b10;
/// IDR0.COHACC: table, queue and translation-table walks are IO-coherent.
pub const IDR0_COHACC: u32 = 1 << 4;
/// IDR0.VMID16: 16-bit VMIDs.
pub const IDR0_VMID16: u32 = 1 << 18;
/// IDR0.TTENDIAN, bits [22:21].
pub(crate) const IDR0_TTENDIAN: Field = Field::new(21, 2);
/// IDR0.TTENDIAN = 0b11: big-endian walks only.
pub(crate) const IDR0_TTENDIAN_BIG_ONLY: u64 = 0b11;
/// IDR0.STALL_MODEL, bits [25:24].
pub(crate) const IDR0_STALL_MODEL: Field = Field::new(24, 2);
/// IDR0.STALL_MODEL = 0b10: faults always stall and need CMD_RESUME.
pub(crate) const IDR0_STALL_MODEL_FORCED: u64 = 0b10;
/// IDR0.ST_LEVEL, bits [28:27]: stream table formats.
pub(crate) const IDR0_ST_LEVEL: Field = Field::new(27, 2);
pub(crate) const IDR0_ST_LEVEL_LINEAR: u64 = 0b00;
pub(crate) const IDR0_ST_LEVEL_TWO: u64 = 0b01;

/// IDR1.SIDSIZE, bits [5:0]: StreamID width.
pub(crate) const IDR1_SIDSIZE: Field = Field::new(0, 6);
/// IDR1.EVENTQS, bits [20:16]: log2 of the largest event queue.
pub(crate) const IDR1_EVENTQS: Field = Field::new(16, 5);
/// IDR1.CMDQS, bits [25:21]: log2 of the largest command queue.
pub(crate) const IDR1_CMDQS: Field = Field::new(21, 5);
/// IDR1.REL, QUEUES_PRESET, TABLES_PRESET: base addresses are fixed or
/// relative, so software cannot place the tables and queues.
pub const IDR1_REL: u32 = 1 << 28;
pub const IDR1_QUEUES_PRESET: u32 = 1 << 29;
pub const IDR1_TABLES_PRESET: u32 = 1 << 30;

/// IDR5.OAS, bits [2:0]: output address size.
pub(crate) const IDR5_OAS: Field = Field::new(0, 3);
/// IDR5.GRAN4K: the 4 KiB granule is supported.
pub const IDR5_GRAN4K: u32 = 1 << 4;

/// SMMU_CR0 and SMMU_CR0ACK enables.
pub const CR0_SMMUEN: u32 = 1 << 0;
pub const CR0_PRIQEN: u32 = 1 << 1;
pub const CR0_EVENTQEN: u32 = 1 << 2;
pub const CR0_CMDQEN: u32 = 1 << 3;
/// Every CR0 enable this driver decides: the others stay 0.
pub const CR0_ENABLES: u32 = CR0_SMMUEN | CR0_PRIQEN | CR0_EVENTQEN | CR0_CMDQEN;

/// SMMU_CR1 fields: cacheability and shareability of queue and table
/// accesses.
pub(crate) const CR1_QUEUE_IC: Field = Field::new(0, 2);
pub(crate) const CR1_QUEUE_OC: Field = Field::new(2, 2);
pub(crate) const CR1_QUEUE_SH: Field = Field::new(4, 2);
pub(crate) const CR1_TABLE_IC: Field = Field::new(6, 2);
pub(crate) const CR1_TABLE_OC: Field = Field::new(8, 2);
pub(crate) const CR1_TABLE_SH: Field = Field::new(10, 2);
/// Cacheability 0b01: normal write-back cacheable.
pub(crate) const CACHE_WB: u64 = 0b01;
/// Shareability 0b11: inner shareable.
pub(crate) const SHARE_INNER: u64 = 0b11;

/// SMMU_CR2.RECINVSID: record C_BAD_STREAMID events.
pub const CR2_RECINVSID: u32 = 1 << 1;

/// SMMU_GBPA.ABORT: abort all incoming traffic while SMMUEN = 0.
pub const GBPA_ABORT: u32 = 1 << 20;
/// SMMU_GBPA.UPDATE: written as 1 to commit the other fields; reads 1 until done.
pub const GBPA_UPDATE: u32 = 1 << 31;

/// SMMU_GERROR/GERRORN bits (§7.5, global errors).
pub const GERROR_CMDQ_ERR: u32 = 1 << 0;
pub const GERROR_SFM_ERR: u32 = 1 << 8;

/// SMMU_STRTAB_BASE.RA: read-allocate hint for table fetches.
pub(crate) const STRTAB_BASE_RA: u64 = 1 << 62;
/// SMMU_STRTAB_BASE.ADDR, bits [51:6].
pub(crate) const STRTAB_BASE_ADDR: u64 = crate::bits::address_field(6);

/// SMMU_STRTAB_BASE_CFG fields: LOG2SIZE [5:0], SPLIT [10:6], FMT [17:16].
pub(crate) const STRTAB_CFG_LOG2SIZE: Field = Field::new(0, 6);
pub(crate) const STRTAB_CFG_SPLIT: Field = Field::new(6, 5);
pub(crate) const STRTAB_CFG_FMT: Field = Field::new(16, 2);
pub(crate) const STRTAB_FMT_LINEAR: u64 = 0b00;
pub(crate) const STRTAB_FMT_TWO_LEVEL: u64 = 0b01;

/// SMMU_CMDQ_BASE and SMMU_EVENTQ_BASE: RA/WA allocation hint at bit 62,
/// ADDR in bits [51:5], LOG2SIZE in bits [4:0].
pub(crate) const QUEUE_BASE_ALLOCATE: u64 = 1 << 62;
pub(crate) const QUEUE_BASE_ADDR: u64 = crate::bits::address_field(5);
pub(crate) const QUEUE_BASE_LOG2SIZE: Field = Field::new(0, 5);

/// SMMU_CMDQ_CONS.ERR, bits [30:24]: the CERROR of a rejected command.
pub(crate) const CMDQ_CONS_ERR: Field = Field::new(24, 7);
/// SMMU_EVENTQ_PROD.OVFLG and SMMU_EVENTQ_CONS.OVACKFLG, bit 31: the event
/// queue overflowed; acknowledged by copying OVFLG into OVACKFLG (§7.2).
pub const EVENTQ_OVERFLOW: u32 = 1 << 31;

/// How the driver reads and writes the SMMU's registers.
///
/// Register accesses are ordered with the driver's accesses to the memory
/// the SMMU reads and writes (stream table, queues): a write is observed by
/// the SMMU after every earlier store this CPU made to that memory, and a
/// read completes before any later load from it (Linux's `writel`/`readl`
/// semantics). [`MmioRegs`] provides that with barriers.
pub trait SmmuRegs {
    fn read32(&self, reg: Reg32) -> u32;
    fn write32(&mut self, reg: Reg32, value: u32);
    fn read64(&self, reg: Reg64) -> u64;
    fn write64(&mut self, reg: Reg64, value: u64);
}

impl<T: SmmuRegs + ?Sized> SmmuRegs for &mut T {
    fn read32(&self, reg: Reg32) -> u32 {
        (**self).read32(reg)
    }

    fn write32(&mut self, reg: Reg32, value: u32) {
        (**self).write32(reg, value);
    }

    fn read64(&self, reg: Reg64) -> u64 {
        (**self).read64(reg)
    }

    fn write64(&mut self, reg: Reg64, value: u64) {
        (**self).write64(reg, value);
    }
}

/// The register file mapped as device memory.
#[derive(Debug)]
pub struct MmioRegs {
    base: NonNull<u8>,
}

impl MmioRegs {
    /// # Safety
    ///
    /// `base` must map register pages 0 and 1 of one SMMU
    /// ([`REGISTER_SPAN`] bytes) as device memory, readable and writable,
    /// for as long as the returned value is in use, and nothing else may
    /// program that SMMU meanwhile.
    pub const unsafe fn new(base: NonNull<u8>) -> MmioRegs {
        MmioRegs { base }
    }
}

// SAFETY: the pointer names device registers, not memory owned by a
// thread, and `new`'s caller gave this value sole use of them: moving it to
// another CPU moves that sole use along.
unsafe impl Send for MmioRegs {}

impl SmmuRegs for MmioRegs {
    fn read32(&self, reg: Reg32) -> u32 {
        // SAFETY: `Reg32` offsets are 4-byte aligned and inside
        // REGISTER_SPAN, which `new`'s caller promised is mapped device
        // memory.
        let value = unsafe { self.base.add(reg.offset()).cast::<u32>().read_volatile() };
        after_mmio_read();
        value
    }

    fn write32(&mut self, reg: Reg32, value: u32) {
        before_mmio_write();
        // SAFETY: as in `read32`.
        unsafe { self.base.add(reg.offset()).cast::<u32>().write_volatile(value) }
    }

    fn read64(&self, reg: Reg64) -> u64 {
        // SAFETY: `Reg64` offsets are 8-byte aligned and inside
        // REGISTER_SPAN; 64-bit registers allow single-copy atomic 64-bit
        // accesses (§6.2).
        let value = unsafe { self.base.add(reg.offset()).cast::<u64>().read_volatile() };
        after_mmio_read();
        value
    }

    fn write64(&mut self, reg: Reg64, value: u64) {
        before_mmio_write();
        // SAFETY: as in `read64`.
        unsafe { self.base.add(reg.offset()).cast::<u64>().write_volatile(value) }
    }
}

/// Orders earlier accesses to normal memory before the register write that
/// hands them to the SMMU: stores of STEs and commands before CMDQ_PROD,
/// and loads of event records before EVENTQ_CONS gives them back. Hence a
/// full DMB OSH, not Linux `writel`'s store-only one (Arm ARM B2.3).
fn before_mmio_write() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a DMB only orders memory accesses; it has no other effect.
    // Without `nomem` it is also a compiler barrier, which is the point.
    unsafe {
        core::arch::asm!("dmb osh", options(nostack, preserves_flags));
    }
    #[cfg(not(target_arch = "aarch64"))]
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

/// Orders a register read (a producer index) before later loads from the
/// memory it describes (event records): DMB OSHLD, as Linux's `readl`.
fn after_mmio_read() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as in `before_mmio_write`.
    unsafe {
        core::arch::asm!("dmb oshld", options(nostack, preserves_flags));
    }
    #[cfg(not(target_arch = "aarch64"))]
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}
