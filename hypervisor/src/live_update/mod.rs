//! Live update, the arch-neutral orchestration (`shared/DESIGN.md` §5):
//! checking and staging the new image, the update participants (CPU
//! stopper, test fault injector, machine state) driven by
//! `kho::UpdateStateMachine`, writing the handover, and on the restore
//! side adopting the preserved map and the machine. The arch code supplies
//! what differs behind [`UpdatePlatform`] (kicking CPUs, putting vCPUs
//! away, the counter, its own image checks) and does the kexec itself.
//!
//! Shared state is owned here, once: the freeze [`HANDSHAKE`] between the
//! CPUs and the incoming image's blackout [`REPORT`]; their modules give
//! the access rules.

pub mod handshake;
pub mod incoming;
pub mod report;
pub mod request;
pub mod rollback;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use hvcall::Status;
use kho::{HandoverError, HandoverIdentity, HandoverReader, HandoverWriter, RamMap, ScratchKind, ScratchPlan};
use kho::{UpdateError, UpdateParticipant, UpdateStateMachine};
use loader::image_desc::{Descriptor, ImageArch};
use loader::image_readers;
use loader::PhysRange;
use sparse_bitmap::MultiOrderBitmap;

use crate::frames::{self, FrameAllocator, PAGE_SIZE};
use crate::machine::{
    self, Handover, Machine, MachineLock, MachineMemory, RestoreError, SaveError, StateForm, TableBlock,
};
use crate::preserved::PreservedMap;
use crate::records::{code_hash, HandoffRecord, StateTableRecord};
use crate::slots::Placement;
use crate::state_table::TableError;
use crate::{hv_event, println, BUILD_ID, VERSION};

use handshake::{Generation, Handshake, Thawed};
use report::BlackoutReport;
pub use request::{blackout_us, check_request, RequestError};

/// How long the requesting CPU waits for the others to stop.
pub const STOP_TIMEOUT_MS: u64 = 1000;
/// Room for the handover blob (records are ~1 KiB per vCPU).
pub const HANDOVER_BYTES: u64 = 256 << 10;

/// The freeze handshake of this image's CPUs.
pub static HANDSHAKE: Handshake = Handshake::new();
/// The blackout report of the update that started this image.
pub static REPORT: BlackoutReport = BlackoutReport::new();

/// What a live update needs from the architecture.
pub trait UpdatePlatform {
    type Arch: Handover;
    /// The machine being updated.
    fn machine(&self) -> &MachineLock<Self::Arch>;
    /// The CPUs' freeze handshake.
    fn handshake(&self) -> &Handshake;
    /// The free-running counter and its frequency in Hz.
    fn counter(&self) -> (u64, u64);
    /// Makes every CPU but `cpu` leave its guest soon (an IPI, or nothing
    /// where the time-slice timer bounds the wait).
    fn kick_others(&self, m: &Machine<Self::Arch>, cpu: usize);
    /// Puts this CPU's vCPUs away for a freeze: the loaded one saved, and
    /// whatever else the CPU holds of them (VMCSs) written back.
    fn freeze_cpu(&self, m: &mut Machine<Self::Arch>, cpu: usize) -> Result<(), &'static str>;
    /// Arch checks of a staged image that passed the descriptor's (for
    /// x86_64: its ELF segments and handover entry, and that it reads the
    /// records only this arch writes; `readers` is its reader table, if it
    /// has a valid one); a refusal reason.
    fn check_image(
        &self,
        staged: &[u8],
        desc: &Descriptor,
        readers: Option<&image_readers::Readers>,
    ) -> Result<(), &'static str>;
    /// Where the checked image goes ([`crate::slots`]). For the other slot
    /// the arch puts it there now, while the guests run: copied, bss
    /// cleared, caches made coherent, ready to be entered (and, on
    /// aarch64, prepared through the entry `desc`, the descriptor
    /// `check_image` accepted, names). A refusal reason if it fits no slot.
    fn place(&self, staged: &[u8], desc: &Descriptor) -> Result<Placement, &'static str>;
    /// This image's code and read-only data (for the handoff record's
    /// intactness check) and where its CPUs park for a direct handover.
    fn handoff(&self) -> HandoffPlan;
    /// Sets the status the requesting vCPU sees when it next runs.
    fn set_status(&self, m: &mut Machine<Self::Arch>, status: Status);
    /// Waits for, and sends, a wake-up between CPUs (WFE/SEV, PAUSE).
    fn wait(&self);
    fn wake(&self);
    /// One turn of a busy-wait for another CPU (YIELD on aarch64: an
    /// emulator that runs CPUs round-robin then switches to the CPU being
    /// waited for instead of spinning out its time slice).
    fn relax(&self);
}

/// What the arch contributes to the handoff record.
#[derive(Clone, Copy, Debug)]
pub struct HandoffPlan {
    /// The parking mailbox: one u64 per CPU index.
    pub mailbox: u64,
    /// The image's code and read-only data.
    pub code: PhysRange,
    /// The CPU that enters the new image, if not the requester's (x86_64:
    /// the bootstrap processor, the only one INIT does not send back to
    /// the firmware). Every other CPU online parks.
    pub enters: Option<usize>,
}

/// The CPUs that park in the mailbox for a direct handover (bit n: CPU
/// n): every CPU online but the one that enters the new image and those
/// with nothing left to run (`parked_for_good`: they halted outside the
/// mailbox and are started the old way).
pub fn parked_mask(online: &[usize], enters: usize, parked_for_good: impl Fn(usize) -> bool) -> u64 {
    online.iter().filter(|&&c| c != enters && c < 64 && !parked_for_good(c)).fold(0u64, |a, &c| a | 1 << c)
}

/// Why a participant stopped an update after the freeze began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// A CPU did not reach an exit boundary before the deadline.
    FreezeTimeout {
        cpu: usize,
    },
    /// The `TEST_FAIL_NEXT_FREEZE` hook fired.
    InjectedFailure,
    /// A CPU could not put its vCPUs away.
    FreezeCpu(&'static str),
    /// The machine's state could not be recorded.
    Save(Box<SaveError>),
    /// The handover could not be written out.
    HandoverWrite(Box<HandoverError>),
    /// The arch could not prepare the kexec.
    Kexec(&'static str),
    NoMachine,
    /// The state machine refused a transition (a bug).
    StateMachine,
}

impl fmt::Display for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FreezeTimeout { .. } => f.write_str("freeze-timeout"),
            Self::InjectedFailure => f.write_str("injected-freeze-failure"),
            Self::FreezeCpu(reason) | Self::Kexec(reason) => f.write_str(reason),
            Self::Save(e) => write!(f, "{e}"),
            Self::HandoverWrite(_) => f.write_str("handover-write"),
            Self::NoMachine => f.write_str("no-machine"),
            Self::StateMachine => f.write_str("state-machine"),
        }
    }
}

/// Why a request was refused before anything changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another update is running.
    Busy,
    Request(RequestError),
    /// The arch's own image checks.
    Image(&'static str),
    TooLarge,
    RamMap,
    HandoverWriter(HandoverError),
    NoMemoryForHandover,
    NoMachine,
    /// The image's table of what it reads is malformed.
    Readers(image_readers::ReadersError),
    /// The image cannot read a record (or vCPU context) this one writes.
    Unreadable(image_readers::Unreadable),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Busy => f.write_str("update-in-progress"),
            Self::Request(e) => f.write_str(e.reason()),
            Self::Image(reason) => f.write_str(reason),
            Self::TooLarge => f.write_str("too-large"),
            Self::RamMap => f.write_str("ram-map"),
            Self::HandoverWriter(_) => f.write_str("handover-writer"),
            Self::NoMemoryForHandover => f.write_str("no-memory-for-handover"),
            Self::NoMachine => f.write_str("no-machine"),
            Self::Readers(e) => write!(f, "{e}"),
            Self::Unreadable(u) => write!(f, "{u}"),
        }
    }
}

/// Why an update stopped before the kexec; the guests continue either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Abort {
    /// The request or the image was refused (`hv: update-refused`).
    Refused(Refusal),
    /// A participant failed after the freeze began (`hv: update-cancelled`).
    Cancelled(Cancel),
}

/// A non-requesting CPU, at an exit boundary: puts its vCPUs away,
/// acknowledges the freeze and waits to be thawed (returns) or sent off
/// for the kexec (`off`, which does not return, and calls
/// [`Handshake::left`] once the CPU is out of the way). If its vCPUs cannot be
/// put away it does not acknowledge (the requester times out and cancels)
/// and waits for the thaw.
pub fn freeze_this_cpu<P: UpdatePlatform>(p: &P, cpu: usize, off: fn(Generation) -> !) {
    let put = p.machine().with(|m| p.freeze_cpu(m, cpu)).unwrap_or(Err("no-machine"));
    if let Err(e) = put {
        println!("update: cpu {cpu}: {e}");
        while p.handshake().freeze_requested() {
            p.wait();
        }
        return;
    }
    match p.handshake().freeze_here(cpu, || p.wait()) {
        Thawed::Resume => {}
        Thawed::Kexec(generation) => off(generation),
    }
}

fn expired_after<P: UpdatePlatform>(p: &P, ms: u64) -> impl Fn() -> bool + '_ {
    let (t0, _) = p.counter();
    move || {
        let (now, hz) = p.counter();
        blackout_us(t0, now, hz) / 1000 > ms
    }
}

/// Stops the other CPUs at exit boundaries (blackout starts here).
struct CpuStopper<'a, P> {
    platform: &'a P,
    cpu: usize,
    generation: &'a core::cell::Cell<Option<Generation>>,
}

impl<P: UpdatePlatform> UpdateParticipant for CpuStopper<'_, P> {
    type Error = Cancel;

    fn name(&self) -> &'static str {
        "cpus"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Cancel> {
        Ok(())
    }

    fn freeze(&mut self, _: &mut HandoverWriter) -> Result<(), Cancel> {
        let p = self.platform;
        let generation = p.handshake().request_freeze();
        self.generation.set(Some(generation));
        let online = p
            .machine()
            .with(|m| {
                p.kick_others(m, self.cpu);
                p.freeze_cpu(m, self.cpu).map(|()| m.online.clone())
            })
            .ok_or(Cancel::NoMachine)
            .and_then(|r| r.map_err(Cancel::FreezeCpu));
        let online = match online {
            Ok(online) => online,
            Err(e) => {
                self.unfreeze();
                return Err(e);
            }
        };
        let frozen =
            p.handshake().wait_frozen(generation, self.cpu, &online, expired_after(p, STOP_TIMEOUT_MS), || p.relax());
        if let Err(t) = frozen {
            // The state machine unfreezes only the participants that froze:
            // this one failed half-way, so it thaws the CPUs it stopped.
            self.unfreeze();
            return Err(Cancel::FreezeTimeout { cpu: t.cpu });
        }
        Ok(())
    }

    fn unfreeze(&mut self) {
        if let Some(generation) = self.generation.take() {
            self.platform.handshake().thaw(generation);
            self.platform.wake();
        }
    }

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Cancel> {
        Ok(())
    }

    fn resume(&mut self) {}

    fn finish(&mut self) {}
}

/// Test hook: fails the freeze once when armed (`TEST_FAIL_NEXT_FREEZE`).
struct FaultInjector<'a, P> {
    platform: &'a P,
}

impl<P: UpdatePlatform> UpdateParticipant for FaultInjector<'_, P> {
    type Error = Cancel;

    fn name(&self) -> &'static str {
        "fault-injector"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Cancel> {
        Ok(())
    }

    fn freeze(&mut self, _: &mut HandoverWriter) -> Result<(), Cancel> {
        let armed = self.platform.machine().with(|m| core::mem::take(&mut m.fail_next_freeze));
        match armed {
            Some(true) => Err(Cancel::InjectedFailure),
            Some(false) => Ok(()),
            None => Err(Cancel::NoMachine),
        }
    }

    fn unfreeze(&mut self) {}

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Cancel> {
        Ok(())
    }

    fn resume(&mut self) {}

    fn finish(&mut self) {}
}

/// Records the machine (partitions, vCPUs, devices, preserved map), and
/// the handoff record if the new image reads it.
struct StateSaver<'a, P> {
    platform: &'a P,
    freeze_counter: u64,
    /// The handoff record, but for the CPUs to park (filled in at the
    /// freeze: [`parked_mask`]).
    handoff: Option<HandoffRecord>,
    /// The CPU that enters the new image.
    enters: usize,
    /// The block set aside for the state table in the brownout (the new
    /// image reads it), and how the state went in.
    table: Option<PhysRange>,
    form: &'a core::cell::Cell<Option<StateForm>>,
}

impl<P: UpdatePlatform> UpdateParticipant for StateSaver<'_, P> {
    type Error = Cancel;

    fn name(&self) -> &'static str {
        "machine"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Cancel> {
        Ok(())
    }

    fn freeze(&mut self, w: &mut HandoverWriter) -> Result<(), Cancel> {
        let (_, hz) = self.platform.counter();
        let counter = self.freeze_counter;
        self.platform
            .machine()
            .with(|m| {
                // Complete lines still queued are not in the handover (only
                // each partition's unfinished line is): they go out now,
                // before it.
                for line in m.take_output() {
                    println!("{line}");
                }
                let handshake = self.platform.handshake();
                let parked = parked_mask(&m.online, self.enters, |c| handshake.parked_for_good(c));
                let table = self.table.map(|at| TableBlock {
                    // SAFETY: a block allocated for the table in the
                    // brownout, identity-mapped, used by nothing else until
                    // the update ends.
                    bytes: unsafe { core::slice::from_raw_parts_mut(at.base as *mut u8, at.size as usize) },
                    at,
                });
                let form = m.save_state(w, counter, hz, table)?;
                self.form.set(Some(form));
                Ok(parked)
            })
            .ok_or(Cancel::NoMachine)?
            .map_err(|e| Cancel::Save(Box::new(e)))
            .and_then(|parked| match self.handoff.clone() {
                None => Ok(()),
                Some(mut rec) => {
                    if rec.mailbox != 0 {
                        rec.parked = parked;
                    }
                    w.subsystem("handoff")
                        .and_then(|mut s| s.add_record(&rec))
                        .map_err(|e| Cancel::HandoverWrite(Box::new(e)))
                }
            })
    }

    fn unfreeze(&mut self) {}

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Cancel> {
        Ok(())
    }

    fn resume(&mut self) {}

    fn finish(&mut self) {}
}

/// A live-update request, as the arch code saw it.
#[derive(Debug)]
pub struct Request {
    /// The requesting CPU.
    pub cpu: usize,
    /// The image in the caller's RAM (checked by the hypercall layer).
    pub image_pa: u64,
    pub size: u64,
    pub arch: ImageArch,
    /// Scratch kept free after the staged image (the kexec trampoline).
    pub tail_bytes: u64,
}

/// Everything the kexec needs, once the guests are frozen.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    /// The staged image in scratch and its length.
    pub stage: PhysRange,
    pub image_len: u64,
    /// The handover blob in preserved memory and its length: the start of
    /// the block `handover`, which also holds the state table.
    pub handover: PhysRange,
    pub handover_len: u64,
    /// The state table, if the handover has one: inside `handover`, after
    /// the blob's room.
    pub table: Option<PhysRange>,
    /// Where the image was put; the kexec enters it there.
    pub placement: Placement,
    /// The other CPUs park in this image's code for the new one to
    /// release (instead of leaving through the firmware).
    pub park: bool,
    /// The freeze, for sending the CPUs off.
    pub generation: Generation,
}

fn refuse<P: UpdatePlatform>(p: &P, why: Refusal) -> Abort {
    hv_event!("update-refused", reason = why);
    p.machine().with(|m| p.set_status(m, Status::InvalidParameter));
    Abort::Refused(why)
}

/// Stages and checks the image, allocates the handover (brownout), freezes
/// every CPU through the participants, and writes the handover. On refusal
/// (`hv: update-refused`) or cancel (`hv: update-cancelled`) the
/// requester's status is set, the other CPUs are thawed, the update is
/// released, and the guests continue.
pub fn prepare_and_freeze<P: UpdatePlatform>(p: &P, req: &Request) -> Result<Ready, Abort> {
    if !p.handshake().begin() {
        p.machine().with(|m| p.set_status(m, Status::OperationDenied));
        return Err(Abort::Refused(Refusal::Busy));
    }
    let result = stage_and_freeze(p, req);
    if result.is_err() {
        p.handshake().end();
    }
    result
}

fn stage_and_freeze<P: UpdatePlatform>(p: &P, req: &Request) -> Result<Ready, Abort> {
    let Some((ram, scratch, update_count)) = p.machine().with(|m| (m.ram.clone(), m.scratch.clone(), m.update_count))
    else {
        return Err(Abort::Refused(Refusal::NoMachine));
    };
    let stage = staging(&scratch).unwrap_or(PhysRange::new(0, 0));
    // Copy first, then validate the copy: the guest cannot change what was
    // checked. The trampoline takes the tail after the image.
    let limit = stage.size.saturating_sub(req.tail_bytes.next_multiple_of(PAGE_SIZE));
    let len = usize::try_from(req.size).map_err(|_| refuse(p, Refusal::TooLarge))?;
    if req.size > limit {
        return Err(refuse(p, Refusal::TooLarge));
    }
    // SAFETY: `image_pa..+size` was checked to lie in the caller's RAM (the
    // hypercall layer), the staging area is scratch that nothing else uses,
    // and both are identity-mapped.
    let staged = unsafe {
        core::ptr::copy_nonoverlapping(req.image_pa as *const u8, stage.base as *mut u8, len);
        core::slice::from_raw_parts(stage.base as *const u8, len)
    };
    let desc = match check_request(staged, req.arch, limit) {
        Ok(d) => d,
        Err(e) => {
            println!("update: {e}");
            return Err(refuse(p, Refusal::Request(e)));
        }
    };
    let readers = checked_readers(p, staged, &desc)?;
    // Brownout: the image goes where it will run (for the other slot:
    // copied, bss cleared, caches coherent) while the guests still run.
    let placement = p.place(staged, &desc).map_err(|r| refuse(p, Refusal::Image(r)))?;
    // A direct handover needs the new image to read the handoff record and
    // the old image's code to stay where the parked CPUs wait.
    let reads_handoff = readers.as_ref().is_some_and(|r| r.reads(<HandoffRecord as kho::StateRecord>::ID, 1));
    let plan = p.handoff();
    let enters = plan.enters.unwrap_or(req.cpu);
    let handoff = reads_handoff.then(|| plan_handoff(&plan, placement));
    let park = handoff.as_ref().is_some_and(|h| h.mailbox != 0);
    let count = update_count + 1;
    hv_event!(
        "update-begin",
        from = VERSION,
        to = desc.version_str(),
        image_bytes = req.size,
        count = count,
        image = placement.name(),
        cpus = if park { "parked" } else { "firmware" },
    );
    if rollback::break_mode() == Some(rollback::Break::Slow) {
        rollback::spin_ms(rollback::SLOW_MS, || p.counter(), || p.relax());
    }
    let identity = HandoverIdentity { version: VERSION, build_id: BUILD_ID, update_count: count };
    let ram_map = ram_map(&ram).ok_or_else(|| refuse(p, Refusal::RamMap))?;
    let mut writer =
        HandoverWriter::new(&identity, ram_map, &scratch).map_err(|e| refuse(p, Refusal::HandoverWriter(e)))?;
    let room = table_room(p, readers.as_ref());
    let handover = p.machine().with(|m| m.frames.alloc_block(HANDOVER_BYTES + room)).flatten();
    let handover = handover.ok_or_else(|| refuse(p, Refusal::NoMemoryForHandover))?;
    let table = (room != 0).then(|| PhysRange::new(handover.base + HANDOVER_BYTES, room));
    let form = core::cell::Cell::new(None);
    let release = |why: Cancel| {
        p.machine().with(|m| {
            m.frames.free_block(handover);
            p.set_status(m, Status::OperationDenied);
        });
        hv_event!("update-cancelled", reason = why);
        Abort::Cancelled(why)
    };
    // The requester sees SUCCESS when it runs again, in the new image.
    p.machine().with(|m| p.set_status(m, Status::Success));
    // Lines still queued for the UART go out now, while the guests run:
    // the next image resets the UART, so they must be out before it.
    crate::console::flush();
    let (freeze_counter, _) = p.counter();
    let generation = core::cell::Cell::new(None);
    let mut sm: UpdateStateMachine<'_, Cancel> = UpdateStateMachine::new();
    let saver = StateSaver { platform: p, freeze_counter, handoff, enters, table, form: &form };
    let registered = sm
        .register(Box::new(CpuStopper { platform: p, cpu: req.cpu, generation: &generation }))
        .and_then(|()| sm.register(Box::new(FaultInjector { platform: p })))
        .and_then(|()| sm.register(Box::new(saver)));
    let result = registered.and_then(|()| sm.prepare(&mut writer)).and_then(|()| sm.freeze(&mut writer));
    if let Err(e) = result {
        let _ = sm.cancel();
        return Err(release(failure(e)));
    }
    // SAFETY: a block just allocated for the handover; identity-mapped.
    // The blob's room ends where the table starts.
    let blob_out = unsafe { core::slice::from_raw_parts_mut(handover.base as *mut u8, HANDOVER_BYTES as usize) };
    let written = writer.write_to(blob_out, handover.base);
    let table = table.filter(|_| form.get() == Some(StateForm::Table));
    match (written, generation.get()) {
        (Ok(n), Some(generation)) => {
            // The next image resets the UART: every byte written so far
            // leaves the transmitter first.
            crate::console::flush();
            let handover_len = n as u64;
            Ok(Ready { stage, image_len: req.size, handover, handover_len, table, placement, park, generation })
        }
        (Err(e), _) => {
            println!("update: handover: {e}");
            let _ = sm.cancel();
            Err(release(Cancel::HandoverWrite(Box::new(e))))
        }
        (Ok(_), None) => {
            let _ = sm.cancel();
            Err(release(Cancel::StateMachine))
        }
    }
}

/// The staged image's reader table, after the arch's checks of the image
/// (which see the table) and the check that the image reads what this one
/// writes, record by record; the refusal otherwise.
fn checked_readers<P: UpdatePlatform>(
    p: &P,
    staged: &[u8],
    desc: &Descriptor,
) -> Result<Option<image_readers::Readers>, Abort> {
    let readers = image_readers::find(staged);
    let valid = readers.as_ref().ok().and_then(Option::as_ref);
    p.check_image(staged, desc, valid).map_err(|r| refuse(p, Refusal::Image(r)))?;
    let readers = readers.map_err(|e| refuse(p, Refusal::Readers(e)))?;
    image_readers::check(readers.as_ref(), &crate::WRITES, <P::Arch as machine::Arch>::CONTEXT_FORMAT).map_err(
        |u| {
            println!("update: the image cannot read what this one hands over: {u:?}");
            refuse(p, Refusal::Unreadable(u))
        },
    )?;
    Ok(readers)
}

/// The state table's room, set aside in the brownout after the blob's in
/// the handover's block, for an image that reads the table (0: none, the
/// state goes into a node per partition and vCPU). The machine is written
/// into it at the freeze if it still fits.
fn table_room<P: UpdatePlatform>(p: &P, readers: Option<&image_readers::Readers>) -> u64 {
    if !readers.is_some_and(|r| r.reads(<StateTableRecord as kho::StateRecord>::ID, 1)) {
        return 0;
    }
    let geometry = p.machine().with(|m| m.table_geometry()).flatten();
    geometry.and_then(|g| g.bytes()).map_or(0, |b| (b as u64).next_multiple_of(PAGE_SIZE))
}

/// The handoff record for an image that reads it, but for the CPUs to
/// park (known at the freeze). The CPUs park only where this image stays
/// (the new one was staged in the other slot).
fn plan_handoff(plan: &HandoffPlan, placement: Placement) -> HandoffRecord {
    let alternate = matches!(placement, Placement::Alternate { .. });
    // SAFETY: this image's own code and read-only data, identity-mapped;
    // nothing writes them.
    let code = unsafe { core::slice::from_raw_parts(plan.code.base as *const u64, (plan.code.size / 8) as usize) };
    HandoffRecord {
        mailbox: if alternate { plan.mailbox } else { 0 },
        parked: 0,
        old_code_base: plan.code.base,
        old_code_len: plan.code.size,
        old_code_hash: code_hash(code.iter().copied()),
        staged: u32::from(alternate),
    }
}

/// Thaws the other CPUs after a freeze that succeeded but cannot be
/// followed by a kexec: the update is cancelled for `why`.
pub fn cancel_after_freeze<P: UpdatePlatform>(p: &P, ready: &Ready, why: &Cancel) {
    undo_freeze(p, ready.generation, ready.handover);
    hv_event!("update-cancelled", reason = why);
    p.handshake().end();
}

/// Undoes a freeze whose update will not happen (a cancel, or a rollback
/// after the kexec): the frozen CPUs thawed, the handover blob freed, and
/// the requester told OPERATION_DENIED. The caller ends the update.
pub fn undo_freeze<P: UpdatePlatform>(p: &P, generation: Generation, handover: PhysRange) {
    p.handshake().thaw(generation);
    p.wake();
    p.machine().with(|m| {
        m.frames.free_block(handover);
        p.set_status(m, Status::OperationDenied);
    });
}

/// The participant's error behind a failed prepare or freeze.
fn failure(e: UpdateError<Cancel>) -> Cancel {
    match e {
        UpdateError::FreezeFailed { error, .. } | UpdateError::PrepareFailed { error, .. } => error,
        _ => Cancel::StateMachine,
    }
}

/// The global scratch region: where the next image is staged.
pub fn staging(scratch: &ScratchPlan) -> Option<PhysRange> {
    scratch
        .regions()
        .iter()
        .find(|r| r.kind == ScratchKind::Global)
        .map(|r| PhysRange::new(r.range.base(), r.range.size()))
}

fn to_kho(r: &PhysRange) -> Option<kho::PhysRange> {
    kho::PhysRange::new(r.base, r.size).ok()
}

/// The RAM map in `kho`'s terms.
pub fn ram_map(ram: &[PhysRange]) -> Option<RamMap> {
    let ranges: Vec<kho::PhysRange> = ram.iter().filter_map(to_kho).collect();
    RamMap::new(&ranges).ok()
}

/// Plans the scratch regions at first boot with room for `image_bytes`,
/// reports them (`hv: scratch`) and adds them to `reserved`, so the frame
/// allocator never hands them out.
pub fn reserve_scratch(ram: &[PhysRange], reserved: &mut Vec<PhysRange>, image_bytes: u64) -> Option<ScratchPlan> {
    let scratch = plan_scratch(ram, reserved, image_bytes)?;
    for r in scratch.regions() {
        hv_event!(
            "scratch",
            kind = format_args!("{:?}", r.kind),
            base = format_args!("{:#x}", r.range.base()),
            size = r.range.size()
        );
        reserved.push(PhysRange::new(r.range.base(), r.range.size()));
    }
    Some(scratch)
}

/// Plans the scratch regions at first boot (`kho::ScratchPlan`): room for
/// the next image, never used for anything preserved.
pub fn plan_scratch(ram: &[PhysRange], occupied: &[PhysRange], image_bytes: u64) -> Option<ScratchPlan> {
    let needs = kho::ScratchNeeds { image_bytes, heap_bytes: 0, dma32_bytes: 0 };
    let occupied: Vec<kho::PhysRange> = occupied.iter().filter_map(to_kho).collect();
    ScratchPlan::plan(&ram_map(ram)?, &needs, &kho::ScratchPolicy::default(), &occupied).ok()
}

/// What the restore side adopted from the preserved map.
pub struct Adopted<P: sparse_bitmap::PhysToVirt + Clone> {
    pub bitmap: MultiOrderBitmap<P>,
    /// The allocator: free RAM, with no preserved page in it.
    pub frames: FrameAllocator,
    pub preserved_pages: u64,
}

impl<P: sparse_bitmap::PhysToVirt + Clone> core::fmt::Debug for Adopted<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Adopted").field("preserved_pages", &self.preserved_pages).finish_non_exhaustive()
    }
}

/// Why the new image could not adopt what the handover describes. The
/// image cannot continue: it reports the reason and stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdoptFailure {
    NoGlobalScratch,
    BitmapOrder(u32),
    Bitmap(sparse_bitmap::AdoptError),
    /// A preserved page would have been handed to the allocator.
    PreservedInAllocator,
    Machine(RestoreError),
    /// The incoming state machine refused a transition (a bug).
    StateMachine,
}

impl fmt::Display for AdoptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoGlobalScratch => f.write_str("no-global-scratch"),
            Self::BitmapOrder(_) => f.write_str("bitmap-order"),
            Self::Bitmap(_) => f.write_str("bitmap-adopt"),
            Self::PreservedInAllocator => f.write_str("preserved-pages-in-allocator"),
            Self::Machine(e) => write!(f, "{e}"),
            Self::StateMachine => f.write_str("state-machine"),
        }
    }
}

/// Adopts the preserved map from the handover, allocating only from
/// scratch until it is read, and builds the allocator around everything
/// preserved, checking that no preserved page is in it (reported in
/// `hv: update-restore`). `reserved` is what the platform and the running
/// image occupy.
///
/// # Safety
/// `pages` reaches the RAM the handover's bitmap lives in, and nothing
/// else touches the bitmap pages while this runs (only this CPU is up).
pub unsafe fn adopt_preserved<P: sparse_bitmap::PhysToVirt + Clone>(
    reader: &HandoverReader<'_>,
    ram: &[PhysRange],
    mut reserved: Vec<PhysRange>,
    pages: P,
) -> Result<Adopted<P>, AdoptFailure> {
    let scratch = reader.scratch();
    let staging = staging(scratch).ok_or(AdoptFailure::NoGlobalScratch)?;
    let mut scratch_frames = FrameAllocator::new(&[staging]);
    let mut roots = [0u64; 3];
    for r in reader.bitmap_roots() {
        let slot = sparse_bitmap::PageSize::ALL
            .iter()
            .position(|s| s.order() == r.order)
            .ok_or(AdoptFailure::BitmapOrder(r.order))?;
        roots[slot] = r.root;
    }
    let ram_ranges: Vec<core::ops::Range<u64>> = ram.iter().map(|r| r.base..r.base + r.size).collect();
    // SAFETY: the caller's contract.
    let bitmap = unsafe { MultiOrderBitmap::adopt(pages, &mut scratch_frames, roots, &ram_ranges) }
        .map_err(AdoptFailure::Bitmap)?;
    reserved.extend(scratch.regions().iter().map(|r| PhysRange::new(r.range.base(), r.range.size())));
    reserved.extend(reader.preserved_ranges().map(|r| PhysRange::new(r.base(), r.size())));
    let runs: Vec<core::ops::Range<u64>> = bitmap.runs().collect();
    reserved.extend(runs.iter().map(|r| PhysRange::new(r.start, r.end - r.start)));
    reserved.extend(bitmap.node_pages().map(|pa| PhysRange::new(pa, PAGE_SIZE)));
    let free = frames::subtract(ram, &reserved);
    let overlap = overlapping(&free, runs);
    hv_event!(
        "update-restore",
        free_ranges = free.len(),
        preserved_overlap = overlap,
        bitmap_nodes = bitmap.node_count()
    );
    if overlap != 0 {
        return Err(AdoptFailure::PreservedInAllocator);
    }
    let preserved_pages = bitmap.frame_count();
    Ok(Adopted { bitmap, frames: FrameAllocator::new(&free), preserved_pages })
}

/// How many of the `free` ranges hold a preserved page (`runs`): a sweep
/// over both lists sorted, instead of a bitmap search per free range.
fn overlapping(free: &[PhysRange], mut runs: Vec<core::ops::Range<u64>>) -> usize {
    let mut free: Vec<core::ops::Range<u64>> = free.iter().map(|r| r.base..r.base.saturating_add(r.size)).collect();
    free.sort_unstable_by_key(|r| r.start);
    runs.sort_unstable_by_key(|r| r.start);
    let mut k = 0;
    free.iter()
        .filter(|f| {
            // Runs that end at or before this free range cannot touch it
            // or any later one.
            while runs.get(k).is_some_and(|r| r.end <= f.start) {
                k += 1;
            }
            // The first run still ending after `f.start` overlaps `f` if it
            // starts before its end; a later run starts later still. Runs
            // may overlap each other, so one kept for the next free range
            // is checked again there.
            runs[k..].iter().take_while(|r| r.start < f.end).any(|r| r.end > f.start && !r.is_empty())
        })
        .count()
}

/// The bytes of the page-aligned `range`, if `mapper` maps its pages as
/// one run.
///
/// # Safety
/// `range` is RAM `mapper` maps, and nothing writes it while the slice is
/// used.
unsafe fn contiguous<'a, M: sparse_bitmap::PhysToVirt>(mapper: &M, range: PhysRange) -> Option<&'a [u8]> {
    if range.size == 0 || !range.size.is_multiple_of(PAGE_SIZE) || !range.base.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    let first = mapper.phys_to_virt(range.base) as usize;
    let run = (1..range.size / PAGE_SIZE)
        .all(|k| mapper.phys_to_virt(range.base + k * PAGE_SIZE) as usize == first + (k * PAGE_SIZE) as usize);
    // SAFETY: every page of the range is mapped for reads of 4096 bytes
    // (`PhysToVirt`'s contract), one after the other; the caller's
    // contract keeps it unwritten.
    run.then(|| unsafe { core::slice::from_raw_parts(first as *const u8, range.size as usize) })
}

/// The restore side, arch-neutral: adopts the preserved map, then the
/// machine (partitions with their second-stage tables in place, vCPUs).
/// Returns the machine and the figures for the report; the consumed
/// handover blob is still reserved (the incoming side frees it at Finish).
///
/// # Safety
/// As [`adopt_preserved`].
pub unsafe fn restore<A: Handover>(
    reader: &HandoverReader<'_>,
    ram: &[PhysRange],
    reserved: Vec<PhysRange>,
    pages: <A as machine::Arch>::Pages,
    arch: A,
    online: &[usize],
    counter: fn() -> u64,
) -> Result<(Machine<A>, report::RestoreFigures), AdoptFailure> {
    let mapper = pages.clone();
    // SAFETY: the caller's contract.
    let adopted = unsafe { adopt_preserved(reader, ram, reserved, pages) }?;
    REPORT.mark("preserved", counter());
    let preserved_pages = adopted.preserved_pages;
    let memory = MachineMemory {
        frames: adopted.frames,
        preserved: PreservedMap { bitmap: adopted.bitmap },
        scratch: reader.scratch().clone(),
        ram: ram.to_vec(),
    };
    let table_at = machine::table_of(reader).map_err(AdoptFailure::Machine)?;
    let table = match &table_at {
        None => None,
        Some((rec, at)) => {
            // Named by `pages-table`, so reserved with the blob (the reader
            // checked it is RAM); mapped as one run of pages.
            // SAFETY: a preserved range of the handover (the reader checked
            // it lies in RAM), which nothing writes until Finish frees it.
            let bytes = unsafe { contiguous(&mapper, *at) }
                .ok_or(AdoptFailure::Machine(RestoreError::Table(TableError::Length { bytes: rec.bytes, pages: 0 })))?;
            Some((rec, bytes))
        }
    };
    let mark = |name| REPORT.mark(name, counter());
    let restored = machine::restore(reader, arch, memory, online, table, &mark).map_err(AdoptFailure::Machine)?;
    let m = restored.machine;
    let figures = report::RestoreFigures {
        update_count: reader.update_count(),
        handover_bytes: reader.blob().len() as u64,
        preserved_pages,
        table: table_at.map(|(_, at)| at),
        freeze_counter: restored.freeze_counter,
        resume_cpus: 0,
    };
    Ok((m, figures))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::machine::fake::{FakeArch, FakePartition, FakeVcpu};
    use crate::partition::{GuestRam, PartitionInfo};
    use alloc::string::ToString;
    use core::cell::Cell;
    use sparse_bitmap::testing::Arena;

    /// The outgoing side on the fake arch: a counter that advances 100 ms
    /// per read, so deadlines pass without waiting.
    struct FakePlatform {
        machine: MachineLock<FakeArch>,
        handshake: Handshake,
        now: Cell<u64>,
        statuses: core::cell::RefCell<Vec<Status>>,
    }

    impl UpdatePlatform for FakePlatform {
        type Arch = FakeArch;
        fn machine(&self) -> &MachineLock<FakeArch> {
            &self.machine
        }
        fn handshake(&self) -> &Handshake {
            &self.handshake
        }
        fn counter(&self) -> (u64, u64) {
            self.now.set(self.now.get() + 100_000);
            (self.now.get(), 1_000_000)
        }
        fn kick_others(&self, m: &Machine<FakeArch>, cpu: usize) {
            for &c in m.online.iter().filter(|&&c| c != cpu) {
                crate::machine::Arch::kick(&m.arch, c);
            }
        }
        fn freeze_cpu(&self, m: &mut Machine<FakeArch>, cpu: usize) -> Result<(), &'static str> {
            m.put_loaded(cpu);
            Ok(())
        }
        fn check_image(
            &self,
            _: &[u8],
            _: &Descriptor,
            _: Option<&image_readers::Readers>,
        ) -> Result<(), &'static str> {
            Ok(())
        }
        fn place(&self, _: &[u8], _: &Descriptor) -> Result<Placement, &'static str> {
            Ok(Placement::InPlace)
        }
        fn handoff(&self) -> HandoffPlan {
            // "Code" the host can read, for the hash.
            let code: &'static [u64] = Box::leak(alloc::vec![0x5a5a_u64; 64].into_boxed_slice());
            HandoffPlan { mailbox: 0, code: PhysRange::new(code.as_ptr() as u64, 512), enters: None }
        }
        fn set_status(&self, _: &mut Machine<FakeArch>, status: Status) {
            self.statuses.borrow_mut().push(status);
        }
        fn wait(&self) {}
        fn wake(&self) {}
        fn relax(&self) {}
    }

    fn platform(online: &[usize]) -> FakePlatform {
        let arena: &'static Arena = Box::leak(Box::new(Arena::new(0x4000_0000, 16384)));
        let ram = alloc::vec![PhysRange::new(0x4000_0000, 64 << 20)];
        let image = PhysRange::new(0x4000_0000, 1 << 20);
        let scratch = plan_scratch(&ram, &[image], 4 << 20).expect("scratch");
        let mut reserved = alloc::vec![image];
        reserved.extend(scratch.regions().iter().map(|r| PhysRange::new(r.range.base(), r.range.size())));
        let memory = MachineMemory {
            frames: FrameAllocator::new(&frames::subtract(&ram, &reserved)),
            preserved: PreservedMap::new(arena),
            scratch,
            ram,
        };
        let mut m = Machine::new(FakeArch::default(), memory, online);
        let block = m.alloc_guest_ram(1 << 20).expect("ram");
        let info = PartitionInfo {
            id: 1,
            name: "g".into(),
            privileged: true,
            ram: GuestRam { host_base: block.base, size: 1 << 20 },
            vcpus: 2,
        };
        let part = FakePartition { stage2_root: block.base };
        m.add_partition(info, 1, part, alloc::vec![FakeVcpu::at(0), FakeVcpu::at(0)]).expect("partition");
        m.loaded[0] = Some(0);
        let p = FakePlatform {
            machine: MachineLock::new(),
            handshake: Handshake::new(),
            now: Cell::new(0),
            statuses: core::cell::RefCell::new(Vec::new()),
        };
        p.machine.install(m);
        p
    }

    /// Freezes through the same participants as `prepare_and_freeze`.
    fn freeze(p: &FakePlatform) -> Result<HandoverWriter, Cancel> {
        let (ram, scratch) = p.machine.with(|m| (m.ram.clone(), m.scratch.clone())).expect("machine");
        let identity = HandoverIdentity { version: "t", build_id: "t", update_count: 1 };
        let mut w = HandoverWriter::new(&identity, ram_map(&ram).expect("ram"), &scratch).expect("writer");
        let generation = Cell::new(None);
        let mut sm: UpdateStateMachine<'_, Cancel> = UpdateStateMachine::new();
        sm.register(Box::new(CpuStopper { platform: p, cpu: 0, generation: &generation })).expect("register");
        sm.register(Box::new(FaultInjector { platform: p })).expect("register");
        let form = Box::leak(Box::new(Cell::new(None)));
        sm.register(Box::new(StateSaver {
            platform: p,
            freeze_counter: 7,
            handoff: None,
            enters: 0,
            table: None,
            form,
        }))
        .expect("register");
        match sm.prepare(&mut w).and_then(|()| sm.freeze(&mut w)) {
            Ok(()) => Ok(w),
            Err(e) => {
                let _ = sm.cancel();
                Err(failure(e))
            }
        }
    }

    #[test]
    fn free_ranges_holding_a_preserved_page_are_counted() {
        use alloc::vec;
        let free = [PhysRange::new(0x1000, 0x1000), PhysRange::new(0x8000, 0x4000), PhysRange::new(0x20000, 0x1000)];
        assert_eq!(overlapping(&free, vec![0x2000..0x8000, 0xc000..0x10000]), 0, "touching is not overlapping");
        assert_eq!(overlapping(&free, core::iter::once(0xb000..0xc000).collect()), 1);
        // Unsorted, one long run across two free ranges, an empty run.
        assert_eq!(overlapping(&free, vec![0x20000..0x20000, 0x1800..0x9000]), 2);
        assert_eq!(overlapping(&free, vec![0x0..0x30000, 0x8000..0x9000]), 3);
        assert_eq!(overlapping(&[], core::iter::once(0x0..0x1000).collect()), 0);
        assert_eq!(overlapping(&free, vec![]), 0);
    }

    proptest::proptest! {
        #[test]
        fn the_sweep_counts_what_a_search_per_range_counts(
            free in proptest::collection::vec((0u64..64, 1u64..8), 0..8),
            runs in proptest::collection::vec((0u64..80, 0u64..12), 0..10),
        ) {
            let free: Vec<PhysRange> = free.iter().map(|&(b, s)| PhysRange::new(b * 0x1000, s * 0x1000)).collect();
            let runs: Vec<core::ops::Range<u64>> = runs.iter().map(|&(b, s)| b * 0x1000..(b + s) * 0x1000).collect();
            let naive = free
                .iter()
                .filter(|f| runs.iter().any(|r| r.start < r.end && r.start < f.base + f.size && r.end > f.base))
                .count();
            proptest::prop_assert_eq!(overlapping(&free, runs), naive);
        }
    }

    #[test]
    fn the_cpu_that_enters_and_cpus_halted_for_good_do_not_park() {
        // aarch64: the requester enters; x86_64: the BSP (0), even when
        // another CPU requested.
        assert_eq!(parked_mask(&[0, 1, 2, 3], 2, |_| false), 0b1011);
        assert_eq!(parked_mask(&[0, 1, 2, 3], 0, |c| c == 3), 0b0110);
        assert_eq!(parked_mask(&[0], 0, |_| false), 0);
        // Indices beyond the mask's 64 bits never park (started the old
        // way).
        assert_eq!(parked_mask(&[0, 64, 70], 0, |_| false), 0);
    }

    #[test]
    fn a_cpu_that_misses_the_freeze_cancels_the_update_and_thaws_the_rest() {
        let p = platform(&[0, 1]);
        assert!(matches!(freeze(&p), Err(Cancel::FreezeTimeout { cpu: 1 })));
        assert_eq!(Cancel::FreezeTimeout { cpu: 1 }.to_string(), "freeze-timeout");
        assert!(!p.handshake.freeze_requested(), "thawed: the other CPUs go back to their guests");
        let kicked = p.machine.with(|m| m.arch.kicks.borrow().clone()).expect("machine");
        assert_eq!(kicked, [1], "CPU 1 was asked to leave its guest");
        // The requester's vCPU was put away; it is simply loaded again.
        assert_eq!(p.machine.with(|m| m.loaded[0]), Some(None));
    }

    #[test]
    fn the_freeze_hook_cancels_once_and_the_state_is_saved_after() {
        let p = platform(&[0]);
        p.machine.with(|m| m.fail_next_freeze = true);
        assert!(matches!(freeze(&p), Err(Cancel::InjectedFailure)));
        assert!(!p.handshake.freeze_requested());
        p.machine.with(|m| m.console_bytes(0, b"queued\nhalf a line"));
        let w = freeze(&p).expect("the hook fires once");
        let queued = p.machine.with(Machine::take_output).expect("machine");
        assert!(queued.is_empty(), "complete lines go out before the handover");
        let mut blob = alloc::vec![0u8; 64 << 10];
        let n = w.write_to(&mut blob, 0x4080_0000).expect("handover");
        assert!(p.handshake.freeze_requested(), "frozen until the kexec or a cancel");
        let ram = p.machine.with(|m| m.ram.clone()).expect("machine");
        let reader = HandoverReader::new(&blob[..n], 0x4080_0000, &ram_map(&ram).expect("ram")).expect("reader");
        let node = reader.subsystem("partitions/1").expect("partition node");
        let line = node.record::<crate::records::ConsoleRecord>().expect("decodes").expect("console record");
        assert_eq!(line.line[..line.len as usize], *b"half a line", "the unfinished line is handed over");
    }
}
