//! What crosses a live update, and adopting it: the next image takes over
//! the running SMMU — same stream table, same queues, translation still
//! enabled — after checking the preserved state against the live registers
//! and the tables in memory. Adopt only reads; on any error the SMMU keeps
//! running exactly as the previous image left it.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::command::COMMAND_BYTES;
use crate::error::{AdoptError, QueueKind, Region, Register};
use crate::event::EVENT_BYTES;
use crate::memory::{alignment_for, PageRun, PhysToVirt, PAGE_SIZE};
use crate::probe::{probe, Features, MIN_CMDQ_LOG2};
use crate::queue::Ring;
use crate::regs::{
    SmmuRegs, CMDQ_BASE, CMDQ_CONS, CMDQ_PROD, CR0, CR0ACK, CR0_CMDQEN, CR0_ENABLES, CR0_EVENTQEN, CR0_SMMUEN,
    EVENTQ_BASE, EVENTQ_CONS, EVENTQ_OVERFLOW, EVENTQ_PROD, GBPA, GBPA_ABORT, GERROR, GERRORN, GERROR_CMDQ_ERR,
    GERROR_SFM_ERR, QUEUE_BASE_ADDR, QUEUE_BASE_LOG2SIZE, STRTAB_BASE, STRTAB_BASE_ADDR, STRTAB_BASE_CFG,
    STRTAB_CFG_FMT, STRTAB_CFG_LOG2SIZE, STRTAB_CFG_SPLIT,
};
use crate::smmu::{CommandQueue, EventQueue, Smmu};
use crate::ste::{Stage2Geometry, SteConfig, S2_ROOT_ALIGN};
use crate::stream_table::{StreamTable, StreamTableFormat};

/// A stream translated for a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Assignment {
    pub stream_id: u32,
    pub vmid: u16,
    /// Physical address of the guest's stage-2 root table.
    pub s2_root: u64,
}

/// The driver state a next image needs, as plain integers for a versioned
/// handover state record. Produced by [`Smmu::state`], consumed by
/// [`Smmu::adopt`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SmmuState {
    /// Physical address of the linear STE array or the L1 array.
    pub strtab_base: u64,
    /// SMMU_STRTAB_BASE_CFG.FMT: 0 linear, 1 two-level.
    pub strtab_format: u8,
    /// SMMU_STRTAB_BASE_CFG.SPLIT: 0 for linear, [`SPLIT`](crate::SPLIT) for
    /// two-level.
    pub strtab_split: u8,
    /// SMMU_STRTAB_BASE_CFG.LOG2SIZE: StreamID bits the table covers.
    pub strtab_log2size: u8,
    pub cmdq_base: u64,
    pub cmdq_log2size: u8,
    /// SMMU_CMDQ_PROD: wrap flag and index.
    pub cmdq_prod: u32,
    /// SMMU_CMDQ_CONS (without ERR); equal to `cmdq_prod` when drained.
    pub cmdq_cons: u32,
    pub evtq_base: u64,
    pub evtq_log2size: u8,
    /// SMMU_EVENTQ_CONS: wrap flag, index and OVACKFLG.
    pub evtq_cons: u32,
    /// Every assigned stream, in StreamID order.
    pub assignments: Vec<Assignment>,
}

/// Everything adopt has found the SMMU to own so far, to reject structures
/// that are misaligned, outside RAM, beyond the SMMU's reach or overlapping.
pub(crate) struct Claims<'r> {
    ram: &'r [(u64, u64)],
    limit: u64,
    taken: Vec<(Region, PageRun)>,
}

impl<'r> Claims<'r> {
    fn new(ram: &'r [(u64, u64)], limit: u64) -> Claims<'r> {
        Claims { ram, limit, taken: Vec::new() }
    }

    /// Checks `[pa, pa + bytes)` and records it as the SMMU's.
    pub(crate) fn claim(&mut self, region: Region, pa: u64, bytes: u64, align: u64) -> Result<PageRun, AdoptError> {
        let run = self.check(region, pa, bytes, align)?;
        if let Some(&(first, _)) = self.taken.iter().find(|(_, taken)| taken.overlaps(&run)) {
            return Err(AdoptError::Overlap { first, second: region });
        }
        self.taken.push((region, run));
        Ok(run)
    }

    /// Checks `[pa, pa + bytes)` without recording it.
    fn check(&self, region: Region, pa: u64, bytes: u64, align: u64) -> Result<PageRun, AdoptError> {
        if !pa.is_multiple_of(align) || !pa.is_multiple_of(PAGE_SIZE) {
            return Err(AdoptError::Misaligned { region, pa, align: align.max(PAGE_SIZE) });
        }
        let outside = AdoptError::OutsideRam { region, pa, bytes };
        let end = pa.checked_add(bytes).filter(|&end| end <= self.limit).ok_or(outside)?;
        let inside = self
            .ram
            .iter()
            .any(|&(base, size)| base.checked_add(size).is_some_and(|ram_end| pa >= base && end <= ram_end));
        if !inside {
            return Err(outside);
        }
        Ok(PageRun { base: pa, count: bytes.div_ceil(PAGE_SIZE) as usize })
    }

    /// The first claimed region `run` overlaps, if any.
    fn overlapping(&self, run: &PageRun) -> Option<Region> {
        self.taken.iter().find(|(_, taken)| taken.overlaps(run)).map(|&(region, _)| region)
    }
}

impl<R: SmmuRegs, P: PhysToVirt> Smmu<R, P> {
    /// Takes over an SMMU that a previous image enabled and described in
    /// `state`, without resetting it: translation stays on and DMA keeps
    /// flowing. `ram` lists the (base, size) ranges of RAM; every structure
    /// must lie inside one of them, aligned, below the SMMU's output size
    /// and disjoint from the others. Checks, in order: the SMMU is fully
    /// enabled, aborts by default and has no pending command error; the
    /// stream-table and queue registers match the state; the command queue
    /// was drained; every L1 descriptor and STE is one the driver writes;
    /// and the translating STEs are exactly the state's assignments.
    pub fn adopt(
        regs: R,
        phys: P,
        state: &SmmuState,
        ram: &[(u64, u64)],
        spin_budget: u32,
    ) -> Result<Self, AdoptError> {
        let features = probe(&regs)?;
        let geometry = Stage2Geometry::new(features);
        let mut claims = Claims::new(ram, features.oas.limit());
        check_running(&regs)?;

        let (format, log2size) = stream_table_layout(state, features)?;
        same_register(Register::StrtabBase, state.strtab_base, regs.read64(STRTAB_BASE) & STRTAB_BASE_ADDR)?;
        let cfg_fields = STRTAB_CFG_LOG2SIZE.mask() | STRTAB_CFG_SPLIT.mask() | STRTAB_CFG_FMT.mask();
        let cfg = u64::from(StreamTable::cfg(format, log2size));
        same_register(Register::StrtabBaseCfg, cfg, u64::from(regs.read32(STRTAB_BASE_CFG)) & cfg_fields)?;
        let strtab = StreamTable::adopt(&phys, state.strtab_base, format, log2size, &mut claims)?;

        let cmdq = adopt_command_queue(&regs, state, features, &mut claims)?;
        let evtq = adopt_event_queue(&regs, state, features, &mut claims)?;
        let assignments = check_assignments(state, features, log2size, &claims)?;
        check_stes(&phys, &strtab, geometry, &assignments)?;

        Ok(Smmu { regs, phys, features, geometry, strtab, cmdq, evtq, assignments, spin_budget })
    }
}

/// The live SMMU must be translating, abort while disabled, and have no
/// unacknowledged command error or service failure.
fn check_running<R: SmmuRegs + ?Sized>(regs: &R) -> Result<(), AdoptError> {
    let running = CR0_SMMUEN | CR0_EVENTQEN | CR0_CMDQEN;
    let cr0ack = regs.read32(CR0ACK);
    if cr0ack & CR0_ENABLES != running || regs.read32(CR0) & CR0_ENABLES != running {
        return Err(AdoptError::Disabled { cr0ack });
    }
    let gbpa = regs.read32(GBPA);
    if gbpa & GBPA_ABORT == 0 {
        return Err(AdoptError::GlobalBypass { gbpa });
    }
    let active = (regs.read32(GERROR) ^ regs.read32(GERRORN)) & (GERROR_CMDQ_ERR | GERROR_SFM_ERR);
    if active != 0 {
        return Err(AdoptError::GlobalError { active });
    }
    Ok(())
}

fn same_register(register: Register, expected: u64, found: u64) -> Result<(), AdoptError> {
    if expected == found {
        Ok(())
    } else {
        Err(AdoptError::RegisterMismatch { register, expected, found })
    }
}

/// The stream-table layout, if it is one this driver builds on this SMMU.
fn stream_table_layout(state: &SmmuState, features: Features) -> Result<(StreamTableFormat, u8), AdoptError> {
    let (format, split, log2size) = (state.strtab_format, state.strtab_split, state.strtab_log2size);
    let bad = AdoptError::StreamTableFormat { format, split, log2size };
    if log2size > features.sid_bits {
        return Err(bad);
    }
    let layout = [StreamTableFormat::Linear, StreamTableFormat::TwoLevel]
        .into_iter()
        .find(|f| f.encoding() == format && f.split() == split)
        .ok_or(bad)?;
    if StreamTable::choose_format(features.stream_table, log2size) != layout {
        return Err(bad);
    }
    Ok((layout, log2size))
}

/// A queue's ring, if its size is within `min..=max`.
fn adopt_ring(queue: QueueKind, log2: u8, min: u8, max: u8) -> Result<Ring, AdoptError> {
    let bad = AdoptError::QueueSize { queue, log2 };
    if log2 < min || log2 > max {
        return Err(bad);
    }
    Ring::new(log2).ok_or(bad)
}

fn adopt_command_queue<R: SmmuRegs + ?Sized>(
    regs: &R,
    state: &SmmuState,
    features: Features,
    claims: &mut Claims<'_>,
) -> Result<CommandQueue, AdoptError> {
    let queue = QueueKind::Command;
    let ring = adopt_ring(queue, state.cmdq_log2size, MIN_CMDQ_LOG2, features.cmdq_max_log2)?;
    let bytes = COMMAND_BYTES << ring.log2_entries();
    let run = claims.claim(Region::CommandQueue, state.cmdq_base, bytes, alignment_for(bytes))?;
    let base_fields = QUEUE_BASE_ADDR | QUEUE_BASE_LOG2SIZE.mask();
    let base = run.base | QUEUE_BASE_LOG2SIZE.place(u64::from(ring.log2_entries()));
    same_register(Register::CmdqBase, base, regs.read64(CMDQ_BASE) & base_fields)?;
    for value in [state.cmdq_prod, state.cmdq_cons] {
        if !ring.is_pointer(value) {
            return Err(AdoptError::QueuePointer { queue, value });
        }
    }
    if state.cmdq_prod != state.cmdq_cons {
        return Err(AdoptError::CommandQueueBusy { prod: state.cmdq_prod, cons: state.cmdq_cons });
    }
    same_register(Register::CmdqProd, u64::from(state.cmdq_prod), u64::from(regs.read32(CMDQ_PROD)))?;
    let cons = regs.read32(CMDQ_CONS) & ring.pointer_mask();
    same_register(Register::CmdqCons, u64::from(state.cmdq_cons), u64::from(cons))?;
    Ok(CommandQueue { run, ring, prod: state.cmdq_prod })
}

fn adopt_event_queue<R: SmmuRegs + ?Sized>(
    regs: &R,
    state: &SmmuState,
    features: Features,
    claims: &mut Claims<'_>,
) -> Result<EventQueue, AdoptError> {
    let queue = QueueKind::Event;
    let ring = adopt_ring(queue, state.evtq_log2size, 0, features.evtq_max_log2)?;
    let bytes = EVENT_BYTES << ring.log2_entries();
    let run = claims.claim(Region::EventQueue, state.evtq_base, bytes, alignment_for(bytes))?;
    let base_fields = QUEUE_BASE_ADDR | QUEUE_BASE_LOG2SIZE.mask();
    let base = run.base | QUEUE_BASE_LOG2SIZE.place(u64::from(ring.log2_entries()));
    same_register(Register::EventqBase, base, regs.read64(EVENTQ_BASE) & base_fields)?;
    let cons = state.evtq_cons & !EVENTQ_OVERFLOW;
    if !ring.is_pointer(cons) {
        return Err(AdoptError::QueuePointer { queue, value: state.evtq_cons });
    }
    same_register(Register::EventqCons, u64::from(state.evtq_cons), u64::from(regs.read32(EVENTQ_CONS)))?;
    let prod = regs.read32(EVENTQ_PROD) & !EVENTQ_OVERFLOW;
    if !ring.is_pointer(prod) || !ring.is_consistent(prod, cons) {
        return Err(AdoptError::QueuePointer { queue, value: prod });
    }
    Ok(EventQueue { run, ring, cons, overflow_ack: state.evtq_cons & EVENTQ_OVERFLOW })
}

/// The assignments, each in range, with a stage-2 root inside RAM that is
/// none of the SMMU's own structures, and no StreamID twice.
fn check_assignments(
    state: &SmmuState,
    features: Features,
    log2size: u8,
    claims: &Claims<'_>,
) -> Result<BTreeMap<u32, Assignment>, AdoptError> {
    let mut assignments = BTreeMap::new();
    for &assignment in &state.assignments {
        let Assignment { stream_id, vmid, s2_root } = assignment;
        if u64::from(stream_id) >> log2size != 0 {
            return Err(AdoptError::StreamIdOutOfRange { stream_id });
        }
        if u32::from(vmid) >> features.vmid_bits != 0 {
            return Err(AdoptError::VmidOutOfRange { vmid });
        }
        let region = Region::Stage2Root { stream_id };
        let root = claims.check(region, s2_root, PAGE_SIZE, S2_ROOT_ALIGN)?;
        if let Some(first) = claims.overlapping(&root) {
            return Err(AdoptError::Overlap { first, second: region });
        }
        if assignments.insert(stream_id, assignment).is_some() {
            return Err(AdoptError::DuplicateAssignment { stream_id });
        }
    }
    Ok(assignments)
}

/// Every STE is abort or the driver's stage-2 encoding, and the stage-2
/// ones are exactly the assignments.
fn check_stes<P: PhysToVirt + ?Sized>(
    phys: &P,
    strtab: &StreamTable,
    geometry: Stage2Geometry,
    assignments: &BTreeMap<u32, Assignment>,
) -> Result<(), AdoptError> {
    let mut translating = 0;
    for (stream_id, pa) in strtab.stes() {
        match SteConfig::decode(&StreamTable::read_ste(phys, pa), geometry) {
            None => return Err(AdoptError::BadSte { stream_id }),
            Some(SteConfig::Abort) => {}
            Some(SteConfig::Stage2 { vmid, s2_root }) => {
                if assignments.get(&stream_id) != Some(&Assignment { stream_id, vmid, s2_root }) {
                    return Err(AdoptError::UnexpectedSte { stream_id });
                }
                translating += 1;
            }
        }
    }
    if translating != assignments.len() {
        let missing = assignments.keys().copied().find(|&sid| {
            strtab.ste_address(sid).is_none_or(|pa| {
                !matches!(SteConfig::decode(&StreamTable::read_ste(phys, pa), geometry), Some(SteConfig::Stage2 { .. }))
            })
        });
        return Err(AdoptError::MissingSte { stream_id: missing.unwrap_or_default() });
    }
    Ok(())
}
