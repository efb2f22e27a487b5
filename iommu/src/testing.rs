//! Host-side fakes for tests (feature `testing`): simulated physical memory
//! and an SMMUv3 register file that behaves enough like the real one (and
//! like QEMU's) to exercise the driver.
//!
//! - [`TestMemory`] is a run of pages at any physical base. `&TestMemory` is
//!   both the [`FrameSource`] and the [`PhysToVirt`] of a driver built on
//!   it; it hands out pages filled with garbage, so the driver must
//!   initialise what it relies on. A driver touching a page outside it
//!   panics here: that is a bug in the code under test.
//! - [`FakeSmmu`] models the registers the driver uses: IDR0/1/5, the
//!   CR0/CR0ACK handshake (optionally delayed), GBPA, GERROR/GERRORN,
//!   STRTAB_BASE(_CFG), the queue bases and indexes. It consumes the
//!   command queue from memory when PROD is written, logging each command
//!   and, for CFGI_STE, the STE it would fetch at that moment; it can stall,
//!   reject a command (CERROR), and write event records. It also records
//!   every register write and every rule the driver broke (a base written
//!   while enabled, CR0 written while GBPA allowed bypass, ...).

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell, UnsafeCell};
use core::fmt;

use crate::command::{Command, COMMAND_BYTES};
use crate::event::{EVENT_BYTES, EVENT_WORDS};
use crate::memory::{FrameSource, PhysToVirt, PAGE_SIZE, WORD_BYTES};
use crate::probe::AddressSize;
use crate::queue::Ring;
use crate::regs::{
    Reg32, Reg64, SmmuRegs, CMDQ_BASE, CMDQ_CONS, CMDQ_CONS_ERR, CMDQ_PROD, CR0, CR0ACK, CR0_CMDQEN, CR0_EVENTQEN,
    CR0_SMMUEN, CR1, CR2, EVENTQ_BASE, EVENTQ_CONS, EVENTQ_OVERFLOW, EVENTQ_PROD, GBPA, GBPA_ABORT, GBPA_UPDATE,
    GERROR, GERRORN, GERROR_CMDQ_ERR, IDR0, IDR1, IDR1_CMDQS, IDR1_EVENTQS, IDR1_SIDSIZE, IDR5, IDR5_GRAN4K, IDR5_OAS,
    QUEUE_BASE_ADDR, QUEUE_BASE_LOG2SIZE, STRTAB_BASE, STRTAB_BASE_ADDR, STRTAB_BASE_CFG, STRTAB_CFG_FMT,
    STRTAB_CFG_LOG2SIZE, STRTAB_CFG_SPLIT, STRTAB_FMT_TWO_LEVEL,
};
use crate::ste::{STE_BYTES, STE_WORDS};
use crate::stream_table::l1_descriptor_fields;

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;
/// What fresh and freed pages are filled with.
pub const GARBAGE: u64 = 0xa5a5_a5a5_a5a5_a5a5;

#[repr(C, align(4096))]
struct Page(UnsafeCell<[u64; WORDS_PER_PAGE]>);

/// Simulated physical memory: `pages` pages from `base`.
pub struct TestMemory {
    base: u64,
    pages: Box<[Page]>,
    allocated: RefCell<Vec<bool>>,
    /// Allocations still allowed, if limited.
    budget: Cell<Option<usize>>,
}

impl fmt::Debug for TestMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestMemory")
            .field("base", &self.base)
            .field("pages", &self.pages.len())
            .field("in_use", &self.pages_in_use())
            .finish_non_exhaustive()
    }
}

impl TestMemory {
    /// RAM of `pages` pages at `base` (page aligned), all garbage.
    pub fn new(base: u64, pages: usize) -> TestMemory {
        assert!(base.is_multiple_of(PAGE_SIZE), "test RAM must be page aligned");
        let pages: Box<[Page]> = (0..pages).map(|_| Page(UnsafeCell::new([GARBAGE; WORDS_PER_PAGE]))).collect();
        let count = pages.len();
        TestMemory { base, pages, allocated: RefCell::new(vec![false; count]), budget: Cell::new(None) }
    }

    /// A copy of this memory: contents, allocations and budget.
    #[must_use]
    pub fn duplicate(&self) -> TestMemory {
        let pages: Box<[Page]> = self
            .pages
            .iter()
            // SAFETY: the page is live and only accessed one thread at a
            // time (see `read`); the copy is taken before any other access.
            .map(|page| Page(UnsafeCell::new(unsafe { *page.0.get() })))
            .collect();
        TestMemory {
            base: self.base,
            pages,
            allocated: RefCell::new(self.allocated.borrow().clone()),
            budget: Cell::new(self.budget.get()),
        }
    }

    /// The RAM range, as `Smmu::adopt` takes it.
    pub fn ram(&self) -> [(u64, u64); 1] {
        [(self.base, self.pages.len() as u64 * PAGE_SIZE)]
    }

    /// Lets only `allocations` more runs be handed out (`None`: no limit).
    pub fn set_budget(&self, allocations: Option<usize>) {
        self.budget.set(allocations);
    }

    /// Pages handed out and not given back.
    pub fn pages_in_use(&self) -> usize {
        self.allocated.borrow().iter().filter(|&&used| used).count()
    }

    fn word(&self, pa: u64) -> Option<*mut u64> {
        if !pa.is_multiple_of(WORD_BYTES) || pa < self.base {
            return None;
        }
        let offset = pa - self.base;
        let page = self.pages.get(usize::try_from(offset / PAGE_SIZE).ok()?)?;
        let index = ((offset % PAGE_SIZE) / WORD_BYTES) as usize;
        // SAFETY: `index` < 512 stays inside the page's array.
        Some(unsafe { page.0.get().cast::<u64>().add(index) })
    }

    /// The word at `pa`, or `None` outside RAM (or misaligned).
    pub fn read(&self, pa: u64) -> Option<u64> {
        let word = self.word(pa)?;
        // SAFETY: `word` points into a live page; pages are only accessed
        // through such volatile accesses, one thread at a time.
        Some(unsafe { word.read_volatile() })
    }

    /// Writes the word at `pa`; `false` outside RAM (or misaligned).
    pub fn write(&self, pa: u64, value: u64) -> bool {
        let Some(word) = self.word(pa) else {
            return false;
        };
        // SAFETY: as in `read`.
        unsafe { word.write_volatile(value) };
        true
    }

    fn fill(&self, first: usize, count: usize, value: u64) {
        for page in &self.pages[first..first + count] {
            // SAFETY: the page is live and only accessed one thread at a
            // time (see `read`); no reference into it is held across this.
            unsafe { (*page.0.get()).fill(value) };
        }
    }
}

// SAFETY: runs are contiguous pages of `pages`, aligned as asked (checked
// against the physical address), marked allocated until given back, and
// `phys_to_virt` reaches all of them.
unsafe impl FrameSource for &TestMemory {
    fn alloc_pages(&mut self, count: usize, align: u64) -> Option<u64> {
        if count == 0 || self.budget.get() == Some(0) {
            return None;
        }
        let mut allocated = self.allocated.borrow_mut();
        let first = (0..=allocated.len().checked_sub(count)?).find(|&first| {
            (self.base + first as u64 * PAGE_SIZE).is_multiple_of(align)
                && allocated[first..first + count].iter().all(|&used| !used)
        })?;
        allocated[first..first + count].iter_mut().for_each(|used| *used = true);
        drop(allocated);
        self.budget.set(self.budget.get().map(|left| left - 1));
        self.fill(first, count, GARBAGE);
        Some(self.base + first as u64 * PAGE_SIZE)
    }

    fn free_pages(&mut self, pa: u64, count: usize) {
        let first = ((pa - self.base) / PAGE_SIZE) as usize;
        let mut allocated = self.allocated.borrow_mut();
        assert!(allocated[first..first + count].iter().all(|&used| used), "freeing pages not allocated at {pa:#x}");
        allocated[first..first + count].iter_mut().for_each(|used| *used = false);
        drop(allocated);
        self.fill(first, count, GARBAGE);
    }
}

// SAFETY: every page of the memory is a live, 4096-byte aligned array of
// 512 words behind an `UnsafeCell`; pages outside it panic.
unsafe impl PhysToVirt for TestMemory {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        assert!(pa.is_multiple_of(PAGE_SIZE), "driver touched misaligned page {pa:#x}");
        match self.word(pa) {
            Some(word) => word,
            None => panic!("driver touched {pa:#x} outside RAM"),
        }
    }
}

/// Identification registers of a fake SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeIdrs {
    pub idr0: u32,
    pub idr1: u32,
    pub idr5: u32,
}

impl FakeIdrs {
    /// QEMU 10 `virt,iommu=smmuv3`: IDR0 as measured (S1P, S2P, AArch64
    /// tables, COHACC, 16-bit ASID/VMID, little-endian, no stall,
    /// 2-level stream table); SIDSIZE 16, 2^19-entry queues; 44-bit OAS.
    pub const QEMU: FakeIdrs = FakeIdrs {
        idr0: 0x0d44_101b,
        idr1: (IDR1_SIDSIZE.place(16) | IDR1_EVENTQS.place(19) | IDR1_CMDQS.place(19)) as u32,
        idr5: IDR5_OAS.place(AddressSize::Bits44.encoding()) as u32 | IDR5_GRAN4K,
    };
}

impl Default for FakeIdrs {
    fn default() -> FakeIdrs {
        FakeIdrs::QEMU
    }
}

/// What the fake finds for a StreamID by walking the stream table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeSte {
    /// Beyond STRTAB_BASE_CFG.LOG2SIZE, or beyond the L2 span.
    OutOfRange,
    /// The L1 descriptor has Span = 0 (C_BAD_STREAMID).
    NoL2,
    /// The STE could not be read from memory (F_STE_FETCH).
    FetchFault(u64),
    Entry([u64; STE_WORDS]),
}

#[derive(Clone, Debug, Default)]
struct FakeState {
    idrs: FakeIdrs,
    cr0: u32,
    cr0ack: u32,
    cr1: u32,
    cr2: u32,
    gbpa: u32,
    gerror: u32,
    gerrorn: u32,
    strtab_base: u64,
    strtab_base_cfg: u32,
    cmdq_base: u64,
    cmdq_prod: u32,
    cmdq_cons: u32,
    evtq_base: u64,
    evtq_prod: u32,
    evtq_cons: u32,
    ack_delay: u32,
    ack_pending: u32,
    stalled: bool,
    reject_next: Option<u8>,
    commands: Vec<Command>,
    invalidations: Vec<(u32, FakeSte)>,
    writes: Vec<(usize, u64)>,
    violations: Vec<&'static str>,
}

/// A fake SMMUv3 register file over a [`TestMemory`]. Clones share one
/// SMMU, so a test keeps a handle while the driver owns another.
#[derive(Clone, Debug)]
pub struct FakeSmmu<'m> {
    mem: &'m TestMemory,
    state: Rc<RefCell<FakeState>>,
}

impl<'m> FakeSmmu<'m> {
    /// An SMMU out of reset: everything disabled, GBPA bypassing.
    pub fn new(mem: &'m TestMemory, idrs: FakeIdrs) -> FakeSmmu<'m> {
        let state = FakeState { idrs, ..FakeState::default() };
        FakeSmmu { mem, state: Rc::new(RefCell::new(state)) }
    }

    /// Commands consumed so far, in order.
    pub fn commands(&self) -> Vec<Command> {
        self.state.borrow().commands.clone()
    }

    /// Commands consumed so far, forgetting them.
    pub fn take_commands(&self) -> Vec<Command> {
        core::mem::take(&mut self.state.borrow_mut().commands)
    }

    /// For every CFGI_STE consumed, the StreamID and what the SMMU would
    /// have fetched at that moment.
    pub fn take_invalidations(&self) -> Vec<(u32, FakeSte)> {
        core::mem::take(&mut self.state.borrow_mut().invalidations)
    }

    /// Register writes so far, as (offset, value).
    pub fn take_writes(&self) -> Vec<(usize, u64)> {
        core::mem::take(&mut self.state.borrow_mut().writes)
    }

    /// Rules the driver broke so far.
    pub fn violations(&self) -> Vec<&'static str> {
        self.state.borrow().violations.clone()
    }

    /// CR0ACK follows CR0 only after this many CR0ACK reads.
    pub fn set_ack_delay(&self, reads: u32) {
        self.state.borrow_mut().ack_delay = reads;
    }

    /// Stops (or resumes) consuming commands.
    pub fn set_stalled(&self, stalled: bool) {
        self.state.borrow_mut().stalled = stalled;
        self.consume();
    }

    /// Rejects the next command consumed with CERROR `code`.
    pub fn reject_next_command(&self, code: u8) {
        self.state.borrow_mut().reject_next = Some(code);
    }

    /// Sets a 32-bit register behind the driver's back, without side
    /// effects (to model a corrupt or foreign SMMU state). Panics for a
    /// register the fake cannot force: a bug in the test.
    pub fn force32(&self, reg: Reg32, value: u32) {
        let mut s = self.state.borrow_mut();
        let slot = match reg {
            CR0 => &mut s.cr0,
            CR0ACK => &mut s.cr0ack,
            GBPA => &mut s.gbpa,
            GERROR => &mut s.gerror,
            STRTAB_BASE_CFG => &mut s.strtab_base_cfg,
            CMDQ_PROD => &mut s.cmdq_prod,
            CMDQ_CONS => &mut s.cmdq_cons,
            EVENTQ_PROD => &mut s.evtq_prod,
            EVENTQ_CONS => &mut s.evtq_cons,
            other => panic!("fake cannot force {other:?}"),
        };
        *slot = value;
    }

    /// Sets a 64-bit register behind the driver's back; panics like
    /// [`force32`](Self::force32).
    pub fn force64(&self, reg: Reg64, value: u64) {
        let mut s = self.state.borrow_mut();
        *match reg {
            STRTAB_BASE => &mut s.strtab_base,
            CMDQ_BASE => &mut s.cmdq_base,
            EVENTQ_BASE => &mut s.evtq_base,
            other => panic!("fake cannot force {other:?}"),
        } = value;
    }

    /// Walks the stream table as the SMMU would for `stream_id`.
    pub fn lookup(&self, stream_id: u32) -> FakeSte {
        self.state.borrow().lookup(self.mem, stream_id)
    }

    /// Writes an event record, as the SMMU does on a fault; `false` (and
    /// the overflow flag toggled) if the queue is full or disabled.
    pub fn inject_event(&self, record: [u64; EVENT_WORDS]) -> bool {
        let mut s = self.state.borrow_mut();
        let Some((base, ring)) = queue(s.evtq_base).filter(|_| s.cr0ack & CR0_EVENTQEN != 0) else {
            return false;
        };
        let prod = s.evtq_prod & !EVENTQ_OVERFLOW;
        if ring.is_full(prod, s.evtq_cons & !EVENTQ_OVERFLOW) {
            s.evtq_prod ^= EVENTQ_OVERFLOW;
            return false;
        }
        let entry = base + u64::from(ring.index(prod)) * EVENT_BYTES;
        for (word, value) in record.iter().enumerate() {
            self.mem.write(entry + word as u64 * WORD_BYTES, *value);
        }
        s.evtq_prod = ring.advance(prod, 1) | (s.evtq_prod & EVENTQ_OVERFLOW);
        true
    }

    /// Consumes commands from CONS to PROD if the queue is enabled,
    /// not stalled and not stopped by an error.
    fn consume(&self) {
        let mut s = self.state.borrow_mut();
        if s.cr0ack & CR0_CMDQEN == 0 || s.stalled || (s.gerror ^ s.gerrorn) & GERROR_CMDQ_ERR != 0 {
            return;
        }
        let Some((base, ring)) = queue(s.cmdq_base) else {
            return;
        };
        loop {
            let cons = s.cmdq_cons & ring.pointer_mask();
            if ring.is_empty(s.cmdq_prod, cons) {
                return;
            }
            let entry = base + u64::from(ring.index(cons)) * COMMAND_BYTES;
            let words = [self.mem.read(entry), self.mem.read(entry + WORD_BYTES)];
            let command = match words {
                [Some(first), Some(second)] => Command::decode([first, second]).map_err(|_| CERROR_ILL),
                _ => Err(CERROR_ABT),
            };
            let command = match (s.reject_next.take(), command) {
                (Some(code), _) | (None, Err(code)) => {
                    s.cmdq_cons = cons | CMDQ_CONS_ERR.place(u64::from(code)) as u32;
                    s.gerror ^= GERROR_CMDQ_ERR;
                    return;
                }
                (None, Ok(command)) => command,
            };
            if let Command::CfgiSte { stream_id, .. } = command {
                let found = s.lookup(self.mem, stream_id);
                s.invalidations.push((stream_id, found));
            }
            s.commands.push(command);
            s.cmdq_cons = ring.advance(cons, 1);
        }
    }
}

/// CERROR codes the fake raises (§7.1).
const CERROR_ILL: u8 = 0x01;
const CERROR_ABT: u8 = 0x02;

/// Base address and ring of a queue from its BASE register (LOG2SIZE is
/// five bits, so the ring always exists).
fn queue(base_reg: u64) -> Option<(u64, Ring)> {
    let ring = Ring::new(QUEUE_BASE_LOG2SIZE.get(base_reg) as u8)?;
    Some((base_reg & QUEUE_BASE_ADDR, ring))
}

impl FakeState {
    fn lookup(&self, mem: &TestMemory, stream_id: u32) -> FakeSte {
        let cfg = u64::from(self.strtab_base_cfg);
        let sid_bits = IDR1_SIDSIZE.get(u64::from(self.idrs.idr1));
        let log2size = STRTAB_CFG_LOG2SIZE.get(cfg).min(sid_bits);
        if u64::from(stream_id) >> log2size != 0 {
            return FakeSte::OutOfRange;
        }
        let base = self.strtab_base & STRTAB_BASE_ADDR;
        let ste = if STRTAB_CFG_FMT.get(cfg) == STRTAB_FMT_TWO_LEVEL {
            let split = STRTAB_CFG_SPLIT.get(cfg);
            let l1 = base + (u64::from(stream_id) >> split) * WORD_BYTES;
            let Some(descriptor) = mem.read(l1) else {
                return FakeSte::FetchFault(l1);
            };
            let (span, l2) = l1_descriptor_fields(descriptor);
            if span == 0 {
                return FakeSte::NoL2;
            }
            let offset = u64::from(stream_id) & ((1 << split) - 1);
            if offset >> (span - 1) != 0 {
                return FakeSte::OutOfRange;
            }
            l2 + offset * STE_BYTES
        } else {
            base + u64::from(stream_id) * STE_BYTES
        };
        let mut words = [0; STE_WORDS];
        for (index, word) in words.iter_mut().enumerate() {
            match mem.read(ste + index as u64 * WORD_BYTES) {
                Some(value) => *word = value,
                None => return FakeSte::FetchFault(ste),
            }
        }
        FakeSte::Entry(words)
    }

    fn violate_if(&mut self, broken: bool, rule: &'static str) {
        if broken {
            self.violations.push(rule);
        }
    }
}

impl SmmuRegs for FakeSmmu<'_> {
    fn read32(&self, reg: Reg32) -> u32 {
        let mut s = self.state.borrow_mut();
        let idrs = s.idrs;
        match reg {
            IDR0 => idrs.idr0,
            IDR1 => idrs.idr1,
            IDR5 => idrs.idr5,
            CR0 => s.cr0,
            CR0ACK => {
                if s.ack_pending > 0 {
                    s.ack_pending -= 1;
                    if s.ack_pending == 0 {
                        s.cr0ack = s.cr0;
                        drop(s);
                        self.consume();
                        return self.state.borrow().cr0ack;
                    }
                }
                s.cr0ack
            }
            CR1 => s.cr1,
            CR2 => s.cr2,
            GBPA => s.gbpa,
            GERROR => s.gerror,
            GERRORN => s.gerrorn,
            STRTAB_BASE_CFG => s.strtab_base_cfg,
            CMDQ_PROD => s.cmdq_prod,
            CMDQ_CONS => s.cmdq_cons,
            EVENTQ_PROD => s.evtq_prod,
            EVENTQ_CONS => s.evtq_cons,
            _ => 0,
        }
    }

    fn write32(&mut self, reg: Reg32, value: u32) {
        let mut s = self.state.borrow_mut();
        s.writes.push((reg.offset(), u64::from(value)));
        let (smmuen, cmdqen, eventqen) =
            (s.cr0ack & CR0_SMMUEN != 0, s.cr0ack & CR0_CMDQEN != 0, s.cr0ack & CR0_EVENTQEN != 0);
        match reg {
            CR0 => {
                let bypass = s.gbpa & GBPA_ABORT == 0;
                s.violate_if(bypass, "CR0 written while GBPA lets traffic bypass");
                s.cr0 = value;
                s.ack_pending = s.ack_delay;
                if s.ack_delay == 0 {
                    s.cr0ack = value;
                }
            }
            CR1 => s.cr1 = value,
            CR2 => s.cr2 = value,
            GBPA => {
                if value & GBPA_UPDATE != 0 {
                    s.gbpa = value & !GBPA_UPDATE;
                }
            }
            GERRORN => {
                s.gerrorn = value;
                if (s.gerror ^ s.gerrorn) & GERROR_CMDQ_ERR == 0 {
                    s.cmdq_cons &= !(CMDQ_CONS_ERR.mask() as u32);
                }
            }
            STRTAB_BASE_CFG => {
                s.violate_if(smmuen, "STRTAB_BASE_CFG written while SMMUEN");
                s.strtab_base_cfg = value;
            }
            CMDQ_PROD => s.cmdq_prod = value,
            CMDQ_CONS => {
                s.violate_if(cmdqen, "CMDQ_CONS written while CMDQEN");
                s.cmdq_cons = value;
            }
            EVENTQ_PROD => {
                s.violate_if(eventqen, "EVENTQ_PROD written while EVENTQEN");
                s.evtq_prod = value;
            }
            EVENTQ_CONS => s.evtq_cons = value,
            _ => s.violations.push("write to a read-only or unmodelled register"),
        }
        drop(s);
        self.consume();
    }

    fn read64(&self, reg: Reg64) -> u64 {
        let s = self.state.borrow();
        match reg {
            STRTAB_BASE => s.strtab_base,
            CMDQ_BASE => s.cmdq_base,
            EVENTQ_BASE => s.evtq_base,
            _ => 0,
        }
    }

    fn write64(&mut self, reg: Reg64, value: u64) {
        let mut s = self.state.borrow_mut();
        s.writes.push((reg.offset(), value));
        let (smmuen, cmdqen, eventqen) =
            (s.cr0ack & CR0_SMMUEN != 0, s.cr0ack & CR0_CMDQEN != 0, s.cr0ack & CR0_EVENTQEN != 0);
        match reg {
            STRTAB_BASE => {
                s.violate_if(smmuen, "STRTAB_BASE written while SMMUEN");
                s.strtab_base = value;
            }
            CMDQ_BASE => {
                s.violate_if(cmdqen, "CMDQ_BASE written while CMDQEN");
                s.cmdq_base = value;
            }
            EVENTQ_BASE => {
                s.violate_if(eventqen, "EVENTQ_BASE written while EVENTQEN");
                s.evtq_base = value;
            }
            _ => s.violations.push("write to an unmodelled register"),
        }
    }
}

/// The running SMMUs [`adopt_arbitrary`] starts from, built once: the same
/// small SMMU with a two-level and with a linear stream table (`None`
/// where it could not be built), as memory, registers and exported state.
/// Building one costs more than an adopt; a fuzzer keeps this and copies
/// it for each input.
#[derive(Debug)]
pub struct AdoptSetups([Option<AdoptSetup>; 2]);

#[derive(Debug)]
struct AdoptSetup {
    mem: TestMemory,
    registers: FakeState,
    valid: crate::state::SmmuState,
}

impl AdoptSetups {
    const BASE: u64 = 0x4000_0000;
    const PAGES: usize = 16;

    pub fn new() -> AdoptSetups {
        AdoptSetups([
            Self::build(FakeIdrs::QEMU),
            Self::build(FakeIdrs { idr0: FakeIdrs::QEMU.idr0 & !(0b11 << 27), ..FakeIdrs::QEMU }),
        ])
    }

    /// An SMMU with `idrs`, initialised with 8-entry queues and stream 0x10
    /// assigned to VMID 1.
    fn build(idrs: FakeIdrs) -> Option<AdoptSetup> {
        use crate::smmu::{Smmu, SmmuConfig};
        let mem = TestMemory::new(Self::BASE, Self::PAGES);
        let (registers, valid) = {
            let fake = FakeSmmu::new(&mem, idrs);
            let config =
                SmmuConfig { evtq_log2_entries: 3, cmdq_log2_entries: 3, spin_budget: 64, ..SmmuConfig::default() };
            let mut smmu = Smmu::init(fake.clone(), &mem, &mut &mem, config).ok()?;
            smmu.assign(&mut &mem, 0x10, 1, Self::BASE + (Self::PAGES as u64 - 1) * PAGE_SIZE).ok()?;
            let valid = smmu.state();
            drop(smmu);
            fake.take_writes();
            let registers = fake.state.borrow().clone();
            (registers, valid)
        };
        Some(AdoptSetup { mem, registers, valid })
    }
}

impl Default for AdoptSetups {
    fn default() -> AdoptSetups {
        AdoptSetups::new()
    }
}

/// The body of the `adopt` fuzz target (`iommu/fuzz`), replayed on stable
/// by `iommu/tests/fuzz_corpus.rs`: a small running SMMU (two-level
/// table, 8-entry queues, one assigned stream; a copy of one of `setups`)
/// whose handed-over state, memory and registers the input rewrites, as a
/// previous image or a broken one might leave them. Adopting that state,
/// and the untouched valid one, gives an SMMU or a typed error, never a
/// panic; never writes a register; and an SMMU adopted from a state
/// reports that same state.
pub fn adopt_arbitrary(setups: &AdoptSetups, data: &[u8]) {
    use crate::smmu::Smmu;
    use crate::state::Assignment;

    const BASE: u64 = AdoptSetups::BASE;
    const PAGES: usize = AdoptSetups::PAGES;
    let mut input = data;
    let mut byte = || {
        let (&b, rest) = input.split_first().unwrap_or((&0, &[]));
        input = rest;
        b
    };
    let mut word = |n: usize| (0..n).fold(0u64, |acc, k| acc | (u64::from(byte()) << (8 * k)));
    // Even: a two-level stream table; odd: IDR0.ST_LEVEL = 0b00, a linear
    // stream table only.
    let Some(setup) = &setups.0[usize::from(word(1) & 1 == 1)] else { return };
    let mem = setup.mem.duplicate();
    let fake = FakeSmmu { mem: &mem, state: Rc::new(RefCell::new(setup.registers.clone())) };
    let valid = setup.valid.clone();

    let mut state = valid.clone();
    let fields = word(2);
    // Each field kept, or replaced by a value near the valid one or any.
    let mut near = |valid: u64, field: u32| -> u64 {
        match (fields >> (2 * field)) & 3 {
            0 | 1 => valid,
            2 => valid.wrapping_add(word(2) << 3),
            _ => word(8),
        }
    };
    state.strtab_base = near(valid.strtab_base, 0);
    state.strtab_format = near(u64::from(valid.strtab_format), 1) as u8;
    state.strtab_split = near(u64::from(valid.strtab_split), 2) as u8;
    state.strtab_log2size = near(u64::from(valid.strtab_log2size), 3) as u8;
    state.cmdq_base = near(valid.cmdq_base, 4);
    state.cmdq_log2size = near(u64::from(valid.cmdq_log2size), 5) as u8;
    state.cmdq_prod = near(u64::from(valid.cmdq_prod), 6) as u32;
    state.cmdq_cons = near(u64::from(valid.cmdq_cons), 7) as u32;
    state.evtq_base = near(valid.evtq_base, 8);
    state.evtq_log2size = near(u64::from(valid.evtq_log2size), 9) as u8;
    state.evtq_cons = near(u64::from(valid.evtq_cons), 10) as u32;
    for _ in 0..word(1) % 4 {
        let (stream_id, vmid, s2_root) = (word(4) as u32, word(2) as u16, word(8));
        state.assignments.push(Assignment { stream_id, vmid, s2_root });
    }
    // Words of memory overwritten (tables, queues, roots) and registers
    // forced (the SMMU as the previous image left it).
    for _ in 0..word(1) % 8 {
        let at = BASE + (word(2) % (PAGES as u64 * WORDS_PER_PAGE as u64)) * 8;
        let _ = mem.write(at, word(8));
    }
    for _ in 0..word(1) % 4 {
        let value = word(8);
        match word(1) % 8 {
            0 => fake.force32(CR0ACK, value as u32),
            1 => fake.force32(GBPA, value as u32),
            2 => fake.force32(GERROR, value as u32),
            3 => fake.force64(STRTAB_BASE, value),
            4 => fake.force32(STRTAB_BASE_CFG, value as u32),
            5 => fake.force32(CMDQ_PROD, value as u32),
            6 => fake.force32(CMDQ_CONS, value as u32),
            _ => fake.force32(EVENTQ_CONS, value as u32),
        }
    }
    for candidate in [state, valid] {
        if let Ok(adopted) = Smmu::adopt(fake.clone(), &mem, &candidate, &mem.ram(), 8) {
            assert_eq!(adopted.state(), candidate, "an adopted SMMU reports the state it adopted");
        }
        assert!(fake.take_writes().is_empty(), "adopt wrote a register");
    }
}

/// A VT-d remapping unit for host tests of [`crate::vtd`]: the global
/// command/status handshake, the root table pointer, the invalidation
/// queue (descriptors read from [`TestMemory`], the wait descriptor's
/// status write done), DMA requests translated through the root table,
/// and the fault-recording registers. Misuse is noted in
/// [`FakeVtd::violations`].
pub struct FakeVtd<'m> {
    mem: &'m TestMemory,
    inner: RefCell<FakeVtdState>,
}

#[derive(Default)]
struct FakeVtdState {
    cap: u64,
    ecap: u64,
    gsts: u32,
    rtaddr: u64,
    root: Option<u64>,
    iqa: u64,
    iqh: u64,
    iqt: u64,
    fsts: u32,
    /// Fault records: (low, high) per register.
    records: Vec<(u64, u64)>,
    /// Descriptor types the queue processed, in order.
    processed: Vec<u8>,
    violations: Vec<&'static str>,
}

impl fmt::Debug for FakeVtd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeVtd").finish_non_exhaustive()
    }
}

/// QEMU 10's `intel-iommu` capabilities (`shared/EMULATORS.md`): one fault
/// record at 0x220, 48-bit, 3- and 4-level tables; QI, IR, PT, no page-walk
/// coherency.
pub const QEMU_VTD_CAP: u64 = 0x00d2_008c_222f_0606;
pub const QEMU_VTD_ECAP: u64 = 0x0000_0000_00f0_0f4a;

impl<'m> FakeVtd<'m> {
    pub fn new(mem: &'m TestMemory, cap: u64, ecap: u64) -> FakeVtd<'m> {
        let records = vec![(0, 0); crate::vtd::Cap(cap).fault_records()];
        FakeVtd { mem, inner: RefCell::new(FakeVtdState { cap, ecap, records, ..FakeVtdState::default() }) }
    }

    /// Starts with translation already on (a unit someone left running).
    pub fn set_translating(&self) {
        self.inner.borrow_mut().gsts |= crate::vtd::gcmd::TE;
    }

    /// Descriptor types the queue has processed.
    pub fn processed(&self) -> Vec<u8> {
        self.inner.borrow().processed.clone()
    }

    pub fn violations(&self) -> Vec<&'static str> {
        self.inner.borrow().violations.clone()
    }

    /// A DMA request from `source` to `addr`: translated when translation
    /// is on (root entry, context entry, then a 4-level second-level table
    /// of the EPT shape: bit 0 read, bit 1 write, bit 7 a 1 GiB or 2 MiB
    /// leaf), passed through otherwise. A request that does not translate
    /// is recorded with its reason (1 root not present, 2 context not
    /// present, 5 write / 6 read not allowed or not mapped). Returns the
    /// physical address it reached.
    pub fn dma(&self, source: u16, addr: u64, read: bool) -> Option<u64> {
        let mut s = self.inner.borrow_mut();
        if s.gsts & crate::vtd::gcmd::TE == 0 {
            return Some(addr);
        }
        let Some(root) = s.root else {
            s.violations.push("dma-translated-without-a-root-table");
            return None;
        };
        match self.translate(root, source, addr, read) {
            Ok(pa) => Some(pa),
            Err(reason) => {
                Self::record(&mut s, source, addr, read, reason);
                None
            }
        }
    }

    fn translate(&self, root: u64, source: u16, addr: u64, read: bool) -> Result<u64, u8> {
        let denied = if read { 6 } else { 5 };
        let root_low = self.mem.read(root + u64::from(source >> 8) * 16).unwrap_or(0);
        if root_low & 1 == 0 {
            return Err(1);
        }
        let context = (root_low & !0xfff) + u64::from(source & 0xff) * 16;
        let (low, high) = (self.mem.read(context).unwrap_or(0), self.mem.read(context + 8).unwrap_or(0));
        if low & 1 == 0 {
            return Err(2);
        }
        if high & 0b111 != 0b010 || (low >> 2) & 0b11 != 0 {
            return Err(3);
        }
        let mut table = low & !0xfff;
        for level in 0..4u32 {
            let shift = 39 - 9 * level;
            let entry = self.mem.read(table + ((addr >> shift) & 511) * 8).ok_or(7u8)?;
            // Neither read (bit 0) nor write (bit 1): not present.
            if entry.trailing_zeros() >= 2 {
                return Err(denied);
            }
            let address = entry & 0x000f_ffff_ffff_f000;
            if level == 3 || (level > 0 && entry & (1 << 7) != 0) {
                if !read && entry & 0b10 == 0 {
                    return Err(denied);
                }
                let span = 1u64 << shift;
                return Ok((address & !(span - 1)) | (addr & (span - 1)));
            }
            table = address;
        }
        Err(denied)
    }

    fn record(s: &mut FakeVtdState, source: u16, addr: u64, read: bool, reason: u8) {
        let free = s.records.iter().position(|r| r.1 & (1 << 63) == 0);
        match free {
            Some(i) => {
                let high = (1 << 63) | (u64::from(read) << 62) | (u64::from(reason) << 32) | u64::from(source);
                s.records[i] = (addr & !0xfff, high);
                if s.fsts & crate::vtd::fsts::PPF == 0 {
                    s.fsts = (s.fsts & !0xff00) | ((i as u32) << 8);
                }
                s.fsts |= crate::vtd::fsts::PPF;
            }
            None => s.fsts |= crate::vtd::fsts::PFO,
        }
    }

    fn run_queue(&self, s: &mut FakeVtdState) {
        let base = s.iqa & !0xfff;
        while s.iqh != s.iqt {
            let at = base + s.iqh;
            let (Some(low), Some(high)) = (self.mem.read(at), self.mem.read(at + 8)) else {
                s.fsts |= crate::vtd::fsts::IQE;
                return;
            };
            let kind = crate::vtd::descriptor::kind(low);
            match kind {
                1 | 2 => {}
                5 => {
                    if low & (1 << 5) != 0 {
                        let word = high & !0x7;
                        let old = self.mem.read(word).unwrap_or(0);
                        let data = low >> 32;
                        let value = if high & 0x4 == 0 {
                            (old & !0xffff_ffff) | data
                        } else {
                            (old & 0xffff_ffff) | (data << 32)
                        };
                        if !self.mem.write(word, value) {
                            s.violations.push("wait-status-outside-memory");
                        }
                    }
                }
                _ => {
                    s.fsts |= crate::vtd::fsts::IQE;
                    return;
                }
            }
            s.processed.push(kind);
            s.iqh = (s.iqh + 16) % 4096;
        }
    }
}

impl crate::vtd::VtdRegs for &FakeVtd<'_> {
    fn read32(&self, offset: usize) -> u32 {
        let s = self.inner.borrow();
        match offset {
            crate::vtd::reg::VER => 0x10,
            crate::vtd::reg::GSTS => s.gsts,
            crate::vtd::reg::FSTS => s.fsts,
            _ => (self.read64(offset & !7) >> ((offset & 4) * 8)) as u32,
        }
    }

    fn read64(&self, offset: usize) -> u64 {
        let s = self.inner.borrow();
        let fro = crate::vtd::Cap(s.cap).fault_record_offset();
        match offset {
            crate::vtd::reg::CAP => s.cap,
            crate::vtd::reg::ECAP => s.ecap,
            crate::vtd::reg::RTADDR => s.rtaddr,
            crate::vtd::reg::IQA => s.iqa,
            crate::vtd::reg::IQH => s.iqh,
            crate::vtd::reg::IQT => s.iqt,
            o if o >= fro && o < fro + 16 * s.records.len() => {
                let r = s.records[(o - fro) / 16];
                if (o - fro).is_multiple_of(16) {
                    r.0
                } else {
                    r.1
                }
            }
            _ => 0,
        }
    }

    fn write32(&mut self, offset: usize, value: u32) {
        use crate::vtd::gcmd;
        let mut s = self.inner.borrow_mut();
        let fro = crate::vtd::Cap(s.cap).fault_record_offset();
        match offset {
            crate::vtd::reg::GCMD => {
                let sticky = gcmd::TE | gcmd::QIE;
                if (s.gsts & sticky) & !value != 0 {
                    s.violations.push("gcmd-turned-a-bit-off");
                }
                if value & gcmd::SRTP != 0 {
                    s.root = Some(s.rtaddr & !0xfff);
                    s.gsts |= gcmd::SRTP;
                }
                if value & gcmd::QIE != 0 && s.gsts & gcmd::QIE == 0 {
                    s.iqh = 0;
                    s.gsts |= gcmd::QIE;
                }
                if value & gcmd::TE != 0 {
                    if s.root.is_none() {
                        s.violations.push("translation-enabled-without-a-root-table");
                    }
                    s.gsts |= gcmd::TE;
                }
            }
            crate::vtd::reg::FSTS => s.fsts &= !(value & (crate::vtd::fsts::PFO | crate::vtd::fsts::IQE)),
            crate::vtd::reg::FECTL => {}
            o if o >= fro && o < fro + 16 * s.records.len() && (o - fro) % 16 == 12 => {
                let i = (o - fro) / 16;
                if value & (1 << 31) != 0 {
                    s.records[i].1 &= !(1 << 63);
                }
                if s.records.iter().all(|r| r.1 & (1 << 63) == 0) {
                    s.fsts &= !crate::vtd::fsts::PPF;
                }
            }
            _ => s.violations.push("write32-to-an-unknown-register"),
        }
    }

    fn write64(&mut self, offset: usize, value: u64) {
        let mut s = self.inner.borrow_mut();
        match offset {
            crate::vtd::reg::RTADDR => s.rtaddr = value,
            crate::vtd::reg::IQA => {
                if s.gsts & crate::vtd::gcmd::QIE != 0 {
                    s.violations.push("iqa-written-while-the-queue-runs");
                }
                s.iqa = value;
            }
            crate::vtd::reg::IQT => {
                if s.gsts & crate::vtd::gcmd::QIE == 0 && value != 0 {
                    s.violations.push("iqt-moved-before-the-queue-is-on");
                }
                s.iqt = value & 0x7fff0;
                if s.gsts & crate::vtd::gcmd::QIE != 0 {
                    let mut state = core::mem::take(&mut *s);
                    self.run_queue(&mut state);
                    *s = state;
                }
            }
            _ => s.violations.push("write64-to-an-unknown-register"),
        }
    }
}

impl FakeVtd<'_> {
    /// Sets a register as a previous image (or a broken one) might have
    /// left it: GSTS, RTADDR, IQA, IQH or IQT (other offsets are ignored).
    pub fn force(&self, offset: usize, value: u64) {
        let mut s = self.inner.borrow_mut();
        match offset {
            crate::vtd::reg::GSTS => s.gsts = value as u32,
            crate::vtd::reg::RTADDR => s.rtaddr = value,
            crate::vtd::reg::IQA => s.iqa = value,
            crate::vtd::reg::IQH => s.iqh = value & 0x7fff0,
            crate::vtd::reg::IQT => s.iqt = value & 0x7fff0,
            _ => {}
        }
    }
}

/// The body of the `vtd_adopt` fuzz target (`iommu/fuzz`), replayed on
/// stable by `iommu/src/tests.rs`: a VT-d unit brought up translating,
/// whose handed-over state, memory and registers the input rewrites, as a
/// previous image or a broken one might leave them. Adopting that state,
/// and the untouched valid one, gives a unit or a typed error, never a
/// panic or a hang, and a unit adopted from a state reports that state.
pub fn vtd_adopt_arbitrary(data: &[u8]) {
    use crate::vtd::{reg, Vtd, VtdState};

    const BASE: u64 = 0x8000_0000;
    const PAGES: u64 = 16;
    let mut input = data;
    let mut byte = || {
        let (&b, rest) = input.split_first().unwrap_or((&0, &[]));
        input = rest;
        b
    };
    let mut word = |n: usize| (0..n).fold(0u64, |acc, k| acc | (u64::from(byte()) << (8 * k)));
    let mem = TestMemory::new(BASE, PAGES as usize);
    let fake = FakeVtd::new(&mem, QEMU_VTD_CAP, QEMU_VTD_ECAP);
    let mut frames = &mem;
    let Ok((vtd, _)) = Vtd::init(&fake, &mem, &mut frames, 64) else { return };
    let valid = vtd.state();
    let fields = word(1);
    let mut near = |valid: u64, field: u32| -> u64 {
        match (fields >> (2 * field)) & 3 {
            0 | 1 => valid,
            2 => valid.wrapping_add(word(2) << 3),
            _ => word(8),
        }
    };
    let state = VtdState {
        root: near(valid.root, 0),
        queue: near(valid.queue, 1),
        status: near(valid.status, 2),
        tail: near(u64::from(valid.tail), 3) as u32,
    };
    for _ in 0..word(1) % 8 {
        let at = BASE + (word(2) % (PAGES * WORDS_PER_PAGE as u64)) * 8;
        let _ = mem.write(at, word(8));
    }
    for _ in 0..word(1) % 4 {
        let value = word(8);
        let offset = [reg::GSTS, reg::RTADDR, reg::IQA, reg::IQH, reg::IQT][(word(1) % 5) as usize];
        fake.force(offset, value);
    }
    for candidate in [state, valid] {
        if let Ok((adopted, _)) = Vtd::adopt(&fake, &mem, &candidate, &mem.ram(), 64) {
            assert_eq!(adopted.state().root, candidate.root, "an adopted unit reports the root it adopted");
        }
    }
}
