//! Intel VT-d DMA remapping (Intel Virtualization Technology for Directed
//! I/O, Architecture Specification, rev. 4.1; chapters below refer to it):
//! the first step of the x86 IOMMU (issue 20, item 4). A remapping unit is
//! brought up with translation enabled and every request blocked: a root
//! table whose 256 entries are all not present (§9.1), so any DMA a device
//! issues faults with reason 1 (root entry not present, Appendix A) and is
//! recorded in the unit's fault-recording registers (§7.2.1, §11.4.14),
//! which [`Vtd::take_faults`] drains. No device is passed through.
//!
//! Invalidation goes through the queued-invalidation interface (§6.5.2):
//! a one-page ring of 128-bit descriptors, a context-cache and an IOTLB
//! global invalidation, then an invalidation-wait descriptor that writes a
//! status word the driver polls (§6.5.2.8).
//!
//! The registers (§11.4) are reached through [`VtdRegs`]: [`MmioVtd`] on
//! hardware, `testing::FakeVtd` in host tests. Memory for the root table,
//! the queue and the status word comes from a [`FrameSource`] and is
//! reached through a [`PhysToVirt`], as the SMMU driver's is.
//!
//! Not yet: context entries and second-level tables for assigned devices,
//! adopting a running unit after a live update (its pages are preserved by
//! the caller, and a running unit is left as it is), interrupt remapping.

use core::fmt;
use core::ptr::NonNull;

use crate::memory::{FrameSource, PhysToVirt, PAGE_SIZE};

/// Register offsets (§11.4, Table 11-4).
pub mod reg {
    pub const VER: usize = 0x00;
    pub const CAP: usize = 0x08;
    pub const ECAP: usize = 0x10;
    pub const GCMD: usize = 0x18;
    pub const GSTS: usize = 0x1c;
    pub const RTADDR: usize = 0x20;
    pub const FSTS: usize = 0x34;
    pub const FECTL: usize = 0x38;
    pub const IQH: usize = 0x80;
    pub const IQT: usize = 0x88;
    pub const IQA: usize = 0x90;
    pub const ICS: usize = 0x9c;
}

/// Global command and status bits (§11.4.4, §11.4.5): the same position
/// in both registers.
pub mod gcmd {
    /// Translation enable.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer (one-shot).
    pub const SRTP: u32 = 1 << 30;
    /// Set fault log (one-shot).
    pub const SFL: u32 = 1 << 29;
    /// Write buffer flush (one-shot).
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// Set interrupt remap table pointer (one-shot).
    pub const SIRTP: u32 = 1 << 24;
    /// The one-shot commands, whose status bits must not be written back as
    /// commands.
    pub const ONE_SHOT: u32 = SRTP | SFL | WBF | SIRTP;
}

/// CAP_REG fields (§11.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Supported adjusted guest address widths (bits 12:8): bit 1 3-level
    /// (39-bit), bit 2 4-level (48-bit) second-level tables.
    pub fn sagaw(self) -> u32 {
        ((self.0 >> 8) & 0x1f) as u32
    }
    /// Maximum guest address width (bits 21:16, plus one).
    pub fn mgaw(self) -> u32 {
        ((self.0 >> 16) & 0x3f) as u32 + 1
    }
    /// Offset of the first fault-recording register, in bytes (bits 33:24,
    /// in 16-byte units).
    pub fn fault_record_offset(self) -> usize {
        ((self.0 >> 24) & 0x3ff) as usize * 16
    }
    /// Number of fault-recording registers (bits 47:40, plus one).
    pub fn fault_records(self) -> usize {
        ((self.0 >> 40) & 0xff) as usize + 1
    }
    /// Required write-buffer flushing (bit 4).
    pub fn rwbf(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// DMA read and write draining (bits 55, 54).
    pub fn drain(self) -> (bool, bool) {
        (self.0 & (1 << 55) != 0, self.0 & (1 << 54) != 0)
    }
}

/// ECAP_REG fields (§11.4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecap(pub u64);

impl Ecap {
    /// Page-walk coherency (bit 0): without it, table writes must be
    /// flushed from the CPU caches before the unit may read them.
    pub fn coherent(self) -> bool {
        self.0 & 1 != 0
    }
    /// Queued invalidation (bit 1).
    pub fn queued_invalidation(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// Interrupt remapping (bit 3).
    pub fn interrupt_remapping(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// Pass-through (bit 6).
    pub fn pass_through(self) -> bool {
        self.0 & (1 << 6) != 0
    }
}

/// Queued-invalidation descriptors (§6.5.2), 128 bits: (low, high).
pub mod descriptor {
    /// Context-cache invalidate, global granularity (§6.5.2.1: type 1,
    /// G = 01b in bits 5:4).
    pub const CONTEXT_GLOBAL: (u64, u64) = (0x1 | (0x1 << 4), 0);

    /// IOTLB invalidate, global granularity (§6.5.2.3: type 2, G = 01b),
    /// draining reads (bit 7) and writes (bit 6) where the unit can.
    pub fn iotlb_global(drain_reads: bool, drain_writes: bool) -> (u64, u64) {
        (0x2 | (0x1 << 4) | (u64::from(drain_writes) << 6) | (u64::from(drain_reads) << 7), 0)
    }

    /// Invalidation wait (§6.5.2.8: type 5), status write (SW, bit 5) of
    /// `data` to `status_pa` (4-byte aligned, bits 63:2 of the high half)
    /// once every earlier descriptor has completed; fence (FN, bit 6).
    pub fn wait(data: u32, status_pa: u64) -> (u64, u64) {
        (0x5 | (1 << 5) | (1 << 6) | (u64::from(data) << 32), status_pa & !0x3)
    }

    /// The type of a descriptor (bits 3:0).
    pub fn kind(low: u64) -> u8 {
        (low & 0xf) as u8
    }
}

/// Fault status bits (§11.4.9): primary fault overflow (RW1C), primary
/// pending fault, fault record index (bits 15:8).
pub mod fsts {
    pub const PFO: u32 = 1 << 0;
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    pub fn fault_record_index(fsts: u32) -> usize {
        ((fsts >> 8) & 0xff) as usize
    }
}

/// Interrupt mask of the fault event control register (§11.4.10).
pub const FECTL_IM: u32 = 1 << 31;

/// The high 64 bits of a fault record (§11.4.14): fault (F, bit 127), type
/// (T, bit 126: 1 read, 0 write), fault reason (bits 103:96), source id
/// (bits 79:64).
const FRCD_F: u64 = 1 << 63;
const FRCD_T: u64 = 1 << 62;

/// The architectural registers at fixed offsets end below 0x100 (§11.4):
/// fault records placed over them are a bad CAP value.
const FIXED_REGISTERS: usize = 0x100;
/// Present (bit 0) of a root or context entry (§9.1, §9.3).
const ENTRY_PRESENT: u64 = 1;
/// CAP.SAGAW bit 2: 48-bit, 4-level second-level tables.
const SAGAW_4_LEVEL: u32 = 1 << 2;
/// Context entry AW (bits 66:64, in the upper half): 010b, 48-bit.
const CONTEXT_AW_48: u64 = 0b010;

/// How many bytes of queue: one page of 128-bit descriptors (IQA.QS = 0,
/// 256 entries).
const QUEUE_ENTRIES: usize = 256;
const DESCRIPTOR_BYTES: u64 = 16;
/// What the wait descriptor writes: any non-zero value (the word is
/// cleared before each wait).
const WAIT_DONE: u32 = 0x600d_0001;

/// Reaches a remapping unit's registers. Offsets past [`Self::window`]
/// are never passed: [`Vtd::init`] refuses a unit whose capability
/// registers place fault records outside it.
pub trait VtdRegs {
    /// Bytes of the register set (the DRHD's size).
    fn window(&self) -> usize {
        PAGE_SIZE as usize
    }
    fn read32(&self, offset: usize) -> u32;
    fn read64(&self, offset: usize) -> u64;
    fn write32(&mut self, offset: usize, value: u32);
    fn write64(&mut self, offset: usize, value: u64);
}

/// A remapping unit's register set, by volatile MMIO. An access outside
/// the set reads as 0 and writes nothing.
#[derive(Debug)]
pub struct MmioVtd {
    base: NonNull<u8>,
    bytes: usize,
}

impl MmioVtd {
    /// # Safety
    ///
    /// `base` must map the unit's register set of `bytes` bytes (the
    /// DRHD's register base and size) as device memory, for this driver's
    /// use only, for as long as the returned value is used.
    pub unsafe fn new(base: NonNull<u8>, bytes: usize) -> Self {
        Self { base, bytes }
    }

    fn at<T>(&self, offset: usize) -> Option<*mut T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        // SAFETY: `offset` is inside the register set (checked).
        (end <= self.bytes).then(|| unsafe { self.base.as_ptr().add(offset).cast::<T>() })
    }
}

impl VtdRegs for MmioVtd {
    fn window(&self) -> usize {
        self.bytes
    }

    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: a register of the unit's set (`new`'s contract, `at`).
        self.at::<u32>(offset).map_or(0, |p| unsafe { p.read_volatile() })
    }

    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read32`.
        self.at::<u64>(offset).map_or(0, |p| unsafe { p.read_volatile() })
    }

    fn write32(&mut self, offset: usize, value: u32) {
        if let Some(p) = self.at::<u32>(offset) {
            // SAFETY: as in `read32`.
            unsafe { p.write_volatile(value) }
        }
    }

    fn write64(&mut self, offset: usize, value: u64) {
        if let Some(p) = self.at::<u64>(offset) {
            // SAFETY: as in `read32`.
            unsafe { p.write_volatile(value) }
        }
    }
}

/// Why a unit was not brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtdError {
    /// The unit has no queued invalidation (ECAP.QI).
    NoQueuedInvalidation,
    /// Translation is already on: a unit a previous image (or firmware)
    /// left running is not reset here.
    AlreadyTranslating,
    OutOfMemory,
    /// The status bit a command sets never came (register name, bit).
    CommandTimeout {
        bit: u32,
    },
    /// The wait descriptor's status write never came.
    InvalidationTimeout,
    /// The unit refused a queued descriptor (FSTS.IQE).
    QueueError,
    /// The unit cannot walk 4-level (48-bit) second-level tables
    /// (CAP.SAGAW bit 2), the shape the EPT engine builds.
    NoFourLevelTables,
    /// The second-level table root is not a page address.
    BadTableRoot,
    /// CAP places the fault-recording registers outside the register set.
    FaultRecordsOutsideRegisters,
    /// Adopting a running unit: what its registers or tables say differs
    /// from the state handed over, or lies outside RAM.
    Adopt(&'static str),
}

impl fmt::Display for VtdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoQueuedInvalidation => f.write_str("no-queued-invalidation"),
            Self::AlreadyTranslating => f.write_str("already-translating"),
            Self::OutOfMemory => f.write_str("out-of-memory"),
            Self::CommandTimeout { bit } => write!(f, "gsts-bit-{bit}-timeout"),
            Self::InvalidationTimeout => f.write_str("invalidation-timeout"),
            Self::QueueError => f.write_str("invalidation-queue-error"),
            Self::NoFourLevelTables => f.write_str("no-4-level-tables"),
            Self::BadTableRoot => f.write_str("bad-table-root"),
            Self::FaultRecordsOutsideRegisters => f.write_str("fault-records-outside-registers"),
            Self::Adopt(what) => write!(f, "adopt-{what}"),
        }
    }
}

/// A blocked or faulting DMA request, as the unit recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Requester id: bus (15:8), device (7:3), function (2:0).
    pub source: u16,
    /// Fault reason (Appendix A).
    pub reason: u8,
    /// A read (or atomic) request, else a write.
    pub read: bool,
    /// The page address the request named.
    pub addr: u64,
}

impl Fault {
    /// The fault reason's name (Appendix A, Table A-1), for reports.
    pub fn reason_name(&self) -> &'static str {
        match self.reason {
            0x1 => "root-not-present",
            0x2 => "context-not-present",
            0x3 => "context-invalid",
            0x4 => "beyond-address-width",
            0x5 => "write-not-allowed",
            0x6 => "read-not-allowed",
            0x7 => "table-address-invalid",
            0x8 => "root-table-address-invalid",
            0x9 => "context-table-address-invalid",
            0xa => "root-reserved-bits",
            0xb => "context-reserved-bits",
            0xc => "table-reserved-bits",
            _ => "other",
        }
    }
}

/// Formats a requester id as `BB:DD.F`.
#[derive(Clone, Copy, Debug)]
pub struct Bdf(pub u16);

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.0 >> 8, (self.0 >> 3) & 0x1f, self.0 & 7)
    }
}

/// A remapping unit brought up by [`Vtd::init`].
pub struct Vtd<R, P> {
    regs: R,
    phys: P,
    cap: Cap,
    ecap: Ecap,
    root: u64,
    queue: u64,
    /// Where the wait descriptor writes (the first word of its own page).
    status: u64,
    /// Next free queue slot.
    tail: usize,
    /// Polls of a status before giving up.
    spin_budget: u32,
}

impl<R, P> fmt::Debug for Vtd<R, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vtd").field("root", &self.root).field("queue", &self.queue).finish_non_exhaustive()
    }
}

/// What a running unit's driver hands over across a live update
/// ([`Vtd::state`]), and what [`Vtd::adopt`] checks the unit against: the
/// pages the unit reads and where its queue stands. The caller keeps the
/// pages preserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdState {
    pub root: u64,
    pub queue: u64,
    pub status: u64,
    /// The queue's tail (and head: the queue is drained), in descriptors.
    pub tail: u32,
}

/// What [`Vtd::init`] did, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bringup {
    pub version: u32,
    pub cap: Cap,
    pub ecap: Ecap,
    pub root: u64,
    pub queue: u64,
    /// Descriptors the first invalidation used.
    pub invalidations: usize,
}

impl<R: VtdRegs, P: PhysToVirt> Vtd<R, P> {
    /// Polls of a register or status word before a command is given up.
    pub const DEFAULT_SPIN_BUDGET: u32 = 1 << 22;

    /// Brings the unit up with every DMA blocked: a root table with no
    /// present entry, the invalidation queue on, the caches invalidated
    /// through it, then translation enabled (§10.4's order: root table
    /// pointer, invalidate, enable). `frames` gives the three pages (root
    /// table, queue, status), which the caller keeps for as long as the
    /// unit translates (across live updates too).
    pub fn init(
        regs: R,
        phys: P,
        frames: &mut impl FrameSource,
        spin_budget: u32,
    ) -> Result<(Self, Bringup), VtdError> {
        let version = regs.read32(reg::VER);
        let cap = Cap(regs.read64(reg::CAP));
        let ecap = Ecap(regs.read64(reg::ECAP));
        if !ecap.queued_invalidation() {
            return Err(VtdError::NoQueuedInvalidation);
        }
        check_fault_records(cap, regs.window())?;
        if regs.read32(reg::GSTS) & gcmd::TE != 0 {
            return Err(VtdError::AlreadyTranslating);
        }
        let mut page = || -> Result<u64, VtdError> {
            let pa = frames.alloc_pages(1, PAGE_SIZE).ok_or(VtdError::OutOfMemory)?;
            zero_page(&phys, pa, ecap.coherent());
            Ok(pa)
        };
        let (root, queue, status) = (page()?, page()?, page()?);
        fence();
        let mut vtd = Self { regs, phys, cap, ecap, root, queue, status, tail: 0, spin_budget };
        // Faults are polled, not signalled: the fault event stays masked.
        vtd.regs.write32(reg::FECTL, FECTL_IM);
        // Root table: legacy mode (RTADDR.TTM = 00b, §11.4.6).
        vtd.regs.write64(reg::RTADDR, root);
        vtd.command(gcmd::SRTP)?;
        // Queue: one page, 128-bit descriptors (IQA.DW = 0, QS = 0).
        vtd.regs.write64(reg::IQT, 0);
        vtd.regs.write64(reg::IQA, queue);
        vtd.command(gcmd::QIE)?;
        let invalidations = vtd.invalidate_all()?;
        vtd.command(gcmd::TE)?;
        Ok((vtd, Bringup { version, cap, ecap, root, queue, invalidations }))
    }

    /// Sets one command bit of GCMD, keeping the ones on (GSTS, without
    /// the one-shot commands), and waits for its status bit (§11.4.4).
    fn command(&mut self, bit: u32) -> Result<(), VtdError> {
        let on = self.regs.read32(reg::GSTS) & !gcmd::ONE_SHOT;
        self.regs.write32(reg::GCMD, on | bit);
        for _ in 0..self.spin_budget {
            if self.regs.read32(reg::GSTS) & bit != 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(VtdError::CommandTimeout { bit: bit.trailing_zeros() })
    }

    /// Global context-cache and IOTLB invalidation, then a wait for both:
    /// nothing cached may predate the tables. Returns the descriptors
    /// used.
    pub fn invalidate_all(&mut self) -> Result<usize, VtdError> {
        let (reads, writes) = self.cap.drain();
        let descriptors = [descriptor::CONTEXT_GLOBAL, descriptor::iotlb_global(reads, writes)];
        self.submit_and_wait(&descriptors)?;
        Ok(descriptors.len() + 1)
    }

    /// Queues `descriptors` and a wait descriptor, moves the tail, and
    /// polls the status word the wait writes.
    fn submit_and_wait(&mut self, descriptors: &[(u64, u64)]) -> Result<(), VtdError> {
        self.write_status(0);
        for &d in descriptors.iter().chain(&[descriptor::wait(WAIT_DONE, self.status)]) {
            self.push(d);
        }
        // The descriptors reach memory before the unit is told of them.
        fence();
        self.regs.write64(reg::IQT, self.tail as u64 * DESCRIPTOR_BYTES);
        for _ in 0..self.spin_budget {
            if self.read_status() == WAIT_DONE {
                return Ok(());
            }
            if self.regs.read32(reg::FSTS) & fsts::IQE != 0 {
                self.regs.write32(reg::FSTS, fsts::IQE);
                return Err(VtdError::QueueError);
            }
            core::hint::spin_loop();
        }
        Err(VtdError::InvalidationTimeout)
    }

    fn push(&mut self, (low, high): (u64, u64)) {
        let at = self.queue + self.tail as u64 * DESCRIPTOR_BYTES;
        let page = self.phys.phys_to_virt(self.queue);
        let index = ((at - self.queue) / 8) as usize;
        // SAFETY: `page` is the queue page (PhysToVirt's contract); `index`
        // + 1 < 512 since tail < 256.
        unsafe {
            page.add(index).write_volatile(low);
            page.add(index + 1).write_volatile(high);
        }
        flush_if_needed(page.wrapping_add(index).cast::<u8>(), self.ecap.coherent());
        self.tail = (self.tail + 1) % QUEUE_ENTRIES;
    }

    fn write_status(&self, value: u32) {
        let word = self.phys.phys_to_virt(self.status);
        // SAFETY: the status page (PhysToVirt's contract).
        unsafe { word.write_volatile(u64::from(value)) };
    }

    fn read_status(&self) -> u32 {
        let word = self.phys.phys_to_virt(self.status);
        // SAFETY: as in `write_status`; the unit writes the low 32 bits.
        (unsafe { word.read_volatile() } & 0xffff_ffff) as u32
    }

    /// Points requester `source`'s context entry at a 4-level second-level
    /// table rooted at `table` (the EPT format, §9.8), tagged with domain
    /// `domain`: its untranslated requests are then translated by that
    /// table (TT = 00b, AW = 48-bit) and anything it does not map faults.
    /// The bus's context table is allocated from `frames` on first use.
    /// Caches are invalidated (global context cache and IOTLB) and waited
    /// for before it returns.
    pub fn assign(
        &mut self,
        source: u16,
        domain: u16,
        table: u64,
        frames: &mut impl FrameSource,
    ) -> Result<(), VtdError> {
        if self.cap.sagaw() & SAGAW_4_LEVEL == 0 {
            return Err(VtdError::NoFourLevelTables);
        }
        if table == 0 || !table.is_multiple_of(PAGE_SIZE) {
            return Err(VtdError::BadTableRoot);
        }
        let coherent = self.ecap.coherent();
        let root = self.phys.phys_to_virt(self.root);
        let bus = usize::from(source >> 8);
        // SAFETY: the root table page (PhysToVirt's contract); entry `bus`
        // of 256 is words 2 * bus and 2 * bus + 1.
        let root_low = unsafe { root.add(2 * bus).read_volatile() };
        let context = if root_low & ENTRY_PRESENT != 0 {
            root_low & !(PAGE_SIZE - 1)
        } else {
            let page = frames.alloc_pages(1, PAGE_SIZE).ok_or(VtdError::OutOfMemory)?;
            zero_page(&self.phys, page, coherent);
            fence();
            // SAFETY: as above; the upper half is reserved (zero).
            unsafe {
                root.add(2 * bus + 1).write_volatile(0);
                root.add(2 * bus).write_volatile(page | ENTRY_PRESENT);
            }
            flush_if_needed(root.wrapping_add(2 * bus).cast::<u8>(), coherent);
            page
        };
        let entries = self.phys.phys_to_virt(context);
        let devfn = usize::from(source & 0xff);
        // The upper half first: the unit must never see P with another
        // domain or width (§9.3: AW bits 66:64, DID bits 87:72).
        // SAFETY: the bus's context table page; entry `devfn` of 256.
        unsafe {
            entries.add(2 * devfn).write_volatile(0);
            fence();
            entries.add(2 * devfn + 1).write_volatile(CONTEXT_AW_48 | (u64::from(domain) << 8));
            fence();
            entries.add(2 * devfn).write_volatile(table | ENTRY_PRESENT);
        }
        flush_if_needed(entries.wrapping_add(2 * devfn).cast::<u8>(), coherent);
        self.invalidate_all().map(|_| ())
    }

    /// Drains the fault-recording registers (§7.2.1): each record with F
    /// set, from the index FSTS names, cleared as it is read; an overflow
    /// is cleared too. At most one pass over the records.
    pub fn take_faults(&mut self) -> (alloc::vec::Vec<Fault>, bool) {
        let status = self.regs.read32(reg::FSTS);
        let overflow = status & fsts::PFO != 0;
        let mut faults = alloc::vec::Vec::new();
        if status & fsts::PPF != 0 {
            let count = self.cap.fault_records();
            let first = fsts::fault_record_index(status) % count;
            for k in 0..count {
                let at = self.cap.fault_record_offset() + ((first + k) % count) * 16;
                let high = self.regs.read64(at + 8);
                if high & FRCD_F == 0 {
                    continue;
                }
                let low = self.regs.read64(at);
                faults.push(Fault {
                    source: (high & 0xffff) as u16,
                    reason: ((high >> 32) & 0xff) as u8,
                    read: high & FRCD_T != 0,
                    addr: low & !(PAGE_SIZE - 1),
                });
                // F is write-1-to-clear, in the record's last dword.
                self.regs.write32(at + 12, 1 << 31);
            }
        }
        if overflow {
            self.regs.write32(reg::FSTS, fsts::PFO);
        }
        (faults, overflow)
    }

    pub fn root(&self) -> u64 {
        self.root
    }

    /// The state to hand over ([`VtdState`]).
    pub fn state(&self) -> VtdState {
        VtdState { root: self.root, queue: self.queue, status: self.status, tail: self.tail as u32 }
    }

    /// Takes over a unit a previous image left translating, without
    /// stopping it (translation stays on, DMA keeps flowing): the registers
    /// must say what `state` says (translation and the queue on, the root
    /// table and the queue where it says, the queue drained at its tail),
    /// its pages and every context table a present root entry names must
    /// lie in `ram`, and the queue must still work: a wait descriptor is
    /// sent through it and answered.
    pub fn adopt(
        regs: R,
        phys: P,
        state: &VtdState,
        ram: &[(u64, u64)],
        spin_budget: u32,
    ) -> Result<(Self, Bringup), VtdError> {
        let version = regs.read32(reg::VER);
        let cap = Cap(regs.read64(reg::CAP));
        let ecap = Ecap(regs.read64(reg::ECAP));
        check_fault_records(cap, regs.window())?;
        let gsts = regs.read32(reg::GSTS);
        if gsts & gcmd::TE == 0 || gsts & gcmd::QIE == 0 {
            return Err(VtdError::Adopt("not-translating"));
        }
        if regs.read64(reg::RTADDR) & !(PAGE_SIZE - 1) != state.root || regs.read64(reg::RTADDR) & 0xc00 != 0 {
            return Err(VtdError::Adopt("root-table-moved"));
        }
        if regs.read64(reg::IQA) != state.queue {
            return Err(VtdError::Adopt("queue-moved"));
        }
        let tail = u64::from(state.tail);
        if tail >= QUEUE_ENTRIES as u64
            || regs.read64(reg::IQT) != tail * DESCRIPTOR_BYTES
            || regs.read64(reg::IQH) != tail * DESCRIPTOR_BYTES
        {
            return Err(VtdError::Adopt("queue-not-drained"));
        }
        let in_ram = |pa: u64| {
            pa.is_multiple_of(PAGE_SIZE)
                && ram
                    .iter()
                    .any(|&(base, size)| pa >= base && pa.checked_add(PAGE_SIZE).is_some_and(|e| e <= base + size))
        };
        if !in_ram(state.root) || !in_ram(state.queue) || !in_ram(state.status) {
            return Err(VtdError::Adopt("page-outside-ram"));
        }
        let root = phys.phys_to_virt(state.root);
        for bus in 0..256 {
            // SAFETY: the root table page, in RAM (checked), reachable
            // through `phys` (PhysToVirt's contract).
            let (low, high) = unsafe { (root.add(2 * bus).read_volatile(), root.add(2 * bus + 1).read_volatile()) };
            if low & ENTRY_PRESENT != 0 && (!in_ram(low & !(PAGE_SIZE - 1)) || low & 0xffe != 0 || high != 0) {
                return Err(VtdError::Adopt("bad-root-entry"));
            }
        }
        let mut vtd = Self {
            regs,
            phys,
            cap,
            ecap,
            root: state.root,
            queue: state.queue,
            status: state.status,
            tail: state.tail as usize,
            spin_budget,
        };
        vtd.submit_and_wait(&[])?;
        Ok((vtd, Bringup { version, cap, ecap, root: state.root, queue: state.queue, invalidations: 1 }))
    }

    /// Takes the queue up where another driver of the unit left it: a
    /// newer image that adopted the unit (and sent a descriptor through
    /// the queue) and then gave the machine back to this one. The tail
    /// is read from IQT once the unit has consumed everything up to it
    /// (IQH = IQT).
    pub fn resync_queue(&mut self) -> Result<(), VtdError> {
        let (tail, head) = (self.regs.read64(reg::IQT), self.regs.read64(reg::IQH));
        if tail != head || !tail.is_multiple_of(DESCRIPTOR_BYTES) || tail / DESCRIPTOR_BYTES >= QUEUE_ENTRIES as u64 {
            return Err(VtdError::Adopt("queue-not-drained"));
        }
        self.tail = (tail / DESCRIPTOR_BYTES) as usize;
        Ok(())
    }

    /// The pages the unit reads: root table, queue, status.
    pub fn pages(&self) -> [u64; 3] {
        [self.root, self.queue, self.status]
    }

    /// Whether translation is on (GSTS.TES).
    pub fn translating(&self) -> bool {
        self.regs.read32(reg::GSTS) & gcmd::TE != 0
    }
}

/// The fault-recording registers CAP places must lie inside the register
/// set and past the fixed registers: a unit saying otherwise is refused
/// rather than having other devices' MMIO read as fault records.
fn check_fault_records(cap: Cap, window: usize) -> Result<(), VtdError> {
    let records_end = cap.fault_record_offset() + 16 * cap.fault_records();
    if cap.fault_record_offset() < FIXED_REGISTERS || records_end > window {
        return Err(VtdError::FaultRecordsOutsideRegisters);
    }
    Ok(())
}

fn zero_page<P: PhysToVirt>(phys: &P, pa: u64, coherent: bool) {
    let page = phys.phys_to_virt(pa);
    for i in 0..(PAGE_SIZE / 8) as usize {
        // SAFETY: a page just handed out by the frame source, reachable
        // through `phys` (PhysToVirt's contract).
        unsafe { page.add(i).write_volatile(0) };
    }
    for line in (0..PAGE_SIZE as usize).step_by(64) {
        flush_if_needed(page.cast::<u8>().wrapping_add(line), coherent);
    }
}

/// Orders the driver's memory writes (tables, descriptors, their cache
/// flushes) before its next register write. A no-op off x86_64.
fn fence() {
    #[cfg(all(target_arch = "x86_64", target_os = "none"))]
    // SAFETY: a fence; no other effect.
    unsafe {
        core::arch::asm!("mfence", options(nostack, preserves_flags));
    }
}

/// Writes back the cache line at `p` where the unit's table walks do not
/// snoop the CPU caches (ECAP.C = 0, §6.2.2). A no-op off x86_64.
#[allow(unused_variables)]
fn flush_if_needed(p: *const u8, coherent: bool) {
    #[cfg(all(target_arch = "x86_64", target_os = "none"))]
    if !coherent {
        // SAFETY: CLFLUSH of a line the driver just wrote (a page of its
        // own); it has no other effect.
        unsafe { core::arch::asm!("clflush [{0}]", in(reg) p, options(nostack, preserves_flags)) };
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::memory::FrameSource;
    use crate::testing::{FakeVtd, TestMemory, QEMU_VTD_CAP, QEMU_VTD_ECAP};

    const BASE: u64 = 0x8000_0000;
    /// edu on q35: 00:03.0.
    const EDU: u16 = 3 << 3;

    fn bring_up(mem: &TestMemory) -> (Vtd<&FakeVtd<'_>, &TestMemory>, Bringup, &FakeVtd<'_>) {
        let fake: &FakeVtd<'_> =
            std::boxed::Box::leak(std::boxed::Box::new(FakeVtd::new(mem, QEMU_VTD_CAP, QEMU_VTD_ECAP)));
        let mut frames = mem;
        let (vtd, up) = Vtd::init(fake, mem, &mut frames, 1000).expect("brought up");
        (vtd, up, fake)
    }

    #[test]
    fn qemu_capabilities_decode() {
        let (cap, ecap) = (Cap(QEMU_VTD_CAP), Ecap(QEMU_VTD_ECAP));
        assert_eq!(cap.mgaw(), 48);
        assert_eq!(cap.sagaw() & 0b110, 0b110, "3- and 4-level tables");
        assert_eq!(cap.fault_record_offset(), 0x220);
        assert_eq!(cap.fault_records(), 1);
        assert!(ecap.queued_invalidation() && ecap.interrupt_remapping() && ecap.pass_through());
        assert!(!ecap.coherent());
    }

    #[test]
    fn bring_up_blocks_every_device_with_translation_on() {
        let mem = TestMemory::new(BASE, 16);
        let (vtd, up, fake) = bring_up(&mem);
        assert!(vtd.translating());
        assert_eq!(fake.violations(), std::vec::Vec::<&str>::new());
        // Root table: 256 entries (4 KiB), none present.
        assert!((0..512).all(|i| mem.read(up.root + i * 8) == Some(0)));
        // Context-cache and IOTLB invalidated, then waited for.
        assert_eq!(fake.processed(), [1, 2, 5]);
        assert_eq!(up.invalidations, 3);
        assert_eq!(vtd.pages().len(), 3);
    }

    #[test]
    fn a_blocked_dma_is_recorded_against_its_requester_and_drained_once() {
        let mem = TestMemory::new(BASE, 16);
        let (mut vtd, _, fake) = bring_up(&mem);
        assert_eq!(fake.dma(EDU, 0x4_0123, false), None, "blocked");
        let (faults, overflow) = vtd.take_faults();
        assert!(!overflow);
        assert_eq!(faults, [Fault { source: EDU, reason: 1, read: false, addr: 0x4_0000 }]);
        assert_eq!(faults[0].reason_name(), "root-not-present");
        assert_eq!(std::format!("{}", Bdf(faults[0].source)), "00:03.0");
        assert_eq!(vtd.take_faults(), (std::vec::Vec::new(), false), "a record is taken once");
        // The one record is full: a second fault before the drain overflows.
        assert_eq!(fake.dma(EDU, 0x1000, true), None);
        assert_eq!(fake.dma(EDU, 0x2000, true), None);
        let (faults, overflow) = vtd.take_faults();
        assert!(overflow && faults.len() == 1 && faults[0].read);
        assert_eq!(vtd.take_faults(), (std::vec::Vec::new(), false), "the overflow is cleared");
    }

    /// A 4-level table of the EPT shape by hand: `iova` -> `pa`, 4 KiB,
    /// read and (if `write`) write. One table per level: the IOVAs of a test
    /// stay inside one 2 MiB.
    fn map_4k(mem: &TestMemory, tables: [u64; 4], iova: u64, pa: u64, write: bool) {
        for (level, &t) in tables.iter().enumerate() {
            let index = (iova >> (39 - 9 * level as u32)) & 511;
            let entry = if level == 3 { pa | 1 | (u64::from(write) << 1) } else { tables[level + 1] | 0b111 };
            assert!(mem.write(t + index * 8, entry));
        }
    }

    #[test]
    fn an_assigned_device_is_translated_by_its_table_and_faults_outside_it() {
        let mem = TestMemory::new(BASE, 32);
        let (mut vtd, _, fake) = bring_up(&mem);
        let mut frames = &mem;
        let tables: [u64; 4] = core::array::from_fn(|_| {
            let pa = frames.alloc_pages(1, PAGE_SIZE).expect("page");
            zero_page(&mem, pa, true);
            pa
        });
        let (ram, ro) = (BASE + 0x1_0000, BASE + 0x1_1000);
        map_4k(&mem, tables, 0x10_0000, ram, true);
        map_4k(&mem, tables, 0x10_1000, ro, false);
        let before = fake.processed().len();
        vtd.assign(EDU, 1, tables[0], &mut frames).expect("assigned");
        assert_eq!(fake.processed()[before..], [1, 2, 5], "caches invalidated after the context entry");
        assert_eq!(fake.dma(EDU, 0x10_0008, true), Some(ram + 8), "read through the table");
        assert_eq!(fake.dma(EDU, 0x10_0010, false), Some(ram + 0x10), "write through the table");
        assert_eq!(fake.dma(EDU, 0x10_1000, true), Some(ro), "read of a read-only page");
        assert_eq!(fake.dma(EDU, 0x10_1000, false), None, "write to a read-only page");
        let (faults, _) = vtd.take_faults();
        assert_eq!(faults, [Fault { source: EDU, reason: 5, read: false, addr: 0x10_1000 }]);
        assert_eq!(fake.dma(EDU, 0x10_2000, true), None, "unmapped");
        assert_eq!(vtd.take_faults().0[0].reason, 6);
        // Another function on the same bus has no context entry.
        assert_eq!(fake.dma(EDU + 1, 0x10_0000, true), None);
        assert_eq!(vtd.take_faults().0[0].reason_name(), "context-not-present");
        assert_eq!(vtd.assign(EDU, 1, 0x1234, &mut frames), Err(VtdError::BadTableRoot));
        assert_eq!(fake.violations(), std::vec::Vec::<&str>::new());
    }

    #[test]
    fn a_unit_already_translating_or_without_queued_invalidation_is_refused() {
        let mem = TestMemory::new(BASE, 16);
        let mut frames = &mem;
        let running = FakeVtd::new(&mem, QEMU_VTD_CAP, QEMU_VTD_ECAP);
        running.set_translating();
        assert_eq!(Vtd::init(&running, &mem, &mut frames, 1000).err(), Some(VtdError::AlreadyTranslating));
        let no_qi = FakeVtd::new(&mem, QEMU_VTD_CAP, QEMU_VTD_ECAP & !(1 << 1));
        assert_eq!(Vtd::init(&no_qi, &mem, &mut frames, 1000).err(), Some(VtdError::NoQueuedInvalidation));
    }

    #[test]
    fn a_running_unit_is_adopted_in_place_and_keeps_translating() {
        let mem = TestMemory::new(BASE, 32);
        let (mut vtd, _, fake) = bring_up(&mem);
        let mut frames = &mem;
        let tables: [u64; 4] = core::array::from_fn(|_| {
            let pa = frames.alloc_pages(1, PAGE_SIZE).expect("page");
            zero_page(&mem, pa, true);
            pa
        });
        let ram_page = BASE + 0x1_0000;
        map_4k(&mem, tables, 0x10_0000, ram_page, true);
        vtd.assign(EDU, 1, tables[0], &mut frames).expect("assigned");
        let state = vtd.state();
        let ram = mem.ram();
        // The next image: the same unit, the same memory, nothing reset.
        let (mut adopted, up) = Vtd::adopt(fake, &mem, &state, &ram, 1000).expect("adopted");
        assert_eq!(up.root, state.root);
        assert!(adopted.translating());
        assert_eq!(fake.dma(EDU, 0x10_0008, true), Some(ram_page + 8), "still translated");
        assert_eq!(fake.dma(EDU, 0x30_0000, true), None);
        assert_eq!(adopted.take_faults().0.len(), 1, "faults still recorded");
        assert_eq!(adopted.state().tail, (state.tail + 1) % 256, "the queue answered a wait");
        assert_eq!(fake.violations(), std::vec::Vec::<&str>::new());
    }

    #[test]
    fn adopt_refuses_a_unit_that_is_not_what_was_handed_over() {
        let mem = TestMemory::new(BASE, 32);
        let (vtd, _, fake) = bring_up(&mem);
        let state = vtd.state();
        let ram = mem.ram();
        let adopt = |s: &VtdState, ram: &[(u64, u64)]| Vtd::adopt(fake, &mem, s, ram, 1000).err();
        assert_eq!(
            adopt(&VtdState { root: state.root + 0x1000, ..state }, &ram),
            Some(VtdError::Adopt("root-table-moved"))
        );
        assert_eq!(
            adopt(&VtdState { queue: state.queue + 0x1000, ..state }, &ram),
            Some(VtdError::Adopt("queue-moved"))
        );
        assert_eq!(
            adopt(&VtdState { tail: state.tail + 1, ..state }, &ram),
            Some(VtdError::Adopt("queue-not-drained"))
        );
        assert_eq!(adopt(&VtdState { tail: 300, ..state }, &ram), Some(VtdError::Adopt("queue-not-drained")));
        let elsewhere = [(0x1_0000_0000, 0x1000_0000)];
        assert_eq!(adopt(&state, &elsewhere), Some(VtdError::Adopt("page-outside-ram")));
        // A root entry pointing outside RAM.
        assert!(mem.write(state.root + 16, 0x1_0000_0000 | 1));
        assert_eq!(adopt(&state, &ram), Some(VtdError::Adopt("bad-root-entry")));
        assert!(mem.write(state.root + 16, 0));
        // A unit that is not translating (reset, or never brought up).
        let off = FakeVtd::new(&mem, QEMU_VTD_CAP, QEMU_VTD_ECAP);
        assert_eq!(Vtd::adopt(&off, &mem, &state, &ram, 1000).err(), Some(VtdError::Adopt("not-translating")));
        assert!(Vtd::adopt(fake, &mem, &state, &ram, 1000).is_ok(), "the state as handed over");
    }

    #[test]
    fn a_driver_given_the_unit_back_takes_the_queue_up_where_the_other_left_it() {
        let mem = TestMemory::new(BASE, 16);
        let (mut old, _, fake) = bring_up(&mem);
        let state = old.state();
        // A newer driver adopts the unit (a wait descriptor) and gives it
        // back: the old one's tail is stale.
        let (newer, _) = Vtd::adopt(fake, &mem, &state, &mem.ram(), 1000).unwrap();
        assert_eq!(newer.state().tail, state.tail + 1);
        old.resync_queue().unwrap();
        assert_eq!(old.state(), newer.state());
        assert!(old.invalidate_all().is_ok(), "the queue works after the resync");
    }

    #[test]
    fn fault_records_outside_the_register_set_are_refused() {
        let mem = TestMemory::new(BASE, 16);
        let mut frames = &mem;
        // FRO = 0x3ff (16 368 bytes in) with one page of registers.
        let cap = (QEMU_VTD_CAP & !(0x3ff << 24)) | (0x3ff << 24);
        let fake = FakeVtd::new(&mem, cap, QEMU_VTD_ECAP);
        assert_eq!(Vtd::init(&fake, &mem, &mut frames, 1000).err(), Some(VtdError::FaultRecordsOutsideRegisters));
        // Records over the queue registers.
        let cap = QEMU_VTD_CAP & !(0x3ff << 24) | (0x4 << 24);
        let fake = FakeVtd::new(&mem, cap, QEMU_VTD_ECAP);
        assert_eq!(Vtd::init(&fake, &mem, &mut frames, 1000).err(), Some(VtdError::FaultRecordsOutsideRegisters));
    }

    #[test]
    fn out_of_memory_is_an_error() {
        let mem = TestMemory::new(BASE, 2);
        let mut frames = &mem;
        let fake = FakeVtd::new(&mem, QEMU_VTD_CAP, QEMU_VTD_ECAP);
        assert_eq!(Vtd::init(&fake, &mem, &mut frames, 1000).err(), Some(VtdError::OutOfMemory));
    }

    #[test]
    fn descriptors_encode_as_the_spec_lays_them_out() {
        assert_eq!(descriptor::CONTEXT_GLOBAL, (0x11, 0));
        assert_eq!(descriptor::iotlb_global(true, true), (0xd2, 0));
        assert_eq!(descriptor::iotlb_global(false, false), (0x12, 0));
        assert_eq!(descriptor::wait(0x1234, 0x9000_0004), ((0x1234 << 32) | 0x65, 0x9000_0004));
    }
}
