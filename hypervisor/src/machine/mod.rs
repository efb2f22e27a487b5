//! The machine: partitions, their vCPU slots, the run queue of each
//! physical CPU, and the exit policy every architecture shares (stopping
//! and faulting a partition, console lines, hypercall routing, posting
//! virtual interrupts). Written once, for every architecture.
//!
//! What really differs between architectures sits behind [`Arch`]: the
//! vCPU register context and how it is put away, kicking another CPU,
//! powering off, and the arch's own per-partition state (second-stage
//! table, emulated devices, guest image). The arch code in the image
//! (`src/arch/<arch>/`) enters guests, decodes traps into calls on the
//! machine, and drives its registers; `fake` implements [`Arch`] on the host
//! so the machine's logic is unit-tested without an emulator.
//!
//! # Ownership and the per-CPU access rule
//!
//! One [`Machine`] exists, inside the arch's [`MachineLock`]. Every field is
//! read and written under that lock, with one exception: the vCPU context
//! behind [`VcpuSlot::ctx`] belongs to the physical CPU the vCPU is pinned
//! to (`pcpu`). Only that CPU dereferences it, under the lock or while it
//! runs the vCPU with the lock released. Other CPUs change a vCPU only
//! through its slot (state, `pending`, `start`) and then kick its CPU,
//! which applies the change at its next scheduling decision.

#[cfg(test)]
pub(crate) mod fake;
mod handover;
#[cfg(test)]
mod tests;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use hvcall::PartitionState;
use kho::ScratchPlan;
use loader::PhysRange;

use crate::frames::FrameAllocator;
use crate::guest_console::LineBuffer;
use crate::hypercall::{self, Action, HostMemory, RunningHv};
use crate::partition::PartitionInfo;
use crate::preserved::{PreserveError, PreservedMap, PreservingFrames};
use crate::sched::{pick_next, VcpuState};

pub use handover::{restore, table_of, Handover, RestoreError, Restored, SaveError, StateForm, TableBlock};

/// Physical CPUs the machine schedules on.
pub const MAX_CPUS: usize = 8;

/// What differs between architectures, for the machine.
pub trait Arch: Sized {
    /// A vCPU's saved context: registers, system registers, the VMCS.
    type Vcpu;
    /// The arch's part of a partition: its second-stage table and tag,
    /// emulated device state, what SYSTEM_RESET reloads.
    type Partition;
    /// How the preserved map reaches its pages (identity in the image, an
    /// arena in host tests).
    type Pages: sparse_bitmap::PhysToVirt + Clone;
    /// Identifies the layout of [`Arch::save_context`]'s bytes in a vCPU
    /// record (arch and version).
    const CONTEXT_FORMAT: u32;
    /// Most bytes [`save_context`](Self::save_context) writes (the room a
    /// vCPU's state table entry gives its context).
    const CONTEXT_MAX: usize = crate::records::CONTEXT_BYTES;

    /// Index of the physical CPU running this code.
    fn this_cpu(&self) -> usize;
    /// Makes physical CPU `cpu` leave its guest soon (an IPI; or nothing,
    /// where the slice timer bounds the wait), so it sees a change to its
    /// vCPUs or a freeze request.
    fn kick(&self, cpu: usize);
    /// Saves the state of `vcpu`, loaded on this CPU, back into it.
    fn put(&mut self, vcpu: &mut Self::Vcpu);
    /// Powers the machine off. Does not return in the image.
    fn power_off(&mut self, ok: bool);
    /// Reports what devices recorded and the machine has not reported yet
    /// (SMMU faults), before the machine powers off.
    fn report_pending(_m: &mut Machine<Self>) {}
    /// Root of the partition's second-stage table (EPT, stage 2).
    fn stage2_root(p: &Self::Partition) -> u64;
    /// Posted interrupts (`VcpuSlot::pending`) in the `vcpu` record's
    /// version-1 terms, for readers that know only those.
    fn pending_to_v1(pending: u32) -> u32 {
        pending
    }
    /// Posted interrupts from a version-1 `vcpu` record.
    fn pending_from_v1(pending: u32) -> u32 {
        pending
    }
    /// Whether a vCPU context of `format` (an older layout, say) can be
    /// read back.
    fn reads_context_format(format: u32) -> bool {
        format == Self::CONTEXT_FORMAT
    }
    /// Serialises a vCPU context for its handover record; `None` if it
    /// does not fit `out`.
    fn save_context(vcpu: &Self::Vcpu, out: &mut [u8]) -> Option<usize>;
}

/// A partition at run time.
pub struct Partition<A: Arch> {
    pub info: PartitionInfo,
    pub state: PartitionState,
    /// The tag its second-stage translations are cached under: the VMID
    /// on aarch64, the VPID on x86_64.
    pub vmid: u16,
    /// Its vCPUs, as indices into [`Machine::vcpus`], by vCPU index.
    pub vcpus: Vec<usize>,
    console: LineBuffer,
    /// Complete console lines not yet printed: they go out once the
    /// machine lock is released ([`Machine::take_output`]), so a slow
    /// serial port delays only the CPU that prints.
    output: Vec<String>,
    pub arch: A::Partition,
}

impl<A: Arch> fmt::Debug for Partition<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partition").field("info", &self.info).field("state", &self.state).finish_non_exhaustive()
    }
}

/// A vCPU's scheduling record.
pub struct VcpuSlot<A: Arch> {
    /// The context, owned by the CPU `pcpu` (see the module's rule).
    pub ctx: NonNull<A::Vcpu>,
    /// Its partition, as an index into [`Machine::partitions`].
    pub partition: usize,
    pub index: u32,
    /// The physical CPU it is pinned to.
    pub pcpu: usize,
    pub state: VcpuState,
    /// Virtual interrupts to inject (the arch assigns the bits).
    pub pending: u32,
    /// A (pc, first argument) to restart from (PSCI CPU_ON, SYSTEM_RESET,
    /// INIT-SIPI), applied by the owning CPU so that no CPU writes another
    /// CPU's loaded context.
    pub start: Option<(u64, u64)>,
}

impl<A: Arch> fmt::Debug for VcpuSlot<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuSlot")
            .field("partition", &self.partition)
            .field("index", &self.index)
            .field("pcpu", &self.pcpu)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

// SAFETY: a slot's context is only dereferenced by its owning physical CPU
// (`pcpu`), under the machine lock or while that CPU runs the vCPU; the
// slot itself moves between CPUs only inside the machine lock.
unsafe impl<A: Arch> Send for VcpuSlot<A> {}

/// What a CPU does after an exit the machine handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Re-enter the same vCPU.
    Resume,
    /// Choose again: the vCPU stopped, waits, or yielded.
    Reschedule,
    /// Run a live update (outside the machine lock), then re-enter the
    /// requester with its status.
    LiveUpdate { image_pa: u64, size: u64 },
}

/// A hypercall's results for the caller's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallResult {
    /// The result word (status and reps done).
    pub result: u64,
    /// The output register of a fast call.
    pub fast_output: Option<u64>,
    pub next: Next,
}

/// Why a partition could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildError {
    OutOfMemory,
    /// Its RAM could not be recorded as preserved.
    Preserve(PreserveError),
    /// More partitions than second-stage tags.
    TooManyPartitions,
    NoVcpus,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfMemory => "out-of-memory",
            Self::Preserve(_) => "preserve-ram",
            Self::TooManyPartitions => "too-many-partitions",
            Self::NoVcpus => "no-vcpus",
        })
    }
}

/// Why the arch refused to build a partition: `Display` is the reason
/// token of `hv: guest-refused`, [`Refusal::cause`] what lies beneath it.
pub trait Refusal: fmt::Display {
    fn cause(&self) -> Option<&dyn fmt::Display> {
        None
    }
}

/// What the machine is built from: memory, the preserved map and where
/// the next image is staged.
pub struct MachineMemory<P: sparse_bitmap::PhysToVirt + Clone> {
    pub frames: FrameAllocator,
    /// Everything that survives a live update, recorded as it is allocated.
    pub preserved: PreservedMap<P>,
    /// Where the next image is staged; the same regions on every update.
    pub scratch: ScratchPlan,
    /// The machine's RAM.
    pub ram: Vec<PhysRange>,
}

impl<P: sparse_bitmap::PhysToVirt + Clone> fmt::Debug for MachineMemory<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MachineMemory").field("ram", &self.ram).finish_non_exhaustive()
    }
}

/// The machine.
pub struct Machine<A: Arch> {
    pub partitions: Vec<Partition<A>>,
    pub vcpus: Vec<VcpuSlot<A>>,
    /// The vCPUs pinned to each physical CPU, in round-robin order.
    pub queues: [Vec<usize>; MAX_CPUS],
    /// The vCPU whose state is in each CPU's registers.
    pub loaded: [Option<usize>; MAX_CPUS],
    /// The physical CPUs that run guests, by CPU index.
    pub online: Vec<usize>,
    pub frames: FrameAllocator,
    pub preserved: PreservedMap<A::Pages>,
    pub scratch: ScratchPlan,
    pub ram: Vec<PhysRange>,
    /// Live updates so far (carried across them).
    pub update_count: u64,
    /// Test hook: the next update's freeze fails.
    pub fail_next_freeze: bool,
    /// Every partition has stopped: the machine is powering off.
    pub shutting_down: bool,
    /// Machine-wide arch state (the SMMU, VMX capabilities, ...).
    pub arch: A,
}

impl<A: Arch> fmt::Debug for Machine<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("partitions", &self.partitions)
            .field("vcpus", &self.vcpus)
            .field("online", &self.online)
            .finish_non_exhaustive()
    }
}

impl<A: Arch> Machine<A> {
    /// An empty machine over `memory`, scheduling on the CPUs `online`.
    pub fn new(arch: A, memory: MachineMemory<A::Pages>, online: &[usize]) -> Self {
        let mut online: Vec<usize> = online.iter().copied().filter(|&c| c < MAX_CPUS).collect();
        if online.is_empty() {
            online.push(0);
        }
        Self {
            partitions: Vec::new(),
            vcpus: Vec::new(),
            queues: Default::default(),
            loaded: [None; MAX_CPUS],
            online,
            frames: memory.frames,
            preserved: memory.preserved,
            scratch: memory.scratch,
            ram: memory.ram,
            update_count: 0,
            fail_next_freeze: false,
            shutting_down: false,
            arch,
        }
    }

    /// How many CPUs run guests.
    pub fn cpus(&self) -> usize {
        self.online.len()
    }

    /// A frame source that records every page it hands out as preserved
    /// (second-stage tables, IOMMU tables, VMCS regions).
    pub fn preserving_frames(&mut self) -> PreservingFrames<'_, A::Pages> {
        PreservingFrames { frames: &mut self.frames, map: &mut self.preserved }
    }

    /// Allocates `bytes` of guest RAM, recorded as preserved at once (not
    /// at update time). The caller zeroes and fills it.
    pub fn alloc_guest_ram(&mut self, bytes: u64) -> Result<PhysRange, BuildError> {
        let block = self.frames.alloc_block(bytes).ok_or(BuildError::OutOfMemory)?;
        if let Err(e) = self.preserved.preserve(&mut self.frames, block.base..block.base + block.size) {
            self.frames.free_block(block);
            return Err(BuildError::Preserve(e));
        }
        Ok(block)
    }

    /// Gives back guest RAM from [`Self::alloc_guest_ram`] when the
    /// partition it was for could not be built.
    pub fn free_guest_ram(&mut self, block: PhysRange) {
        let _ = self.preserved.bitmap.remove_range(&mut self.frames, block.base..block.base + block.size);
        self.frames.free_block(block);
    }

    /// Adds a running partition with one vCPU per context: vCPU 0 runnable,
    /// the others off until the guest starts them. vCPUs are spread over
    /// the online CPUs round-robin, continuing from the last partition's.
    /// Returns the partition's index.
    pub fn add_partition(
        &mut self,
        info: PartitionInfo,
        vmid: u16,
        arch: A::Partition,
        contexts: Vec<A::Vcpu>,
    ) -> Result<usize, BuildError> {
        if contexts.is_empty() {
            return Err(BuildError::NoVcpus);
        }
        let p = self.partitions.len();
        let mut vcpus = Vec::with_capacity(contexts.len());
        for (i, ctx) in contexts.into_iter().enumerate() {
            let v = self.vcpus.len();
            let pcpu = self.online[v % self.online.len()];
            self.vcpus.push(VcpuSlot {
                ctx: NonNull::from(Box::leak(Box::new(ctx))),
                partition: p,
                index: i as u32,
                pcpu,
                state: if i == 0 { VcpuState::Runnable } else { VcpuState::Off },
                pending: 0,
                start: None,
            });
            self.queues[pcpu].push(v);
            vcpus.push(v);
        }
        self.partitions.push(Partition {
            info,
            state: PartitionState::Running,
            vmid,
            vcpus,
            console: LineBuffer::default(),
            output: Vec::new(),
            arch,
        });
        Ok(p)
    }

    /// Builds partition `i + 1` of each spec with the arch's `build`; a
    /// partition it refuses is reported (`hv: guest-refused`) and the
    /// others are built. Returns how many partitions there are.
    pub fn build_partitions<E: Refusal>(
        &mut self,
        specs: &[loader::manifest::GuestSpec],
        mut build: impl FnMut(&mut Self, u32, &loader::manifest::GuestSpec) -> Result<(), E>,
    ) -> usize {
        for (i, spec) in specs.iter().enumerate() {
            if let Err(reason) = build(self, i as u32 + 1, spec) {
                if let Some(cause) = reason.cause() {
                    crate::println!("guest {}: {cause}", spec.name);
                }
                crate::hv_event!("guest-refused", name = spec.name, reason = reason);
            }
        }
        self.partitions.len()
    }

    /// Whether vCPU `v` may run now.
    pub fn runnable(&self, v: usize) -> bool {
        let s = &self.vcpus[v];
        match s.state {
            VcpuState::Runnable => true,
            VcpuState::Waiting => s.pending != 0,
            VcpuState::Off | VcpuState::Stopped => false,
        }
    }

    /// Chooses what `cpu` runs next: the loaded vCPU while it may run,
    /// unless `yield_now`, else the next runnable one in round-robin order.
    pub fn pick(&self, cpu: usize, yield_now: bool) -> Option<usize> {
        let current = self.loaded[cpu].filter(|&v| self.runnable(v));
        if yield_now || current.is_none() {
            pick_next(&self.queues[cpu], self.loaded[cpu], |v| self.runnable(v))
        } else {
            current
        }
    }

    /// Saves and unloads the vCPU loaded on this CPU, if any.
    pub fn put_loaded(&mut self, cpu: usize) {
        if let Some(v) = self.loaded[cpu].take() {
            // SAFETY: `v` was loaded on this CPU, so it is pinned here, and
            // this CPU is in the hypervisor, not running it.
            let ctx = unsafe { self.vcpus[v].ctx.as_mut() };
            self.arch.put(ctx);
        }
    }

    /// A freeze for a live update on this CPU: the loaded vCPU saved, and
    /// every pending start of the vCPUs pinned here (PSCI CPU_ON,
    /// SYSTEM_RESET) applied to its context with `reset(context, pc, x0)`.
    /// The handover carries contexts, not pending starts: a vCPU turned on
    /// just before the freeze would otherwise resume after the update from
    /// the context it had before (its reset context: the guest image's
    /// primary entry, booting the guest a second time over the running
    /// one).
    pub fn freeze_cpu_with_starts(&mut self, cpu: usize, mut reset: impl FnMut(&mut A::Vcpu, u64, u64)) {
        self.put_loaded(cpu);
        for k in 0..self.queues[cpu].len() {
            let v = self.queues[cpu][k];
            if let Some((pc, x0)) = self.vcpus[v].start.take() {
                // SAFETY: `v` is pinned to this CPU, which is in the
                // hypervisor and has nothing loaded (`put_loaded`).
                reset(unsafe { self.ctx_mut(v) }, pc, x0);
            }
        }
    }

    /// Puts the loaded vCPU away if it can no longer run (off or stopped),
    /// so an idle CPU holds no guest state.
    pub fn put_if_idle(&mut self, cpu: usize) {
        if let Some(v) = self.loaded[cpu] {
            if matches!(self.vcpus[v].state, VcpuState::Off | VcpuState::Stopped) {
                self.put_loaded(cpu);
            }
        }
    }

    /// The context of `v` for the CPU that owns it.
    ///
    /// # Safety
    /// The caller runs on `v`'s physical CPU (`pcpu`), which is in the
    /// hypervisor (not running `v`), and holds no other reference to it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn ctx_mut(&self, v: usize) -> &mut A::Vcpu {
        // SAFETY: the caller's contract: only the owning CPU, which is not
        // running `v`, reaches the context, and only through this borrow.
        unsafe { &mut *self.vcpus[v].ctx.as_ptr() }
    }

    /// A waiting vCPU becomes runnable.
    pub fn wake(&mut self, v: usize) {
        if self.vcpus[v].state == VcpuState::Waiting {
            self.vcpus[v].state = VcpuState::Runnable;
        }
    }

    /// Delivers virtual interrupts `bits` to `v` (none: just wake it),
    /// kicking its CPU if that is another one.
    pub fn post(&mut self, v: usize, bits: u32) {
        self.vcpus[v].pending |= bits;
        self.wake(v);
        let pcpu = self.vcpus[v].pcpu;
        if pcpu != self.arch.this_cpu() {
            self.arch.kick(pcpu);
        }
    }

    /// Collects a partition's console bytes into lines.
    pub fn console_bytes(&mut self, p: usize, bytes: &[u8]) {
        let part = &mut self.partitions[p];
        let id = part.info.id;
        let output = &mut part.output;
        part.console.push(bytes, &mut |line| output.push(format!("guest{id}: {line}")));
    }

    /// Adds an already formatted line (an `hv:` event about a partition)
    /// to the partition's pending output, in order with its console.
    pub fn queue_line(&mut self, p: usize, line: String) {
        self.partitions[p].output.push(line);
    }

    /// Takes every partition's complete lines, to print unlocked.
    pub fn take_output(&mut self) -> Vec<String> {
        self.partitions.iter_mut().flat_map(|p| core::mem::take(&mut p.output)).collect()
    }

    /// Prints a partition's pending lines now: before an event about it,
    /// so its last words come first.
    fn flush_output(&mut self, p: usize) {
        for line in core::mem::take(&mut self.partitions[p].output) {
            crate::println!("{line}");
        }
    }

    /// Stops every vCPU of partition `p` (those on other CPUs are kicked),
    /// and powers the machine off when no partition is left running.
    pub fn stop_partition(&mut self, p: usize, state: PartitionState, reason: &str) {
        if self.partitions[p].state != PartitionState::Running {
            return;
        }
        self.flush_output(p);
        self.partitions[p].state = state;
        crate::hv_event!("guest-stop", id = self.partitions[p].info.id, reason = reason);
        let me = self.arch.this_cpu();
        for k in 0..self.partitions[p].vcpus.len() {
            let v = self.partitions[p].vcpus[k];
            self.vcpus[v].state = VcpuState::Stopped;
            let pcpu = self.vcpus[v].pcpu;
            if pcpu != me {
                self.arch.kick(pcpu);
            }
        }
        if self.partitions.iter().all(|p| p.state != PartitionState::Running) && !self.shutting_down {
            self.shutting_down = true;
            for q in 0..self.partitions.len() {
                self.flush_output(q);
            }
            A::report_pending(self);
            let faulted = self.partitions.iter().filter(|p| p.state == PartitionState::Faulted).count();
            crate::hv_event!("all-guests-stopped", guests = self.partitions.len(), faulted = faulted);
            crate::hv_event!("shutdown", status = "ok");
            self.arch.power_off(true);
        }
    }

    /// Stops the partition of `v` for a fault the guest cannot be given:
    /// `hv: fault kind=... guest=... addr=... vcpu=... <detail>=...`.
    pub fn fault(&mut self, v: usize, kind: &str, addr: u64, detail: (&'static str, u64)) {
        let p = self.vcpus[v].partition;
        self.flush_output(p);
        crate::println!(
            "hv: fault kind={} guest={} addr={addr:#x} vcpu={} {}={:#x}",
            crate::events::Token(kind),
            self.partitions[p].info.id,
            self.vcpus[v].index,
            detail.0,
            detail.1
        );
        self.stop_partition(p, PartitionState::Faulted, "fault");
    }

    /// Routes a hypercall of vCPU `v` (registers already read by the arch
    /// code): decoding and the calls are in [`hypercall::dispatch`]; the
    /// machine carries out what the call asks of it.
    pub fn hypercall(
        &mut self,
        v: usize,
        control: u64,
        input: u64,
        output: u64,
        memory: &mut dyn HostMemory,
    ) -> HypercallResult {
        let p = self.vcpus[v].partition;
        let info = self.partitions[p].info.clone();
        let mut printed: Vec<u8> = Vec::new();
        let partitions = &self.partitions;
        let hv = RunningHv {
            update_count: self.update_count,
            cpus: self.online.len() as u64,
            partition_state: |id: u64| partitions.iter().find(|p| u64::from(p.info.id) == id).map(|p| p.state),
            update_staging: crate::live_update::HANDSHAKE.in_progress(),
        };
        let outcome = hypercall::dispatch(&info, control, input, output, &hv, memory, &mut |b| {
            printed.extend_from_slice(b);
        });
        self.console_bytes(p, &printed);
        let next = match outcome.action {
            Action::Resume => Next::Resume,
            Action::Yield => Next::Reschedule,
            Action::ShutdownSelf => {
                self.stop_partition(p, PartitionState::Stopped, "shutdown");
                Next::Reschedule
            }
            Action::LiveUpdate { image_pa, size } => Next::LiveUpdate { image_pa, size },
            Action::FailNextFreeze => {
                self.fail_next_freeze = true;
                Next::Resume
            }
        };
        HypercallResult { result: outcome.result_word(), fast_output: outcome.fast_output, next }
    }

    /// How many online CPUs have a vCPU that may run now (after an update,
    /// the CPUs that must re-enter a guest before the blackout ends).
    pub fn cpus_with_runnable(&self) -> usize {
        self.online.iter().filter(|&&c| self.queues[c].iter().any(|&v| self.runnable(v))).count()
    }

    /// Whether any vCPU pinned to `cpu` could ever run again (it is not
    /// stopped; an off vCPU may still be started by its partition).
    pub fn cpu_has_work(&self, cpu: usize) -> bool {
        self.queues[cpu].iter().any(|&v| self.vcpus[v].state != VcpuState::Stopped)
    }
}

/// The one machine, shared by the physical CPUs: a spin lock around it.
/// The module documentation gives the access rule for vCPU contexts.
pub struct MachineLock<A: Arch>(spin::Mutex<Option<Machine<A>>>);

impl<A: Arch> fmt::Debug for MachineLock<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MachineLock")
    }
}

impl<A: Arch> Default for MachineLock<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Arch> MachineLock<A> {
    pub const fn new() -> Self {
        Self(spin::Mutex::new(None))
    }

    /// Installs the machine (first boot, or adopted after an update).
    pub fn install(&self, m: Machine<A>) {
        *self.0.lock() = Some(m);
    }

    /// Locks the machine.
    pub fn lock(&self) -> spin::MutexGuard<'_, Option<Machine<A>>> {
        self.0.lock()
    }

    /// Runs `f` on the machine under its lock; `None` before it exists.
    pub fn with<R>(&self, f: impl FnOnce(&mut Machine<A>) -> R) -> Option<R> {
        self.0.lock().as_mut().map(f)
    }
}
