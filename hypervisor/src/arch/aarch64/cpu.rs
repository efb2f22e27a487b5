//! Each physical CPU's life at EL2 on aarch64: per-CPU virtualization
//! set-up, the scheduling loop over the machine's run queue, entering the
//! chosen vCPU (its EL1 state, stage 2 and VMID loaded, its virtual
//! interrupts in the list registers), and the exit path from `entry.S`.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use hypervisor::arch::aarch64::ptimer::{self, PPI_EL1_PHYS_TIMER};
use hypervisor::arch::aarch64::traps::{CNTHCTL_GUEST, CPTR_GUEST, HCR_GUEST, MDCR_GUEST};
use hypervisor::live_update::{HANDSHAKE, REPORT};
use hypervisor::machine::{Machine, Next};
use hypervisor::println;
use hypervisor::sched::VcpuState;
use hypervisor::stage2::ArmStage2;

use super::exits::{handle_sync, read_esr_far_hpfar};
use super::gic::{self, MAX_LRS, PPI_HYP_TIMER, PPI_VIRT_TIMER};
use super::platform::{cpu_index, Aarch64, MACHINE};
use super::vcpu::{self, GuestRegs, CNTV_IMASK};
use super::MAX_CPUS;

/// VTCR_EL2 (D19.2.176): the stage-2 engine's geometry, RES1 bit 31, and
/// PS from PARange.
const VTCR_RES1: u64 = 1 << 31;
const VTCR_PS_SHIFT: u64 = 16;
/// Scheduling time slice.
const SLICE_MS: u64 = 10;
/// `VcpuSlot::pending` has a bit per private INTID (SGIs 0-15, PPIs
/// 16-31): the virtual timer's PPI.
pub const PENDING_VTIMER: u32 = 1 << PPI_VIRT_TIMER;

/// Set by the boot CPU once the machine exists: the others may schedule.
static STARTED: AtomicBool = AtomicBool::new(false);
/// Stack top of each CPU, for re-entering guests with an empty stack.
static STACK_TOP: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

extern "C" {
    fn guest_enter(frame: *mut GuestRegs, stack_top: usize) -> !;
}

/// Lets the other CPUs into the scheduler.
pub fn release_secondaries() {
    STARTED.store(true, Ordering::Release);
    // SAFETY: SEV wakes CPUs waiting in WFE; no other effect.
    unsafe { asm!("dsb ish", "sev", options(nomem, nostack)) };
}

pub fn wait_for_start() {
    while !STARTED.load(Ordering::Acquire) {
        // SAFETY: waits for the boot CPU's SEV.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}

/// While an update completes and other CPUs are not back in their guests
/// yet, a CPU that is leaves its guest this often (µs) and yields: an
/// emulator that runs CPUs round-robin on one host thread (QEMU with
/// -icount) otherwise runs the first guest for a whole time slice before
/// the others get to return. On hardware it costs a timer exit or two.
const RESUME_POLL_US: u64 = 20;

/// When each CPU's time slice ends (physical counter).
static SLICE_END: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Starts a new time slice on `cpu`.
fn arm_tick(cpu: usize) {
    let (now, freq) = super::counter();
    SLICE_END[cpu].store(now + freq / 1000 * SLICE_MS, Ordering::Relaxed);
    program_timer(cpu, None);
}

/// Programs this CPU's EL2 physical timer (CNTHP) for the end of the slice
/// or, if earlier, `deadline`: the earliest emulated EL1 physical timer of
/// a vCPU here, so it fires on time rather than at the next slice.
fn program_timer(cpu: usize, deadline: Option<u64>) {
    let end = SLICE_END[cpu].load(Ordering::Relaxed);
    let mut at = deadline.map_or(end, |d| d.min(end));
    if REPORT.waiting_for() > 0 {
        // An update is completing and some CPU is not back in a guest:
        // come back soon and let it run (see `schedule`).
        let (now, freq) = super::counter();
        at = at.min(now + freq / 1_000_000 * RESUME_POLL_US);
    }
    // SAFETY: programs this CPU's EL2 physical timer (CNTHP), which only the
    // hypervisor uses.
    unsafe {
        asm!("msr cnthp_cval_el2, {0}", "msr cnthp_ctl_el2, {1}", "isb", in(reg) at, in(reg) 1u64,
             options(nomem, nostack));
    }
}

/// The earliest future deadline of an emulated EL1 physical timer among
/// the vCPUs pinned to `cpu` (one already expired is `check_soft_timers`'
/// to raise, not a reason to come back at once).
fn next_physical_timer(m: &mut Machine<Aarch64>, cpu: usize) -> Option<u64> {
    let now = super::counter().0;
    let mut earliest: Option<u64> = None;
    for k in 0..m.queues[cpu].len() {
        let v = m.queues[cpu][k];
        // SAFETY: pinned to this CPU, which is in the hypervisor.
        let t = unsafe { m.ctx_mut(v) }.ptimer;
        if t.ctl & ptimer::CTL_ENABLE != 0 && t.ctl & ptimer::CTL_IMASK == 0 && t.cval > now {
            earliest = Some(earliest.map_or(t.cval, |e| e.min(t.cval)));
        }
    }
    earliest
}

/// The stack `run_cpu` gave `cpu`: its top and its slot. A CPU that
/// leaves for a new image comes back to it if the update is rolled back.
pub fn stack_of(cpu: usize) -> (u64, usize) {
    let bottom = core::ptr::addr_of!(super::__stacks_bottom) as usize;
    let top = STACK_TOP[cpu].load(Ordering::Relaxed);
    (top as u64, (top - bottom) / super::STACK_SIZE - 1)
}

/// Per-CPU virtualization set-up, then the scheduler. Never returns.
pub fn run_cpu(cpu: usize, stack_slot: usize) -> ! {
    let bottom = core::ptr::addr_of!(super::__stacks_bottom) as usize;
    STACK_TOP[cpu].store(bottom + (stack_slot + 1) * super::STACK_SIZE, Ordering::Relaxed);
    let parange = super::mmu::parange();
    // SAFETY: EL2 configuration for running guests on this CPU (the
    // policy's constants, `arch::aarch64::traps`); nothing runs at EL1 yet.
    unsafe {
        asm!(
            "msr hcr_el2, {hcr}",
            "msr vtcr_el2, {vtcr}",
            "msr cnthctl_el2, {cnthctl}",
            "msr mdcr_el2, {mdcr}",
            "msr cptr_el2, {cptr}",
            // The OS lock is the hypervisor's (guests' accesses are RAZ/WI,
            // MDCR_EL2.TDOSA): unlocked, so guests' debug exceptions work.
            "msr oslar_el1, xzr",
            "msr cntvoff_el2, xzr",
            "msr cntv_ctl_el0, xzr",
            "isb",
            hcr = in(reg) HCR_GUEST,
            vtcr = in(reg) ArmStage2::VTCR_GEOMETRY | VTCR_RES1 | (parange.min(5) << VTCR_PS_SHIFT),
            cnthctl = in(reg) CNTHCTL_GUEST,
            mdcr = in(reg) MDCR_GUEST | pmu_counters(),
            cptr = in(reg) CPTR_GUEST,
            options(nomem, nostack),
        );
    }
    if let Err(reason) = gic::init_cpu(super::mpidr()) {
        hypervisor::hv_event!("cpu-failed", cpu = cpu, reason = reason);
        super::park();
    }
    arm_tick(cpu);
    let next = schedule(cpu, false);
    super::live_update::note_resumed(cpu);
    // SAFETY: `next` is a live vCPU frame pinned to this CPU and loaded by
    // `schedule`; the stack top is this CPU's own stack.
    unsafe { guest_enter(next, STACK_TOP[cpu].load(Ordering::Relaxed)) }
}

/// Handles the physical interrupts pending on this CPU. Returns whether the
/// time slice ended.
fn handle_irqs(m: &mut Machine<Aarch64>, cpu: usize) -> bool {
    let mut tick = false;
    loop {
        let intid = gic::ack();
        if intid >= gic::INTID_SPECIAL {
            break;
        }
        match intid {
            PPI_HYP_TIMER => {
                // The end of the slice, or an emulated physical timer's
                // deadline before it (`check_soft_timers` raises that one).
                if super::counter().0 >= SLICE_END[cpu].load(Ordering::Relaxed) {
                    tick = true;
                    arm_tick(cpu);
                    super::smmu::poll_smmu(m);
                } else {
                    program_timer(cpu, None);
                }
            }
            PPI_VIRT_TIMER => {
                // The loaded vCPU's timer fired: mask it until the guest has
                // taken the virtual interrupt, then inject.
                vcpu::write_cntv_ctl(vcpu::read_cntv_ctl() | CNTV_IMASK);
                if let Some(v) = m.loaded[cpu] {
                    // SAFETY: the loaded vCPU belongs to this CPU.
                    unsafe { m.ctx_mut(v) }.timer_masked_by_hv = true;
                    m.vcpus[v].pending |= PENDING_VTIMER;
                    m.wake(v);
                }
            }
            // PPI_MAINTENANCE (the list registers drained while more
            // interrupts wait: the entry after this exit refills them),
            // SGI_KICK and anything else: the exit itself was the point.
            _ => {}
        }
        gic::end(intid);
    }
    tick
}

/// MDCR_EL2.HPMN: PMCR_EL0.N, the event counters implemented (the PMU
/// traps, but HPMN must not exceed N, D19.2.87).
fn pmu_counters() -> u64 {
    let pmcr: u64;
    // SAFETY: reading PMCR_EL0 at EL2 has no side effects.
    unsafe { asm!("mrs {0}, pmcr_el0", out(reg) pmcr, options(nomem, nostack)) };
    (pmcr >> 11) & 0x1f
}

/// Timers that run in software: the emulated EL1 physical timer of every
/// vCPU here (its PPI 30 posted while it is asserted and not already
/// pending), and the virtual timers of the vCPUs that are not loaded.
fn check_soft_timers(m: &mut Machine<Aarch64>, cpu: usize) {
    let now = vcpu::counter();
    let physical_now = super::counter().0;
    for k in 0..m.queues[cpu].len() {
        let v = m.queues[cpu][k];
        // SAFETY: the vCPU is pinned to this CPU, which is in the
        // hypervisor; the physical timer is software state either way.
        let asserted = unsafe { m.ctx_mut(v) }.ptimer.asserted(physical_now);
        let (p, index) = (m.vcpus[v].partition, m.vcpus[v].index as usize);
        let in_flight = m.partitions[p]
            .arch
            .vgic
            .cpus
            .get(index)
            .is_some_and(|c| c.irqs[PPI_EL1_PHYS_TIMER].pending || c.irqs[PPI_EL1_PHYS_TIMER].in_lr);
        if asserted && !in_flight && m.vcpus[v].pending & (1 << PPI_EL1_PHYS_TIMER) == 0 {
            m.vcpus[v].pending |= 1 << PPI_EL1_PHYS_TIMER;
            m.wake(v);
        }
        if m.loaded[cpu] == Some(v) {
            continue;
        }
        // SAFETY: the vCPU is pinned to this CPU and not loaded.
        let ctx = unsafe { m.ctx_mut(v) };
        let ctl = ctx.sys.cntv_ctl;
        if ctl & vcpu::CNTV_ENABLE != 0 && ctl & CNTV_IMASK == 0 && now >= ctx.sys.cntv_cval {
            ctx.sys.cntv_ctl |= CNTV_IMASK;
            ctx.timer_masked_by_hv = true;
            m.vcpus[v].pending |= PENDING_VTIMER;
            m.wake(v);
        }
    }
}

/// Loads `v` on this CPU (if it is not already) and injects its pending
/// virtual interrupts into free list registers.
fn prepare_entry(m: &mut Machine<Aarch64>, cpu: usize, v: usize) {
    if let Some((pc, x0)) = m.vcpus[v].start.take() {
        // SAFETY: `v` is pinned to this CPU; a loaded copy is dropped below.
        unsafe { m.ctx_mut(v) }.reset(pc, x0);
        if m.loaded[cpu] == Some(v) {
            m.loaded[cpu] = None;
        }
    }
    if m.loaded[cpu] != Some(v) {
        m.put_loaded(cpu);
        let p = &m.partitions[m.vcpus[v].partition];
        let vttbr = ArmStage2::vttbr(p.arch.stage2.root(), p.vmid);
        // SAFETY: `v` is pinned to this CPU; its stage-2 table maps only its
        // partition's RAM, under its own VMID.
        unsafe {
            m.ctx_mut(v).load();
            asm!("msr vttbr_el2, {0}", "isb", in(reg) vttbr, options(nomem, nostack));
        }
        m.loaded[cpu] = Some(v);
    }
    // Interrupts posted to the vCPU become its virtual GIC's; then the
    // list registers are read back (what the guest completed) and refilled
    // in priority order.
    let n = gic::lr_count().min(MAX_LRS);
    let mut lrs = [0u64; MAX_LRS];
    for (i, lr) in lrs.iter_mut().enumerate().take(n) {
        *lr = gic::read_lr(i);
    }
    let before = lrs;
    let index = m.vcpus[v].index as usize;
    let p = m.vcpus[v].partition;
    // The UART's interrupt is a level: raised again once the guest has
    // completed it while the condition holds.
    if m.partitions[p].arch.uart.interrupt() {
        super::exits::assert_uart_interrupt(m, p);
    }
    let posted = core::mem::take(&mut m.vcpus[v].pending);
    let vgic = &mut m.partitions[p].arch.vgic;
    vgic.sync_lrs(index, &lrs[..n]);
    for intid in (0..32).filter(|&i| posted & (1 << i) != 0) {
        vgic.set_private_pending(index, intid);
    }
    let more_waiting = vgic.fill_lrs(index, &mut lrs[..n]);
    let timer_in_flight = vgic
        .cpus
        .get(index)
        .is_some_and(|c| c.irqs[PPI_VIRT_TIMER as usize].in_lr || c.irqs[PPI_VIRT_TIMER as usize].pending);
    for (i, (&now, &was)) in lrs.iter().zip(&before).enumerate().take(n) {
        if now != was {
            gic::write_lr(i, now);
        }
    }
    gic::refill_when_drained(more_waiting);
    // SAFETY: `v` is loaded on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    if ctx.timer_masked_by_hv && !timer_in_flight {
        // The guest has taken the timer interrupt: its timer may fire again.
        vcpu::write_cntv_ctl(vcpu::read_cntv_ctl() & !CNTV_IMASK);
        ctx.timer_masked_by_hv = false;
    }
    if m.vcpus[v].state == VcpuState::Waiting {
        m.vcpus[v].state = VcpuState::Runnable;
    }
}

/// Chooses the vCPU to run on this CPU, idling (WFI, lock released) until
/// one is runnable. `yield_now` prefers another vCPU over the current one.
fn schedule(cpu: usize, yield_now: bool) -> *mut GuestRegs {
    // Lines queued after a blackout go out as the UART takes them.
    hypervisor::console::drain();
    if REPORT.waiting_for() > 0 {
        // SAFETY: YIELD is a hint with no architectural effect (see
        // `RESUME_POLL_US`).
        unsafe { asm!("yield", options(nomem, nostack)) };
    }
    loop {
        if HANDSHAKE.freeze_requested() {
            super::live_update::freeze_this_cpu(cpu);
            continue;
        }
        {
            let mut guard = MACHINE.lock();
            let Some(m) = guard.as_mut() else { super::park() };
            if m.shutting_down {
                drop(guard);
                super::park();
            }
            check_soft_timers(m, cpu);
            let deadline = next_physical_timer(m, cpu);
            program_timer(cpu, deadline);
            if let Some(v) = m.pick(cpu, yield_now) {
                prepare_entry(m, cpu, v);
                // The register frame is the first field of the repr(C) Vcpu.
                return m.vcpus[v].ctx.as_ptr().cast::<GuestRegs>();
            }
            m.put_if_idle(cpu);
        }
        // Nothing to run: wait for an interrupt (WFI wakes on a pending
        // interrupt even with PSTATE.I set), then take it.
        // SAFETY: WFI only waits.
        unsafe { asm!("wfi", options(nomem, nostack)) };
        let mut guard = MACHINE.lock();
        if let Some(m) = guard.as_mut() {
            handle_irqs(m, cpu);
        }
    }
}

/// Called by entry.S on every guest exit with the exited vCPU's frame;
/// returns the frame to enter next.
#[no_mangle]
extern "C" fn hv_guest_exit(_frame: *mut GuestRegs, kind: u64) -> *mut GuestRegs {
    let cpu = cpu_index();
    let (next, lines) = {
        let mut guard = MACHINE.lock();
        let Some(m) = guard.as_mut() else { super::park() };
        let Some(v) = m.loaded[cpu] else { super::park() };
        let next = match kind {
            0 => handle_sync(m, v),
            1 => {
                if handle_irqs(m, cpu) {
                    Next::Reschedule
                } else {
                    Next::Resume
                }
            }
            _ => {
                let (esr, far, _) = read_esr_far_hpfar();
                m.fault(v, if kind == 3 { "serror" } else { "fiq" }, far, ("esr", esr));
                Next::Reschedule
            }
        };
        (next, m.take_output())
    };
    for line in lines {
        println!("{line}");
    }
    match next {
        Next::Resume => schedule(cpu, false),
        Next::Reschedule => schedule(cpu, true),
        Next::LiveUpdate { image_pa, size } => {
            // Returns only if the update was refused or cancelled.
            super::live_update::run(cpu, image_pa, size);
            schedule(cpu, false)
        }
    }
}
