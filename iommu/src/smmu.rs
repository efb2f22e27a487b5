//! The driver: enable sequence, stream assignment, command and event queues.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::hint::spin_loop;
use core::iter::once;
use core::sync::atomic::{fence, Ordering};

use crate::command::{Command, COMMAND_BYTES};
use crate::error::{CommandError, Error, QueueKind, Wait};
use crate::event::{Event, EVENT_BYTES, EVENT_WORDS};
use crate::memory::{alloc_run, read_word, write_word, FrameSource, PageRun, PhysToVirt, WORD_BYTES};
use crate::probe::{probe, Features, MIN_CMDQ_LOG2};
use crate::queue::Ring;
use crate::regs::{
    SmmuRegs, CACHE_WB, CMDQ_BASE, CMDQ_CONS, CMDQ_CONS_ERR, CMDQ_PROD, CR0, CR0ACK, CR0_CMDQEN, CR0_ENABLES,
    CR0_EVENTQEN, CR0_SMMUEN, CR1, CR1_QUEUE_IC, CR1_QUEUE_OC, CR1_QUEUE_SH, CR1_TABLE_IC, CR1_TABLE_OC, CR1_TABLE_SH,
    CR2, CR2_RECINVSID, EVENTQ_BASE, EVENTQ_CONS, EVENTQ_OVERFLOW, EVENTQ_PROD, GBPA, GBPA_ABORT, GBPA_UPDATE, GERROR,
    GERRORN, GERROR_CMDQ_ERR, GERROR_SFM_ERR, QUEUE_BASE_ALLOCATE, QUEUE_BASE_LOG2SIZE, SHARE_INNER, STRTAB_BASE,
    STRTAB_BASE_CFG,
};
use crate::state::{Assignment, SmmuState};
use crate::ste::{Stage2Geometry, SteConfig, S2_ROOT_ALIGN, STE_WORDS};
use crate::stream_table::StreamTable;

/// CR1 (§6.3, SMMU_CR1): table and queue accesses are write-back cacheable and
/// inner shareable, like the CPU's own accesses to them (IDR0.COHACC = 1).
const CR1_VALUE: u32 = (CR1_QUEUE_IC.place(CACHE_WB)
    | CR1_QUEUE_OC.place(CACHE_WB)
    | CR1_QUEUE_SH.place(SHARE_INNER)
    | CR1_TABLE_IC.place(CACHE_WB)
    | CR1_TABLE_OC.place(CACHE_WB)
    | CR1_TABLE_SH.place(SHARE_INNER)) as u32;

/// Choices for [`Smmu::init`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuConfig {
    /// StreamIDs beyond this width are out of the table (and abort); the
    /// SMMU's own IDR1.SIDSIZE caps it further. QEMU's `iommu-map` covers
    /// 16 bits.
    pub max_stream_id_bits: u8,
    /// log2 of the command-queue entries (16 bytes each).
    pub cmdq_log2_entries: u8,
    /// log2 of the event-queue entries (32 bytes each).
    pub evtq_log2_entries: u8,
    /// Register reads before a wait for the SMMU gives up with
    /// [`Error::Timeout`].
    pub spin_budget: u32,
}

impl SmmuConfig {
    /// The StreamIDs QEMU's `iommu-map = <0 &smmu 0 0x10000>` covers.
    pub const DEFAULT_STREAM_ID_BITS: u8 = 16;
    /// One page of 16-byte commands.
    pub const DEFAULT_CMDQ_LOG2_ENTRIES: u8 = 8;
    /// One page of 32-byte event records.
    pub const DEFAULT_EVTQ_LOG2_ENTRIES: u8 = 7;
    /// Far beyond what QEMU (which acts on every register write at once)
    /// or hardware need.
    pub const DEFAULT_SPIN_BUDGET: u32 = 1 << 20;
}

impl Default for SmmuConfig {
    fn default() -> SmmuConfig {
        SmmuConfig {
            max_stream_id_bits: SmmuConfig::DEFAULT_STREAM_ID_BITS,
            cmdq_log2_entries: SmmuConfig::DEFAULT_CMDQ_LOG2_ENTRIES,
            evtq_log2_entries: SmmuConfig::DEFAULT_EVTQ_LOG2_ENTRIES,
            spin_budget: SmmuConfig::DEFAULT_SPIN_BUDGET,
        }
    }
}

/// What one [`Smmu::poll_events`] call drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventSummary {
    pub events: u32,
    /// The queue overflowed since the last poll: events were lost.
    pub overflowed: bool,
}

/// The command queue and the driver's PROD (the SMMU only reads it).
#[derive(Debug)]
pub(crate) struct CommandQueue {
    pub(crate) run: PageRun,
    pub(crate) ring: Ring,
    pub(crate) prod: u32,
}

/// The event queue and the driver's CONS, with its OVACKFLG.
#[derive(Debug)]
pub(crate) struct EventQueue {
    pub(crate) run: PageRun,
    pub(crate) ring: Ring,
    pub(crate) cons: u32,
    pub(crate) overflow_ack: u32,
}

/// A running SMMUv3: its register file, its tables and queues, and which
/// stream belongs to which guest.
///
/// The driver is the only producer of commands and the only consumer of
/// events, and waits for each batch of commands to complete (CMD_SYNC), so
/// between calls the command queue is always drained.
#[derive(Debug)]
pub struct Smmu<R: SmmuRegs, P: PhysToVirt> {
    pub(crate) regs: R,
    pub(crate) phys: P,
    pub(crate) features: Features,
    pub(crate) geometry: Stage2Geometry,
    pub(crate) strtab: StreamTable,
    pub(crate) cmdq: CommandQueue,
    pub(crate) evtq: EventQueue,
    pub(crate) assignments: BTreeMap<u32, Assignment>,
    pub(crate) spin_budget: u32,
}

impl<R: SmmuRegs, P: PhysToVirt> Smmu<R, P> {
    /// Probes the SMMU, builds an all-abort stream table and the queues
    /// from `frames`, and enables translation with this sequence (§6.3: SMMU_CR0
    /// and CR0ACK, SMMU_GBPA, the table and queue base registers):
    ///
    /// 1. GBPA.ABORT = 1 first, so that while the SMMU is disabled below,
    ///    traffic aborts instead of bypassing;
    /// 2. CR0 = 0 (disable), wait for CR0ACK; acknowledge stale GERRORs;
    /// 3. CR1/CR2, STRTAB_BASE(_CFG), CMDQ and EVENTQ bases and indexes —
    ///    registers the SMMU only accepts while the matching enable is off;
    /// 4. CMDQEN, then CFGI_ALL + TLBI_NSNH_ALL + CMD_SYNC to drop anything
    ///    cached from a previous owner;
    /// 5. EVENTQEN, then SMMUEN, each acknowledged through CR0ACK.
    ///
    /// If an allocation fails nothing is left allocated; if a register wait
    /// fails the SMMU is left aborting all traffic and the memory stays
    /// with it.
    pub fn init<F: FrameSource + ?Sized>(regs: R, phys: P, frames: &mut F, config: SmmuConfig) -> Result<Self, Error> {
        let features = probe(&regs)?;
        let cmdq_ring =
            queue_ring(QueueKind::Command, config.cmdq_log2_entries, MIN_CMDQ_LOG2, features.cmdq_max_log2)?;
        let evtq_ring = queue_ring(QueueKind::Event, config.evtq_log2_entries, 0, features.evtq_max_log2)?;
        let limit = features.oas.limit();
        let log2size = features.sid_bits.min(config.max_stream_id_bits);
        let format = StreamTable::choose_format(features.stream_table, log2size);
        let strtab = StreamTable::create(frames, &phys, format, log2size, limit)?;
        let cmdq_run = match alloc_run(frames, COMMAND_BYTES << cmdq_ring.log2_entries(), limit) {
            Ok(run) => run,
            Err(e) => {
                strtab.free(frames);
                return Err(e);
            }
        };
        let evtq_run = match alloc_run(frames, EVENT_BYTES << evtq_ring.log2_entries(), limit) {
            Ok(run) => run,
            Err(e) => {
                frames.free_pages(cmdq_run.base, cmdq_run.count);
                strtab.free(frames);
                return Err(e);
            }
        };
        let mut smmu = Smmu {
            regs,
            phys,
            features,
            geometry: Stage2Geometry::new(features),
            strtab,
            cmdq: CommandQueue { run: cmdq_run, ring: cmdq_ring, prod: 0 },
            evtq: EventQueue { run: evtq_run, ring: evtq_ring, cons: 0, overflow_ack: 0 },
            assignments: BTreeMap::new(),
            spin_budget: config.spin_budget,
        };
        smmu.enable()?;
        Ok(smmu)
    }

    /// The enable sequence described at [`Smmu::init`].
    fn enable(&mut self) -> Result<(), Error> {
        self.set_global_abort()?;
        self.write_cr0(0)?;
        let gerror = self.regs.read32(GERROR);
        self.regs.write32(GERRORN, gerror);
        self.regs.write32(CR1, CR1_VALUE);
        self.regs.write32(CR2, CR2_RECINVSID);
        self.regs.write64(STRTAB_BASE, self.strtab.base_register());
        self.regs.write32(STRTAB_BASE_CFG, self.strtab.base_cfg());
        self.regs.write64(CMDQ_BASE, queue_base(&self.cmdq.run, self.cmdq.ring));
        self.regs.write32(CMDQ_PROD, self.cmdq.prod);
        self.regs.write32(CMDQ_CONS, 0);
        self.regs.write64(EVENTQ_BASE, queue_base(&self.evtq.run, self.evtq.ring));
        self.regs.write32(EVENTQ_PROD, 0);
        self.regs.write32(EVENTQ_CONS, self.evtq.cons);
        self.write_cr0(CR0_CMDQEN)?;
        self.issue(&[Command::CfgiAll, Command::TlbiNsnhAll])?;
        self.write_cr0(CR0_CMDQEN | CR0_EVENTQEN)?;
        self.write_cr0(CR0_CMDQEN | CR0_EVENTQEN | CR0_SMMUEN)
    }

    /// GBPA.ABORT = 1 with UPDATE = 1, then waits for UPDATE to clear.
    fn set_global_abort(&mut self) -> Result<(), Error> {
        let gbpa = self.regs.read32(GBPA) & !GBPA_UPDATE;
        self.regs.write32(GBPA, gbpa | GBPA_ABORT | GBPA_UPDATE);
        self.spin(Wait::GbpaUpdate, |regs| regs.read32(GBPA) & GBPA_UPDATE == 0)
    }

    /// Writes CR0's enables and waits for CR0ACK to show them.
    fn write_cr0(&mut self, enables: u32) -> Result<(), Error> {
        self.regs.write32(CR0, enables);
        self.spin(Wait::Cr0Ack { want: enables }, |regs| regs.read32(CR0ACK) & CR0_ENABLES == enables)
    }

    /// Polls `done` at most `spin_budget` times.
    fn spin(&self, what: Wait, done: impl Fn(&R) -> bool) -> Result<(), Error> {
        for _ in 0..self.spin_budget {
            if done(&self.regs) {
                return Ok(());
            }
            spin_loop();
        }
        Err(Error::Timeout(what))
    }

    /// What the SMMU offers.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// How STEs describe stage-2 tables on this SMMU.
    pub fn geometry(&self) -> Stage2Geometry {
        self.geometry
    }

    /// The register file, e.g. to inspect a fake in tests.
    pub fn regs(&self) -> &R {
        &self.regs
    }

    /// The assignment of `stream_id`, if any.
    pub fn assignment(&self, stream_id: u32) -> Option<Assignment> {
        self.assignments.get(&stream_id).copied()
    }

    /// Every assignment, by StreamID.
    pub fn assignments(&self) -> impl Iterator<Item = Assignment> + '_ {
        self.assignments.values().copied()
    }

    /// Translates `stream_id` with stage 2 through the table at `s2_root`
    /// (a 4 KiB aligned level-0 table in the `ArmStage2` format), tagging
    /// its TLB entries with `vmid` — the guest's CPU VMID, so one
    /// [`invalidate_vmid`](Self::invalidate_vmid) after a table change
    /// covers every device of the guest.
    ///
    /// The STE changes without ever being a mix of old and new words
    /// (§3.21, structure update procedures): word 0 becomes abort while the other words are written,
    /// CFGI_STE + CMD_SYNC (plus TLBI_S12_VMALL if no other stream uses
    /// `vmid`, dropping TLB entries of an earlier owner of the VMID); then
    /// word 0 becomes stage-2, CFGI_STE + CMD_SYNC. May take an L2 array
    /// from `frames`.
    pub fn assign<F: FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        stream_id: u32,
        vmid: u16,
        s2_root: u64,
    ) -> Result<(), Error> {
        self.check_stream_id(stream_id)?;
        self.check_vmid(vmid)?;
        if !s2_root.is_multiple_of(S2_ROOT_ALIGN) || s2_root >= self.geometry.output_size().limit() {
            return Err(Error::BadStage2Root { s2_root });
        }
        let wanted = Assignment { stream_id, vmid, s2_root };
        if self.assignments.get(&stream_id) == Some(&wanted) {
            return Ok(());
        }
        let limit = self.features.oas.limit();
        let (ste, new_l1) = self.strtab.prepare(frames, &self.phys, stream_id, limit)?;
        let words = SteConfig::Stage2 { vmid, s2_root }.encode(self.geometry);

        write_word(&self.phys, ste, SteConfig::abort_word0());
        self.assignments.remove(&stream_id);
        for (index, word) in words.iter().enumerate().skip(1) {
            write_word(&self.phys, ste + index as u64 * WORD_BYTES, *word);
        }
        let invalidate = Command::CfgiSte { stream_id, leaf: !new_l1 };
        if self.assignments.values().any(|a| a.vmid == vmid) {
            self.issue(&[invalidate])?;
        } else {
            self.issue(&[invalidate, Command::TlbiS12Vmall { vmid }])?;
        }

        write_word(&self.phys, ste, words[0]);
        self.assignments.insert(stream_id, wanted);
        self.issue(&[Command::CfgiSte { stream_id, leaf: true }])
    }

    /// Makes `stream_id` abort again: word 0 becomes abort (one store),
    /// CFGI_STE + CMD_SYNC, then the now-ignored words are cleared. A stream
    /// that is not assigned is left alone.
    pub fn unassign(&mut self, stream_id: u32) -> Result<(), Error> {
        self.check_stream_id(stream_id)?;
        if self.assignments.remove(&stream_id).is_none() {
            return Ok(());
        }
        let Some(ste) = self.strtab.ste_address(stream_id) else {
            return Ok(());
        };
        write_word(&self.phys, ste, SteConfig::abort_word0());
        self.issue(&[Command::CfgiSte { stream_id, leaf: true }])?;
        for index in 1..STE_WORDS as u64 {
            write_word(&self.phys, ste + index * WORD_BYTES, 0);
        }
        Ok(())
    }

    /// Drops every TLB entry tagged with `vmid` (TLBI_S12_VMALL + CMD_SYNC):
    /// the hypervisor calls this after unmapping or changing a mapping in a
    /// guest's stage-2 table, next to its own TLBI for the CPU.
    pub fn invalidate_vmid(&mut self, vmid: u16) -> Result<(), Error> {
        self.check_vmid(vmid)?;
        self.issue(&[Command::TlbiS12Vmall { vmid }])
    }

    fn check_stream_id(&self, stream_id: u32) -> Result<(), Error> {
        let bits = self.strtab.log2size();
        if u64::from(stream_id) >> bits != 0 {
            return Err(Error::StreamIdOutOfRange { stream_id, bits });
        }
        Ok(())
    }

    fn check_vmid(&self, vmid: u16) -> Result<(), Error> {
        let bits = self.features.vmid_bits;
        if u32::from(vmid) >> bits != 0 {
            return Err(Error::VmidOutOfRange { vmid, bits });
        }
        Ok(())
    }

    /// Queues `commands` and a CMD_SYNC, and waits for the CMD_SYNC.
    fn issue(&mut self, commands: &[Command]) -> Result<(), Error> {
        self.cmdq.issue(&mut self.regs, &self.phys, commands, self.spin_budget)
    }

    /// Drains the event queue into `sink`, oldest first, and hands the
    /// entries back to the SMMU. Takes at most one queue's worth of events
    /// per call, so a flood cannot hold the caller.
    pub fn poll_events(&mut self, mut sink: impl FnMut(Event)) -> Result<EventSummary, Error> {
        self.evtq.poll(&mut self.regs, &self.phys, &mut sink)
    }

    /// Event records the SMMU has written and [`Smmu::poll_events`] has not
    /// yet taken (reads EVENTQ_PROD, writes nothing): after an adopt, the
    /// faults recorded since the previous image last polled, in its
    /// blackout included. `None` if PROD is inconsistent with CONS.
    pub fn events_waiting(&self) -> Option<u32> {
        let prod = self.regs.read32(EVENTQ_PROD) & !EVENTQ_OVERFLOW;
        let ring = self.evtq.ring;
        (ring.is_pointer(prod) && ring.is_consistent(prod, self.evtq.cons)).then(|| ring.used(prod, self.evtq.cons))
    }

    /// The state a next image needs to adopt this SMMU (plain integers, for
    /// a handover state record). Take it once the command queue is drained
    /// (after any successful call, it is).
    pub fn state(&self) -> SmmuState {
        SmmuState {
            strtab_base: self.strtab.base(),
            strtab_format: self.strtab.format().encoding(),
            strtab_split: self.strtab.format().split(),
            strtab_log2size: self.strtab.log2size(),
            cmdq_base: self.cmdq.run.base,
            cmdq_log2size: self.cmdq.ring.log2_entries(),
            cmdq_prod: self.cmdq.prod,
            cmdq_cons: self.regs.read32(CMDQ_CONS) & self.cmdq.ring.pointer_mask(),
            evtq_base: self.evtq.run.base,
            evtq_log2size: self.evtq.ring.log2_entries(),
            evtq_cons: self.evtq.cons | self.evtq.overflow_ack,
            assignments: self.assignments.values().copied().collect(),
        }
    }

    /// Every run of pages the driver owns — stream table (and L2 arrays),
    /// command queue, event queue — to be preserved across a live update.
    pub fn pages(&self) -> Vec<PageRun> {
        self.strtab.runs().chain([self.cmdq.run, self.evtq.run]).collect()
    }
}

/// The ring for a configured queue size, if the SMMU and driver allow it.
fn queue_ring(queue: QueueKind, log2: u8, min: u8, max: u8) -> Result<Ring, Error> {
    let error = Error::QueueSize { queue, log2, min, max };
    if log2 < min || log2 > max {
        return Err(error);
    }
    Ring::new(log2).ok_or(error)
}

/// SMMU_CMDQ_BASE / SMMU_EVENTQ_BASE for a queue.
pub(crate) fn queue_base(run: &PageRun, ring: Ring) -> u64 {
    QUEUE_BASE_ALLOCATE | run.base | QUEUE_BASE_LOG2SIZE.place(u64::from(ring.log2_entries()))
}

impl CommandQueue {
    fn entry(&self, pointer: u32) -> u64 {
        self.run.base + u64::from(self.ring.index(pointer)) * COMMAND_BYTES
    }

    fn write_entry<P: PhysToVirt + ?Sized>(&self, phys: &P, pointer: u32, command: Command) {
        let [first, second] = command.encode();
        let entry = self.entry(pointer);
        write_word(phys, entry, first);
        write_word(phys, entry + WORD_BYTES, second);
    }

    /// Writes `commands` and a CMD_SYNC (§4.7) into the queue, publishes
    /// them with one PROD write, and polls CONS until it passes the
    /// CMD_SYNC, which means every command before it has completed.
    fn issue<R: SmmuRegs + ?Sized, P: PhysToVirt + ?Sized>(
        &mut self,
        regs: &mut R,
        phys: &P,
        commands: &[Command],
        budget: u32,
    ) -> Result<(), Error> {
        // At most two commands and the CMD_SYNC: within MIN_CMDQ_LOG2.
        let needed = commands.len() as u32 + 1;
        self.wait(regs, phys, budget, Wait::CommandSpace, |ring, prod, cons| ring.free(prod, cons) >= needed)?;
        for command in commands.iter().copied().chain(once(Command::Sync)) {
            self.write_entry(phys, self.prod, command);
            self.prod = self.ring.advance(self.prod, 1);
        }
        fence(Ordering::Release);
        regs.write32(CMDQ_PROD, self.prod);
        self.wait(regs, phys, budget, Wait::CommandSync, Ring::is_empty)
    }

    /// Polls CONS (at most `budget` times) until `done(ring, prod, cons)`,
    /// reporting a command error or service failure as soon as GERROR
    /// shows it.
    fn wait<R: SmmuRegs + ?Sized, P: PhysToVirt + ?Sized>(
        &mut self,
        regs: &mut R,
        phys: &P,
        budget: u32,
        what: Wait,
        done: impl Fn(Ring, u32, u32) -> bool,
    ) -> Result<(), Error> {
        for _ in 0..budget {
            let active = regs.read32(GERROR) ^ regs.read32(GERRORN);
            if active & GERROR_SFM_ERR != 0 {
                return Err(Error::ServiceFailure);
            }
            let cons_reg = regs.read32(CMDQ_CONS);
            let cons = cons_reg & self.ring.pointer_mask();
            if !self.ring.is_consistent(self.prod, cons) {
                return Err(Error::QueueInconsistent { queue: QueueKind::Command, prod: self.prod, cons: cons_reg });
            }
            if active & GERROR_CMDQ_ERR != 0 {
                return Err(self.recover(regs, phys, cons_reg));
            }
            if done(self.ring, self.prod, cons) {
                return Ok(());
            }
            spin_loop();
        }
        Err(Error::Timeout(what))
    }

    /// Command-queue error recovery (§7.1): CONS stopped at the rejected
    /// command and CONS.ERR says why. Replace the command with a CMD_SYNC,
    /// then acknowledge GERROR.CMDQ_ERR through GERRORN, and the SMMU
    /// carries on from there.
    fn recover<R: SmmuRegs + ?Sized, P: PhysToVirt + ?Sized>(
        &mut self,
        regs: &mut R,
        phys: &P,
        cons_reg: u32,
    ) -> Error {
        let error = CommandError::from_code(CMDQ_CONS_ERR.get(u64::from(cons_reg)) as u8);
        self.write_entry(phys, cons_reg, Command::Sync);
        fence(Ordering::Release);
        let gerrorn = regs.read32(GERRORN);
        regs.write32(GERRORN, gerrorn ^ GERROR_CMDQ_ERR);
        Error::CommandRejected { error, index: self.ring.index(cons_reg) }
    }
}

impl EventQueue {
    /// Reads every record between CONS and the SMMU's PROD (§3.5, §7.2
    /// overflow), then writes CONS once with OVACKFLG = OVFLG.
    fn poll<R: SmmuRegs + ?Sized, P: PhysToVirt + ?Sized>(
        &mut self,
        regs: &mut R,
        phys: &P,
        sink: &mut dyn FnMut(Event),
    ) -> Result<EventSummary, Error> {
        let prod_reg = regs.read32(EVENTQ_PROD);
        let prod = prod_reg & !EVENTQ_OVERFLOW;
        if !self.ring.is_pointer(prod) || !self.ring.is_consistent(prod, self.cons) {
            return Err(Error::QueueInconsistent { queue: QueueKind::Event, prod: prod_reg, cons: self.cons });
        }
        fence(Ordering::Acquire);
        let events = self.ring.used(prod, self.cons);
        for _ in 0..events {
            let entry = self.run.base + u64::from(self.ring.index(self.cons)) * EVENT_BYTES;
            let raw: [u64; EVENT_WORDS] =
                core::array::from_fn(|word| read_word(phys, entry + word as u64 * WORD_BYTES));
            sink(Event::decode(raw));
            self.cons = self.ring.advance(self.cons, 1);
        }
        let overflow = prod_reg & EVENTQ_OVERFLOW;
        let overflowed = overflow != self.overflow_ack;
        self.overflow_ack = overflow;
        // Every read of the records completes before the SMMU may reuse
        // them (the register write orders it on hardware).
        fence(Ordering::SeqCst);
        regs.write32(EVENTQ_CONS, self.cons | self.overflow_ack);
        Ok(EventSummary { events, overflowed })
    }
}
